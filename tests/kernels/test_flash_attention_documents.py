"""Document-masked attention (packed sequences) in the Triton kernel and its tiled PyTorch twin.

The reference is the shared float64 softmax attention with an explicit mask:
causal and same document, K/V heads repeated for grouped-query attention. Under the
interpreter the kernels run 16 x 16 tiles, so the layouts below put document
boundaries inside tiles, on tile edges, and documents shorter than a tile
next to ones spanning several.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from attention_reference import DEVICE, NAMES, attention_inputs, attention_reference, torch_attention_same_dtype
from attention_reference import assert_compiled_matches_eager, assert_each_within_torch_error, run_attention
from helpers import assert_close
from scratchlm.kernels.documents import document_spans
from scratchlm.kernels.flash_attention import flash_attention, flash_attention_with_lse
from scratchlm.kernels.flash_attention_tiled import flash_attention_tiled, flash_attention_tiled_with_lse

CUDA = torch.cuda.is_available()
on_cuda_only = pytest.mark.skipif(not CUDA, reason="large shapes are for the GPU; the interpreter is too slow")


def _tiled_with_lse(q, k, v, causal=True, document_ids=None):
    # Tiles unlike the kernel's 16 x 16, so the twin's own tile ranges get exercised.
    return flash_attention_tiled_with_lse(q, k, v, causal, block_m=8, block_n=16, document_ids=document_ids)


def _output_only(attention_with_lse):
    """The attention function that returns o alone, as flash_attention does."""

    def attention(q, k, v, causal=True, document_ids=None):
        return attention_with_lse(q, k, v, causal=causal, document_ids=document_ids)[0]

    return attention


WITH_LSE = {"triton": flash_attention_with_lse, "tiled": _tiled_with_lse}
IMPLEMENTATIONS = {name: _output_only(attention_with_lse) for name, attention_with_lse in WITH_LSE.items()}


def _ids_from_lengths(lengths, device=DEVICE):
    """Non-decreasing ids, document d repeated lengths[d] times (ids start at 3, not 0: only equality counts)."""
    return torch.repeat_interleave(torch.arange(len(lengths)) + 3, torch.tensor(lengths)).to(device)


def _random_ids(batch, n, mean_length, seed):
    """Rows of random documents, lengths 1 .. 2 * mean_length, cut to n."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        lengths = torch.randint(1, 2 * mean_length + 1, (n,), generator=generator)
        rows.append(torch.repeat_interleave(torch.arange(n), lengths)[:n])
    return torch.stack(rows).to(DEVICE)


# name -> (batch, q heads, K/V heads, Nq, Nk, D, causal, ids maker (batch, Nk) -> ids)
LAYOUTS = {
    "random": (2, 1, 1, 77, 77, 16, True, lambda b, n: _random_ids(b, n, 9, seed=1)),
    "random-gqa": (1, 4, 2, 45, 45, 32, True, lambda b, n: _random_ids(b, n, 12, seed=2)),
    "one-per-row": (2, 2, 1, 35, 35, 16, True, lambda b, n: torch.zeros(b, n, dtype=torch.long, device=DEVICE)),
    "every-token-its-own": (1, 2, 2, 37, 37, 16, True, lambda b, n: torch.arange(n, device=DEVICE).expand(b, n)),
    "ones-beside-long": (1, 2, 1, 70, 70, 16, True,
                         lambda b, n: _ids_from_lengths([1, 1, 33, 1, 16, 1, 1, 16]).expand(b, n)),
    "on-tile-edges": (1, 2, 2, 64, 64, 16, True, lambda b, n: _ids_from_lengths([16, 32, 16]).expand(b, n)),
    "queries-after-cache": (2, 1, 1, 21, 50, 16, True, lambda b, n: _random_ids(b, n, 12, seed=3)),
    "not-causal": (2, 2, 1, 41, 41, 16, False, lambda b, n: _random_ids(b, n, 15, seed=4)),
    "not-causal-short-q": (1, 2, 2, 19, 40, 16, False, lambda b, n: _ids_from_lengths([5, 20, 15]).expand(b, n)),
}  # fmt: skip


