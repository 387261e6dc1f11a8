"""The pure-PyTorch tiled FlashAttention-2 against explicit softmax attention in float64."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from attention_reference import assert_attention_close, assert_each_within_torch_error
from attention_reference import attention_reference, run_attention
from helpers import assert_close
from scratchlm.kernels.flash_attention_tiled import (
    flash_attention_tiled,
    flash_attention_tiled_with_lse,
    tiled_backward,
    tiled_forward,
)
from scratchlm.model.functional import causal_attention, causal_mask

LEADING = (2, 3)  # batch, heads
HEAD_DIM = 24
# (Nq, Nk): equal, odd, single; Nq < Nk (queries after a KV cache); Nq > Nk (the
# first Nq - Nk queries see no key when causal).
LENGTHS = [(1, 1), (17, 17), (97, 97), (128, 128), (130, 130), (17, 97), (1, 130), (97, 17), (130, 1)]
# (block_m, block_n): 16 and 32 divide 128 but not 17, 97 or 130.
BLOCKS = [(16, 16), (32, 16), (16, 32)]
# dtype, atol, rtol of the output and gradients against float64 math.
EXACT_DTYPES = [(torch.float64, 1e-12, 1e-10), (torch.float32, 3e-5, 1e-4)]


def _inputs(num_queries, num_keys, dtype, leading=LEADING, head_dim=HEAD_DIM, kv_leading=None):
    """Random (q, k, v, do); k and v have ``kv_leading`` dims (K/V heads last) where given, else q's."""
    kv_leading = leading if kv_leading is None else kv_leading
    q = torch.randn(*leading, num_queries, head_dim, dtype=dtype)
    k = torch.randn(*kv_leading, num_keys, head_dim, dtype=dtype)
    v = torch.randn(*kv_leading, num_keys, head_dim, dtype=dtype)
    do = torch.randn(*leading, num_queries, head_dim, dtype=dtype)
    return q, k, v, do


def _run_tiled(q, k, v, do, causal=True, scale=None, block_m=64, block_n=64):
    """(o, lse, dq, dk, dv) from the tiled twin with ``block_m`` x ``block_n`` tiles."""
    options = {"causal": causal, "scale": scale, "block_m": block_m, "block_n": block_n}
    return run_attention(flash_attention_tiled_with_lse, q, k, v, do, **options)


def _assert_16_bit_within_torch_error(q, k, v, do, causal, dtype):
    """The twin on 16-bit inputs: o and gradients by the three-way rule against explicit attention
    in ``dtype``, the logsumexp close to float64's; returns the twin's results."""
    got = _run_tiled(q, k, v, do, causal, None, 32, 16)
    want = attention_reference(q, k, v, do, causal)
    torch_same_dtype = attention_reference(q, k, v, do, causal, dtype=dtype)
    # The logsumexp is float32 math on 16-bit inputs: only float32 rounding away from float64.
    assert_close(got.lse, want.lse, atol=1e-4, rtol=1e-5, name=f"lse {dtype}")
    assert_each_within_torch_error(got.without_lse(), torch_same_dtype.without_lse(), want.without_lse(), f" {dtype}")
    return got


def _gradcheck_with_small_tiles(q, k, v, causal):
    """torch.autograd.gradcheck of the twin with scale 0.8 and 2 x 3 tiles, so every path crosses tile edges."""
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def attention(q, k, v):
        return flash_attention_tiled(q, k, v, causal, 0.8, 2, 3)

    return torch.autograd.gradcheck(attention, (q, k, v))