def _inputs(layout, dtype):
    """(q, k, v, do, causal, document ids) of one layout."""
    batch, heads, kv_heads, q_len, k_len, head_dim, causal, make_ids = LAYOUTS[layout]
    q, k, v, do = attention_inputs((batch, heads, q_len, head_dim), k_len, dtype, kv_heads=kv_heads)
    return q, k, v, do, causal, make_ids(batch, k_len)


def _run(implementation, q, k, v, do, causal, ids):
    """(o, dq, dk, dv) from one implementation."""
    return run_attention(WITH_LSE[implementation], q, k, v, do, causal=causal, document_ids=ids).without_lse()


def _reference(q, k, v, do, causal, ids, dtype=torch.float64):
    """(o, dq, dk, dv) of the shared reference with document ids, in ``dtype``."""
    return attention_reference(q, k, v, do, causal, document_ids=ids, dtype=dtype).without_lse()


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_float32_matches_float64_masked_reference(implementation, layout):
    q, k, v, do, causal, ids = _inputs(layout, torch.float32)
    got = _run(implementation, q, k, v, do, causal, ids)
    want = _reference(q, k, v, do, causal, ids)
    for g, w, name in zip(got, want, NAMES):
        assert g.shape == w.shape and not g.isnan().any(), name
        assert_close(g, w, atol=3e-5, rtol=1e-4, name=f"{name} ({layout})")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["random-gqa", "queries-after-cache"])
def test_16_bit_within_pytorchs_own_error(layout, dtype):
    q, k, v, do, causal, ids = _inputs(layout, dtype)
    got = _run("triton", q, k, v, do, causal, ids)
    want = _reference(q, k, v, do, causal, ids)
    same_dtype = torch_attention_same_dtype(q, k, v, do, causal, ids)  # PyTorch's masked SDPA in this dtype
    assert all(g.dtype == dtype for g in got)
    assert_each_within_torch_error(got, same_dtype, want, f" {dtype} ({layout})")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_document_per_row_is_plain_causal_attention_bit_for_bit(dtype):
    # One document leaves every tile the kernel visits, and every mask, as in plain causal attention.
    q, k, v, do, _, _ = _inputs("one-per-row", dtype)
    ids = torch.full((q.shape[0], k.shape[-2]), 7, device=DEVICE)
    with_ids = _run("triton", q, k, v, do, True, ids)
    plain = _run("triton", q, k, v, do, True, None)
    for a, b, name in zip(with_ids, plain, NAMES):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_each_document_equals_attention_over_that_document_alone(implementation):
    lengths = [5, 30, 1, 19]
    ids = _ids_from_lengths(lengths)[None]
    q = torch.randn(1, 2, sum(lengths), 16, device=DEVICE)
    k, v = torch.randn_like(q), torch.randn_like(q)
    packed = IMPLEMENTATIONS[implementation](q, k, v, document_ids=ids)
    start = 0
    for length in lengths:
        piece = slice(start, start + length)
        alone = IMPLEMENTATIONS[implementation](q[..., piece, :], k[..., piece, :], v[..., piece, :])
        assert_close(packed[..., piece, :], alone, atol=1e-6, rtol=1e-5, name=f"document at {start}")
        start += length


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_a_decrease_starts_a_new_document(implementation):
    # The documented rule: a document is a run of equal consecutive ids, so a
    # repeated id after a different one is a new document, never the old one.
    q, k, v, do, causal, _ = _inputs("random", torch.float32)
    decreasing = _ids_from_lengths([10, 20, 15, 32]).remainder(2).expand(2, -1)  # 1, 0, 1, 0 (from 3, 4, 5, 6)
    renumbered = _ids_from_lengths([10, 20, 15, 32]).expand(2, -1)
    got = _run(implementation, q, k, v, do, causal, decreasing)
    want = _run(implementation, q, k, v, do, causal, renumbered)
    for a, b, name in zip(got, want, NAMES):
        assert torch.equal(a, b), name
    # Not "the same id anywhere in the row", which would let document 2 (ids 1 at 30..44) see document 0.
    same_id = decreasing[:, None, None, :] == decreasing[:, None, 30:45, None]
    causal_rows = torch.ones(77, 77, dtype=torch.bool, device=DEVICE).tril()[30:45]
    joined = F.scaled_dot_product_attention(
        q[:, :, 30:45].double(), k.double(), v.double(), attn_mask=same_id & causal_rows
    )
    assert (joined - got[0][:, :, 30:45].double()).abs().max() > 1e-2