@pytest.mark.parametrize("dtype, atol, rtol", EXACT_DTYPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("block_m, block_n", BLOCKS)
@pytest.mark.parametrize("num_queries, num_keys", LENGTHS)
def test_matches_float64_reference(num_queries, num_keys, block_m, block_n, causal, dtype, atol, rtol):
    q, k, v, do = _inputs(num_queries, num_keys, dtype)
    got = _run_tiled(q, k, v, do, causal, None, block_m, block_n)
    assert got[0].dtype == dtype and all(g.dtype == dtype for g in got[2:])
    assert got[1].dtype == dtype and got[1].shape == (*LEADING, num_queries)  # float32 lse, float64 for float64
    want = attention_reference(q, k, v, do, causal)
    assert_attention_close(got, want, atol=atol, rtol=rtol)


@pytest.mark.parametrize("scale", [0.05, 0.3, 2.0])
@pytest.mark.parametrize("causal", [True, False])
def test_custom_scale(scale, causal):
    q, k, v, do = _inputs(45, 70, torch.float64)
    got = _run_tiled(q, k, v, do, causal, scale, 16, 32)
    want = attention_reference(q, k, v, do, causal, scale)
    assert_attention_close(got, want, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("block_m, block_n", [(64, 64), (256, 7), (1, 1), (13, 200)])
def test_block_sizes_larger_smaller_and_odd(block_m, block_n):
    q, k, v, do = _inputs(50, 61, torch.float64, leading=(2,))
    got = _run_tiled(q, k, v, do, True, None, block_m, block_n)
    want = attention_reference(q, k, v, do, True)
    assert_attention_close(got, want, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("num_queries, num_keys", [(64, 64), (40, 100)])
def test_agrees_with_the_models_causal_attention(num_queries, num_keys):
    q, k, v, _ = _inputs(num_queries, num_keys, torch.float64)
    assert_close(
        flash_attention_tiled(q, k, v, block_m=16, block_n=16),
        causal_attention(q, k, v),
        atol=1e-12,
        rtol=1e-10,
        name="o vs model.functional.causal_attention",
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("num_queries, num_keys", [(97, 97), (17, 97), (130, 17)])
def test_low_precision_within_torch_error(num_queries, num_keys, causal, dtype):
    q, k, v, do = _inputs(num_queries, num_keys, dtype)
    q = q * 2  # sharper softmax rows: bigger differences between exact and 16-bit math
    got = _assert_16_bit_within_torch_error(q, k, v, do, causal, dtype)
    assert got[0].dtype == dtype and all(g.dtype == dtype for g in got[2:])
    assert got[1].dtype == torch.float32


@pytest.mark.parametrize("num_keys", [0, 1, 5])
def test_queries_without_keys_give_zero_not_nan(num_keys):
    num_queries = 20
    q, k, v, do = _inputs(num_queries, num_keys, torch.float32)
    o, lse, dq, dk, dv = _run_tiled(q, k, v, do, True, None, 8, 4)
    for tensor, name in ((o, "o"), (dq, "dq"), (dk, "dk"), (dv, "dv")):
        assert not tensor.isnan().any(), f"{name} holds NaN"
    empty = num_queries - num_keys  # causal: queries 0 .. Nq - Nk - 1 see no key
    assert torch.equal(o[..., :empty, :], torch.zeros_like(o[..., :empty, :]))
    assert torch.equal(dq[..., :empty, :], torch.zeros_like(dq[..., :empty, :]))
    assert torch.isneginf(lse[..., :empty]).all() and torch.isfinite(lse[..., empty:]).all()
    want = attention_reference(q, k, v, do, True)
    assert_attention_close((o, lse, dq, dk, dv), want, atol=3e-5, rtol=1e-4)


@pytest.mark.parametrize("causal", [True, False])
def test_no_keys_at_all(causal):
    q, k, v, do = _inputs(6, 0, torch.float32)
    o, lse, dq, dk, dv = _run_tiled(q, k, v, do, causal)
    assert torch.equal(o, torch.zeros_like(o)) and torch.equal(dq, torch.zeros_like(dq))
    assert torch.isneginf(lse).all() and dk.shape == k.shape and dv.shape == v.shape


def test_no_queries():
    q, k, v, do = _inputs(0, 9, torch.float32)
    o, lse, dq, dk, dv = _run_tiled(q, k, v, do)
    assert o.shape == q.shape and lse.shape == (*LEADING, 0)
    assert torch.equal(dk, torch.zeros_like(dk)) and torch.equal(dv, torch.zeros_like(dv))


@pytest.mark.parametrize(
    "num_queries, num_keys, causal", [(5, 5, True), (5, 7, True), (7, 4, True), (5, 7, False)]
)
def test_gradcheck_float64(num_queries, num_keys, causal):
    q, k, v, _ = _inputs(num_queries, num_keys, torch.float64, leading=(1, 2), head_dim=3)
    assert _gradcheck_with_small_tiles(q, k, v, causal)


@pytest.mark.parametrize("leading", [(), (2, 2, 3)])
def test_any_leading_dims(leading):
    q, k, v, do = _inputs(33, 40, torch.float64, leading=leading)
    got = _run_tiled(q, k, v, do, True, None, 16, 16)
    want = attention_reference(q, k, v, do, True)
    assert_attention_close(got, want, atol=1e-12, rtol=1e-10)


def test_non_contiguous_inputs_and_inputs_untouched():
    # The layout a model produces before moving heads forward: (batch, seq, heads, D).
    q = torch.randn(2, 37, 3, HEAD_DIM, dtype=torch.float64).transpose(1, 2)
    k = torch.randn(2, 50, 3, HEAD_DIM, dtype=torch.float64).transpose(1, 2)
    v = torch.randn(2, 3, 50, 2 * HEAD_DIM, dtype=torch.float64)[..., ::2]
    do = torch.randn(2, 3, 37, HEAD_DIM, dtype=torch.float64)
    before = [t.clone() for t in (q, k, v, do)]
    got = _run_tiled(q, k, v, do, True, None, 16, 16)
    want = attention_reference(q, k, v, do, True)
    assert_attention_close(got, want, atol=1e-12, rtol=1e-10)
    assert all(torch.equal(t, b) for t, b in zip((q, k, v, do), before))


class _TensorRecorder(TorchFunctionMode):
    """Counts matrix products and records the largest tensor any torch function returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.matmuls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if func in (torch.matmul, torch.Tensor.__matmul__, torch.Tensor.matmul):
            self.matmuls += 1
        for tensor in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return result


def _forward_backward_recorded(q, k, v, causal, block_m, block_n):
    """Run the tiled forward and backward under recorders: (forward recorder, backward recorder)."""
    scale = q.shape[-1] ** -0.5
    with _TensorRecorder() as forward:
        o, lse = tiled_forward(q, k, v, causal, scale, block_m, block_n)
    with _TensorRecorder() as backward:
        tiled_backward(q, k, v, o, lse, torch.randn_like(o), causal, scale, block_m, block_n)
    return forward, backward


def test_never_materialises_the_full_score_matrix():
    n, head_dim, block = 256, 8, 32
    q, k, v = (torch.randn(1, n, head_dim) for _ in range(3))
    forward, backward = _forward_backward_recorded(q, k, v, True, block, block)
    # Largest allowed: an (N, D) tensor (2048 here) or a tile (1024); N x N is 65536.
    assert forward.largest <= n * head_dim and backward.largest <= n * head_dim
    # The recorder does see an N x N matrix where one exists (so this test can fail).
    with _TensorRecorder() as explicit:
        causal_attention(q, k, v)
    assert explicit.largest >= n * n


@pytest.mark.parametrize(
    "num_queries, num_keys, block_m, block_n",
    [(128, 128, 32, 32), (64, 128, 32, 32), (128, 48, 16, 32), (100, 100, 16, 24), (30, 130, 8, 16)],
)
def test_causal_tiles_above_the_diagonal_are_skipped(num_queries, num_keys, block_m, block_n):
    mask = causal_mask(num_queries, num_keys)
    needed = sum(
        bool(mask[i : i + block_m, j : j + block_n].any())
        for i in range(0, num_queries, block_m)
        for j in range(0, num_keys, block_n)
    )
    all_tiles = -(-num_queries // block_m) * -(-num_keys // block_n)
    assert needed < all_tiles  # the shapes are chosen so that skipping is visible
    q = torch.randn(1, num_queries, 8)
    k, v = torch.randn(1, num_keys, 8), torch.randn(1, num_keys, 8)
    forward, backward = _forward_backward_recorded(q, k, v, True, block_m, block_n)
    # Per computed tile: S = Q K^T and P V forward; S, P^T dO, dO V^T, dS K, dS^T Q backward.
    assert forward.matmuls == 2 * needed
    assert backward.matmuls == 5 * needed
    non_causal_forward, _ = _forward_backward_recorded(q, k, v, False, block_m, block_n)
    assert non_causal_forward.matmuls == 2 * all_tiles


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((torch.ones(2, 4, dtype=torch.int64),) * 3, {}, TypeError, "q has dtype torch.int64"),
        ((torch.ones(2, 4), torch.ones(2, 4, dtype=torch.float16), torch.ones(2, 4)), {}, TypeError,
         "k has dtype torch.float16 but q has torch.float32"),
        ((torch.ones(4),) * 3, {}, ValueError, r"q has shape \(4,\); expected \(\.\.\., seq, head_dim\)"),
        ((torch.ones(2, 3, 4), torch.ones(3, 3, 4), torch.ones(3, 3, 4)), {}, ValueError,
         r"k has shape \(3, 3, 4\) but q has \(2, 3, 4\)"),
        ((torch.ones(3, 4), torch.ones(3, 5), torch.ones(3, 5)), {}, ValueError, "same leading dims and head_dim"),
        ((torch.ones(3, 4), torch.ones(3, 4), torch.ones(2, 4)), {}, ValueError,
         r"v has shape \(2, 4\) but k has \(3, 4\)"),
        ((torch.ones(3, 4),) * 3, {"block_m": 0}, ValueError, "block_m is 0; expected a positive int"),
        ((torch.ones(3, 4),) * 3, {"block_n": 16.0}, ValueError, "block_n is 16.0"),
        (([1.0],) * 3, {}, TypeError, "q must be a torch.Tensor"),
    ],
)
def test_bad_input_is_refused(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        flash_attention_tiled(*args, **kwargs)


# Grouped-query attention: (dims before the heads, query heads Hq, K/V heads Hkv).
# Groups of 1, 2 and 4 query heads per K/V head, MQA (Hkv = 1), a group of 3
# with no batch dim, and two leading dims.
GQA_HEADS = [((2,), 2, 2), ((2,), 4, 2), ((1,), 8, 2), ((2,), 4, 1), ((), 6, 3), ((2, 1), 4, 1)]
GQA_LENGTHS = [(17, 17), (37, 37), (17, 97), (97, 17)]


def _gqa_inputs(leading, q_heads, kv_heads, num_queries, num_keys, dtype, head_dim=HEAD_DIM):
    """Random (q, k, v, do) with ``q_heads`` query heads and ``kv_heads`` K/V heads after ``leading``."""
    return _inputs(num_queries, num_keys, dtype, (*leading, q_heads), head_dim, kv_leading=(*leading, kv_heads))


@pytest.mark.parametrize("dtype, atol, rtol", EXACT_DTYPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("num_queries, num_keys", GQA_LENGTHS)
@pytest.mark.parametrize("leading, q_heads, kv_heads", GQA_HEADS)
def test_grouped_query_attention_matches_float64_reference(
    leading, q_heads, kv_heads, num_queries, num_keys, causal, dtype, atol, rtol
):
    q, k, v, do = _gqa_inputs(leading, q_heads, kv_heads, num_queries, num_keys, dtype)
    got = _run_tiled(q, k, v, do, causal, None, 16, 32)
    assert got[0].shape == q.shape and got[2].shape == q.shape
    assert got[3].shape == k.shape and got[4].shape == v.shape  # one gradient per K/V head, not per query head
    want = attention_reference(q, k, v, do, causal)
    assert_attention_close(got, want, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("num_queries, num_keys", [(37, 37), (17, 97), (97, 17)])
@pytest.mark.parametrize("leading, q_heads, kv_heads", [((2,), 4, 2), ((1,), 4, 1)])
def test_grouped_query_attention_low_precision_within_torch_error(
    leading, q_heads, kv_heads, num_queries, num_keys, causal, dtype
):
    q, k, v, do = _gqa_inputs(leading, q_heads, kv_heads, num_queries, num_keys, dtype)
    q = q * 2
    _assert_16_bit_within_torch_error(q, k, v, do, causal, dtype)


def test_grouped_query_attention_gradcheck_float64():
    q, k, v, _ = _gqa_inputs((1,), 4, 2, 5, 7, torch.float64, head_dim=3)
    assert _gradcheck_with_small_tiles(q, k, v, True)


def test_grouped_query_attention_never_repeats_k_or_v():
    # One K/V head shared by 8 query heads. A repeated K would hold
    # 8 x 128 x 16 = 16384 numbers; the largest tensor allowed is k itself
    # (2048) or a tile for the whole group, such as the group's partial dK
    # tile (8 x 32 x 16 = 4096) before its sum. Each tile is one batched
    # product for all 8 heads, so the product count does not grow with the group.
    group, num_queries, num_keys, head_dim, block = 8, 4, 128, 16, 32
    q = torch.randn(1, group, num_queries, head_dim)  # (K/V heads, G, Nq, D)
    k, v = torch.randn(1, num_keys, head_dim), torch.randn(1, num_keys, head_dim)
    forward, backward = _forward_backward_recorded(q, k, v, False, block, block)
    allowed = max(k.numel(), group * block * head_dim)
    assert forward.largest <= allowed and backward.largest <= allowed < group * k.numel()
    tiles = -(-num_queries // block) * -(-num_keys // block)
    assert forward.matmuls == 2 * tiles and backward.matmuls == 5 * tiles


@pytest.mark.parametrize(
    "q_shape, k_shape, match",
    [
        ((2, 6, 5, 4), (2, 4, 5, 4), r"q's 6 heads are not a multiple of k's 4"),
        ((2, 2, 5, 4), (2, 4, 5, 4), r"q's 2 heads are not a multiple of k's 4"),
        ((2, 4, 5, 4), (1, 2, 5, 4), r"expected \(2, 4, Nk, 4\), or \(2, Hkv, Nk, 4\).*dims before the heads differ"),
        ((2, 4, 5, 4), (2, 2, 5, 8), r"head_dim 8 is not q's 4"),
        ((4, 5, 4), (2, 4, 5, 4), r"k has 4 dims where q has 3"),
    ],
)
def test_bad_head_counts_are_refused(q_shape, k_shape, match):
    with pytest.raises(ValueError, match=match):
        flash_attention_tiled(torch.ones(q_shape), torch.ones(k_shape), torch.ones(k_shape))