@pytest.mark.parametrize("layout", ["random-gqa"])
def test_backward_is_bitwise_deterministic(layout):
    q, k, v, do, causal, ids = _inputs(layout, torch.bfloat16)
    first = _run("triton", q, k, v, do, causal, ids)
    second = _run("triton", q, k, v, do, causal, ids)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize(
    "ids_shape", [(2, 1, 48), (48,), (1, 48)], ids=["heads-dim-of-1", "one-row-for-the-batch", "batch-of-1"]
)
def test_ids_broadcast_over_heads_and_batch(ids_shape):
    q = torch.randn(2, 2, 48, 16, device=DEVICE)
    k, v = torch.randn_like(q), torch.randn_like(q)
    row = _ids_from_lengths([20, 3, 25])
    full = flash_attention(q, k, v, document_ids=row.expand(2, 48))
    assert torch.equal(flash_attention(q, k, v, document_ids=row.reshape(-1).expand(ids_shape)), full)


def _poisoned_outputs(implementation, poison_keys, ids):
    """Outputs (o, dq) with NaN written into the values (o) or keys (dq) of positions ``poison_keys``.

    A key tile that a query block visits, even fully masked, multiplies its
    values by weights of 0: NaN * 0 = NaN reaches the output. So a query
    block whose output stays finite never loaded the poisoned tile.
    """
    n = ids.shape[-1]
    q = torch.randn(1, 1, n, 16, device=DEVICE, requires_grad=True)
    k, v = torch.randn(1, 1, n, 16, device=DEVICE), torch.randn(1, 1, n, 16, device=DEVICE)
    poisoned_v, poisoned_k = v.clone(), k.clone()
    poisoned_v[..., poison_keys, :] = float("nan")
    poisoned_k[..., poison_keys, :] = float("nan")
    o = IMPLEMENTATIONS[implementation](q, k, poisoned_v, document_ids=ids)
    (dq,) = torch.autograd.grad(IMPLEMENTATIONS[implementation](q, poisoned_k, v, document_ids=ids).sum(), q)
    return o[0, 0].isnan().any(-1), dq[0, 0].isnan().any(-1)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_key_tiles_of_other_documents_are_never_visited(implementation):
    # Documents of 32 tokens, a multiple of both implementations' key tiles
    # (16): a query of document 1 shares no key tile with document 0. Without
    # document ids the same poisoned keys of document 0 reach every later query.
    ids = _ids_from_lengths([32, 32, 32])[None]
    poison = slice(0, 32)  # all of document 0
    o_nan, dq_nan = _poisoned_outputs(implementation, poison, ids)
    assert o_nan[:32].all() and dq_nan[:32].all()  # document 0 itself reads its keys
    assert not o_nan[32:].any() and not dq_nan[32:].any()
    o_nan, dq_nan = _poisoned_outputs(implementation, poison, torch.zeros_like(ids))
    assert o_nan.all() and dq_nan.all()


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_query_tiles_of_other_documents_are_never_visited_for_dk_dv(implementation):
    # The dK/dV side: NaN in the queries and output gradients of document 1
    # must not reach the key gradients of documents 0 and 2.
    ids = _ids_from_lengths([32, 32, 32])[None]
    q = torch.randn(1, 1, 96, 16, device=DEVICE)
    k, v = (torch.randn(1, 1, 96, 16, device=DEVICE, requires_grad=True) for _ in range(2))
    q[..., 32:64, :] = float("nan")
    do = torch.randn(1, 1, 96, 16, device=DEVICE)
    do[..., 32:64, :] = float("nan")
    o = IMPLEMENTATIONS[implementation](q, k, v, document_ids=ids)
    dk, dv = torch.autograd.grad(o, (k, v), do)
    for grad, name in ((dk, "dk"), (dv, "dv")):
        rows_nan = grad[0, 0].isnan().any(-1)
        assert rows_nan[32:64].all(), name
        assert not rows_nan[:32].any() and not rows_nan[64:].any(), name


def test_many_short_documents_visit_fewer_key_tiles_than_plain_causal():
    # Counted through the twin: its loops are the kernel's programs and tiles.
    tiled_module = importlib.import_module("scratchlm.kernels.flash_attention_tiled")

    visits = []
    original = tiled_module._visible

    def counting_visible(*args):
        visits.append(args[:4])
        return original(*args)

    ids = _random_ids(1, 256, 24, seed=5)
    q = torch.randn(1, 1, 256, 16)
    counts = {}
    layouts = (("documents", ids), ("causal", None), ("48-token documents", torch.arange(256)[None] // 48))
    for name, document_ids in layouts:
        visits.clear()
        tiled_module._visible = counting_visible
        try:
            flash_attention_tiled(q, q, q, block_m=16, block_n=16, document_ids=document_ids)
        finally:
            tiled_module._visible = original
        counts[name] = len(visits)
    assert counts["causal"] == 16 * 17 // 2  # the lower triangle of 16 x 16 tiles
    starts, ends = document_spans(ids.cpu())[1:]
    # Query block b visits key tiles from its first document's start to its diagonal.
    expected = sum(b - int(starts[0, 16 * b]) // 16 + 1 for b in range(16))
    assert counts["documents"] == expected < counts["causal"] // 3
    assert counts["48-token documents"] == 31  # the README's example: 1 + 2 + 3 tiles per 3 query blocks


def test_traced_by_torch_compile_without_graph_breaks():
    q, k, v, _, _, ids = _inputs("queries-after-cache", torch.float32)  # causal, as flash_attention's default

    def attention_with_ids(q, k, v, ids):
        return flash_attention_with_lse(q, k, v, document_ids=ids)

    assert_compiled_matches_eager(attention_with_ids, q, k, v, ids)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize(
    "ids, error, match",
    [
        (torch.zeros(2, 8), TypeError, r"document_ids has dtype torch.float32; expected an integer dtype"),
        (torch.zeros(2, 9, dtype=torch.long), ValueError, r"document_ids has shape \(2, 9\); expected \(\.\.\., 1, 8\)"),
        (torch.zeros(2, 2, 8, dtype=torch.long), ValueError, r"broadcasts to \(2, 8\)"),
        (torch.zeros(3, 8, dtype=torch.long), ValueError, r"document_ids has shape \(3, 8\)"),
        (torch.zeros(2, 8, dtype=torch.long, device="meta"), ValueError, r"document_ids is on meta but q is on"),
        ([0] * 8, TypeError, r"document_ids must be a torch.Tensor or None, got list"),
    ],
)  # fmt: skip
def test_bad_document_ids_are_refused(implementation, ids, error, match):
    q = torch.ones(2, 2, 8, 16, device=DEVICE)
    with pytest.raises(error, match=match):
        IMPLEMENTATIONS[implementation](q, q, q, document_ids=ids)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_more_queries_than_keys_are_refused_with_document_ids(implementation):
    q, k = torch.ones(1, 1, 9, 16, device=DEVICE), torch.ones(1, 1, 8, 16, device=DEVICE)
    with pytest.raises(ValueError, match=r"q has 9 positions but k has 8; with document_ids"):
        IMPLEMENTATIONS[implementation](q, k, k, document_ids=torch.zeros(1, 8, dtype=torch.long, device=DEVICE))


@on_cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_large_layouts_on_the_gpu(head_dim, dtype):
    q = torch.randn(2, 8, 2048, head_dim, device=DEVICE, dtype=dtype)
    k = torch.randn(2, 2, 2048, head_dim, device=DEVICE, dtype=dtype)
    v, do = torch.randn_like(k), torch.randn_like(q)
    ids = _random_ids(2, 2048, 300, seed=6)
    got = _run("triton", q, k, v, do, True, ids)
    want = _reference(q, k, v, do, True, ids, dtype=torch.float32)
    same_dtype = torch_attention_same_dtype(q, k, v, do, True, ids)
    assert_each_within_torch_error(got, same_dtype, want, f" {dtype} D={head_dim}")
