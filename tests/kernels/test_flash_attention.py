"""The FlashAttention-2 kernels against float64 softmax attention, forward (o, logsumexp) and backward."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close, assert_within_torch_error
from scratchlm.kernels.flash_attention import backward_settings, flash_attention, forward_configs

# The module itself: the package may export a function under the same name.
flash_module = importlib.import_module("scratchlm.kernels.flash_attention")
attention_configs = importlib.import_module("scratchlm.kernels.flash_attention_configs")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
on_cuda_only = pytest.mark.skipif(not CUDA, reason="large shapes are for the GPU; the interpreter is too slow")
interpreter_only = pytest.mark.skipif(CUDA, reason="block sizes are autotuned on the GPU")

# (q shape, key length, causal). The interpreter runs 16 x 16 tiles, so 17,
# 97 and 130 leave ragged last tiles and the causal ones cross the diagonal.
CASES = [
    ((1, 1, 1, 16), 1, True),
    ((2, 3, 17, 32), 17, True),
    ((1, 2, 97, 64), 97, True),
    ((1, 1, 130, 128), 130, True),
    ((3, 33, 32), 33, True),  # (batch, seq, head_dim)
    ((24, 32), 40, True),  # (seq, head_dim), queries the last 24 of 40 positions
    ((1, 2, 5, 16), 37, True),  # Nq < Nk: decoding against a KV cache
    ((1, 2, 37, 16), 5, True),  # Nq > Nk: queries 0..31 see no key
    ((2, 2, 50, 64), 50, False),
    ((1, 2, 37, 16), 5, False),
    ((1, 2, 45, 40), 45, True),  # head_dim 40, padded to a 64-wide tile
]
LARGE_CASES = [
    pytest.param(((2, 8, 1024, 64), 1024, True), marks=on_cuda_only),
    pytest.param(((2, 8, 1024, 64), 1024, False), marks=on_cuda_only),
    pytest.param(((1, 4, 4096, 128), 4096, True), marks=on_cuda_only),
    pytest.param(((2, 4, 1000, 96), 1023, True), marks=on_cuda_only),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NAMES = ("o", "dq", "dk", "dv")


def _case_id(case):
    q_shape, k_len, causal = case
    return f"q{'x'.join(map(str, q_shape))}-nk{k_len}-{'causal' if causal else 'full'}"


def _inputs(q_shape, k_len, dtype):
    k_shape = (*q_shape[:-2], k_len, q_shape[-1])
    # q scaled up so that softmax rows are peaked and the running max moves.
    q = torch.randn(q_shape, device=DEVICE, dtype=torch.float32).mul(2).to(dtype)
    k = torch.randn(k_shape, device=DEVICE, dtype=dtype)
    v = torch.randn(k_shape, device=DEVICE, dtype=dtype)
    do = torch.randn(q_shape, device=DEVICE, dtype=dtype)
    return q, k, v, do


def _causal_mask(q_len, k_len):
    """True where query i may attend key j: j <= i + (k_len - q_len), aligned bottom-right."""
    return torch.ones(q_len, k_len, dtype=torch.bool, device=DEVICE).tril(k_len - q_len)


def _reference(q, k, v, do, causal, scale=None):
    """Explicit softmax attention in float64 by autograd: (o, logsumexp, dq, dk, dv)."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = q @ k.transpose(-2, -1) * scale
    if causal:
        mask = _causal_mask(q.shape[-2], k.shape[-2])
        sees_a_key = mask.any(dim=-1, keepdim=True)  # (Nq, 1)
        # Rows with no key get zeros in place of all -inf, then p = 0: no NaN in the reference either.
        scores = torch.where(sees_a_key, scores.masked_fill(~mask, float("-inf")), 0.0)
        lse = torch.logsumexp(scores, dim=-1).masked_fill(~sees_a_key.squeeze(-1), float("-inf"))
        p = torch.softmax(scores, dim=-1) * sees_a_key
    else:
        lse = torch.logsumexp(scores, dim=-1)
        p = torch.softmax(scores, dim=-1)
    o = p @ v
    o.backward(do.double())
    return o.detach(), lse.detach(), q.grad, k.grad, v.grad


def _torch_same_dtype(q, k, v, do, causal):
    """PyTorch's own scaled_dot_product_attention in the inputs' dtype: (o, dq, dk, dv).

    K/V with fewer heads than q go through SDPA's own grouped-query support.
    """
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    q_len, k_len = q.shape[-2], k.shape[-2]
    gqa = {"enable_gqa": True} if q.dim() >= 3 and k.shape[-3] != q.shape[-3] else {}
    if causal and q_len != k_len:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=_causal_mask(q_len, k_len), **gqa)
    else:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=causal, **gqa)
    o.backward(do)
    # Some backends give NaN where a row sees no key; the kernel's answer there is 0.
    return tuple(t.detach().nan_to_num(0.0) for t in (o, q.grad, k.grad, v.grad))


def _run_kernel(q, k, v, do, causal, scale=None):
    """(o, logsumexp, dq, dk, dv) from the kernels; logsumexp is the one saved for backward."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o = flash_attention(q, k, v, causal=causal, scale=scale)
    lse = o.grad_fn.saved_tensors[-1].view(q.shape[:-1])
    o.backward(do)
    return o.detach(), lse, q.grad, k.grad, v.grad


def _assert_float32_close(got, want, label=""):
    o, lse, *grads = got
    want_o, want_lse, *want_grads = want
    assert_close(o, want_o, atol=1e-5, rtol=1e-5, name=f"o{label}")
    assert_close(lse, want_lse, atol=1e-5, rtol=1e-5, name=f"logsumexp{label}")
    for g, w, name in zip(grads, want_grads, NAMES[1:]):
        assert_close(g, w, atol=2e-5, rtol=1e-4, name=f"{name}{label}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [*CASES, *LARGE_CASES], ids=_case_id)
def test_matches_float64_reference(case, dtype):
    q_shape, k_len, causal = case
    q, k, v, do = _inputs(q_shape, k_len, dtype)
    got = _run_kernel(q, k, v, do, causal)
    want = _reference(q, k, v, do, causal)
    o, lse, *grads = got
    assert o.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert lse.dtype == torch.float32
    assert not any(t.isnan().any() for t in got)
    if dtype == torch.float32:
        _assert_float32_close(got, want)
    else:
        # logsumexp is float32 math on the same (rounded) inputs, so it stays tight.
        assert_close(lse, want[1], atol=1e-5, rtol=1e-5, name=f"logsumexp {dtype}")
        same = _torch_same_dtype(q, k, v, do, causal)
        for g, t, w, name in zip((o, *grads), same, (want[0], *want[2:]), NAMES):
            assert_within_torch_error(g, t, w, name=f"{name} {dtype}")


# Query/key length pairs whose diagonal offset Nk - Nq takes the residues
# that move the loop bounds across a block edge: 0, +-1, +-2, 14, 15, 17, 30, 31 mod 16 or 32.
OFFSET_SWEEP = [(20, 20), (20, 21), (20, 22), (20, 34), (20, 35), (20, 37), (20, 50), (20, 51),
                (21, 20), (22, 20), (37, 5), (51, 20)]  # fmt: skip


@interpreter_only
@pytest.mark.parametrize("blocks", [(16, 16), (32, 16), (16, 32)])
def test_causal_loop_bounds_for_every_diagonal_offset(monkeypatch, blocks):
    # The diagonal loop bounds are computed from the query block in the forward
    # and dQ kernels and from the key block in the dK/dV kernel: they must hold
    # for every offset, and when the two block sizes differ as the GPU's tuned configs do.
    monkeypatch.setattr(flash_module, "INTERPRETER_BLOCKS", blocks)
    for q_len, k_len in OFFSET_SWEEP:
        q, k, v, do = _inputs((1, 1, q_len, 16), k_len, torch.float32)
        label = f" blocks {blocks}, Nq={q_len}, Nk={k_len}"
        _assert_float32_close(_run_kernel(q, k, v, do, True), _reference(q, k, v, do, True), label)


# On the GPU the tiles are 32 to 128 wide: offsets around those edges, and lengths over two tiles.
CUDA_OFFSET_SWEEP = [(130, 130 + offset) for offset in (0, 1, 2, 31, 32, 33, 63, 64, 65, 127, 128, 129)]
CUDA_OFFSET_SWEEP += [(131, 130), (200, 71), (257, 1), (1, 257)]


@on_cuda_only
@pytest.mark.parametrize("head_dim", [64, 128])
def test_causal_loop_bounds_for_every_diagonal_offset_in_every_autotuned_config(monkeypatch, head_dim):
    # The autotuner would pick one config per length bucket; each candidate is pinned in turn, so
    # the bounds are checked for every tile shape the GPU may run (the backward's settings are fixed).
    import triton

    configs = flash_module.forward_configs(head_dim, 4, attention_configs.shared_memory_per_block(0))
    for config in configs:
        pinned = triton.autotune(configs=[config], key=["q_len_bucket"])(flash_module._flash_attention_fwd_kernel)
        monkeypatch.setattr(flash_module, "_forward_autotuner", lambda *args, kernel=pinned: kernel)
        for q_len, k_len in CUDA_OFFSET_SWEEP:
            q, k, v, do = _inputs((1, 2, q_len, head_dim), k_len, torch.float32)
            label = f" config {config}, Nq={q_len}, Nk={k_len}"
            _assert_float32_close(_run_kernel(q, k, v, do, True), _reference(q, k, v, do, True), label)


def test_bfloat16_outputs_round_to_nearest():
    # Two identical keys: p = (1/2, 1/2) exactly, so o = (v0 + v1) / 2 is exact
    # in float32 and the stored bfloat16 must be that value rounded to nearest
    # (as torch rounds), not truncated.
    q = torch.randn(1, 8, 32, device=DEVICE, dtype=torch.bfloat16)
    k = torch.randn(1, 1, 32, device=DEVICE, dtype=torch.bfloat16).expand(1, 2, 32)
    v = torch.randn(1, 2, 32, device=DEVICE, dtype=torch.bfloat16)
    o = flash_attention(q, k, v, causal=False)
    want = ((v[:, 0].float() + v[:, 1].float()) / 2).to(torch.bfloat16).expand(1, 8, 32)
    assert torch.equal(o, want)


@pytest.mark.parametrize("scale", [0.3, 1])
@pytest.mark.parametrize("causal", [True, False])
def test_custom_scale(scale, causal):
    q, k, v, do = _inputs((1, 2, 33, 32), 33, torch.float32)
    got = _run_kernel(q, k, v, do, causal, scale=scale)
    _assert_float32_close(got, _reference(q, k, v, do, causal, scale=scale), f" scale={scale}")
    default = _reference(q, k, v, do, causal)[0]
    assert (got[0].double() - default).abs().max() > 1e-2


@pytest.mark.parametrize(
    "q_shape, k_len, dtype",
    [((1, 2, 97, 64), 97, torch.float32), ((2, 1, 40, 32), 33, torch.bfloat16),
     pytest.param((2, 8, 1024, 64), 1024, torch.bfloat16, marks=on_cuda_only)],
)  # fmt: skip
def test_backward_is_bitwise_deterministic(q_shape, k_len, dtype):
    q, k, v, do = _inputs(q_shape, k_len, dtype)
    first, second = _run_kernel(q, k, v, do, True), _run_kernel(q, k, v, do, True)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_that_see_no_key_give_zeros_not_nan(dtype):
    # 37 queries on 5 keys: query i sees keys 0 .. i - 32, so rows 0..31 see none.
    q, k, v, do = _inputs((2, 2, 37, 16), 5, dtype)
    o, lse, dq, dk, dv = _run_kernel(q * 100, k * 100, v, do, True)  # huge scores too
    assert not any(t.isnan().any() for t in (o, lse, dq, dk, dv))
    assert torch.equal(o[..., :32, :], torch.zeros_like(o[..., :32, :]))
    assert torch.equal(dq[..., :32, :], torch.zeros_like(dq[..., :32, :]))
    assert torch.isneginf(lse[..., :32]).all() and torch.isfinite(lse[..., 32:]).all()
    assert (o[..., 32:, :] != 0).any() and (dk != 0).any()


def test_non_contiguous_inputs():
    q = torch.randn(2, 20, 3, 32, device=DEVICE).transpose(1, 2)  # (B, H, N, D) view of (B, N, H, D)
    k = torch.randn(2, 3, 32, 20, device=DEVICE).transpose(-2, -1)  # last dim strided
    v = torch.randn(2, 3, 20, 64, device=DEVICE)[..., ::2]
    do = torch.randn(2, 20, 3, 32, device=DEVICE).transpose(1, 2)
    _assert_float32_close(_run_kernel(q, k, v, do, True), _reference(q, k, v, do, True))


def test_strided_heads_are_read_in_place():
    # With batch 1, (1, N, H, D).transpose(1, 2) flattens to (H, N, D) without
    # a copy: the kernels then read it through its strides (D, H * D, 1).
    q = torch.randn(1, 20, 3, 32, device=DEVICE).transpose(1, 2).requires_grad_()
    k = torch.randn(1, 30, 3, 32, device=DEVICE).transpose(1, 2)
    v = torch.randn(1, 30, 3, 32, device=DEVICE).transpose(1, 2)
    o = flash_attention(q, k, v)
    saved_q, saved_k, saved_v = o.grad_fn.saved_tensors[:3]
    assert saved_q.data_ptr() == q.data_ptr() and saved_q.stride() == (32, 96, 1)
    assert saved_k.data_ptr() == k.data_ptr() and saved_v.data_ptr() == v.data_ptr()
    do = torch.randn(1, 20, 3, 32, device=DEVICE).transpose(1, 2)
    _assert_float32_close(_run_kernel(q, k, v, do, True), _reference(q, k, v, do, True))


def test_saves_inputs_output_and_a_float32_logsumexp_only():
    q, k, v, _ = _inputs((2, 3, 17, 32), 17, torch.bfloat16)
    o = flash_attention(q.requires_grad_(), k, v)
    saved = list(o.grad_fn.saved_tensors)  # no document table without document_ids
    assert [tuple(t.shape) for t in saved] == [(6, 17, 32)] * 4 + [(2, 3, 17)]
    assert saved[-1].dtype == torch.float32
    assert saved[0].data_ptr() == q.data_ptr()  # contiguous inputs are not copied


def test_inputs_untouched_by_forward_and_backward():
    q, k, v, do = _inputs((1, 2, 21, 32), 21, torch.bfloat16)
    for t in (q, k, v):
        t.requires_grad_()
    before = [t.detach().clone() for t in (q, k, v, do)]
    flash_attention(q, k, v).backward(do)
    assert all(torch.equal(t.detach(), b) for t, b in zip((q, k, v, do), before))


def test_empty_sequences():
    q, k, v, do = _inputs((1, 2, 4, 16), 0, torch.float32)
    o, lse, dq, dk, dv = _run_kernel(q, k, v, do, False)  # no key at all: every row outputs 0
    assert torch.equal(o, torch.zeros_like(o)) and torch.equal(dq, torch.zeros_like(dq))
    assert torch.isneginf(lse).all() and dk.shape == (1, 2, 0, 16)
    q, k, v, do = _inputs((1, 2, 0, 16), 6, torch.float32)
    o, _, dq, dk, dv = _run_kernel(q, k, v, do, True)
    assert o.shape == (1, 2, 0, 16) and torch.equal(dk, torch.zeros_like(dk)) and torch.equal(dv, torch.zeros_like(dv))


def test_traced_by_torch_compile_without_graph_breaks():
    backend = "inductor" if CUDA else "aot_eager"
    compiled = torch.compile(lambda q, k, v: (flash_attention(q, k, v) * 2).sum(), fullgraph=True, backend=backend)
    q, k, v, _ = _inputs((2, 2, 19, 32), 19, torch.float32)
    for t in (q, k, v):
        t.requires_grad_()
    out = compiled(q, k, v)
    out.backward()
    eager = _run_kernel(q, k, v, torch.full_like(q, 2.0), True)
    assert_close(out, eager[0].sum() * 2, atol=1e-4, rtol=1e-6, name="output under compile")
    for got, want, name in zip((q.grad, k.grad, v.grad), eager[2:], NAMES[1:]):
        assert_close(got, want, atol=1e-6, rtol=1e-6, name=f"{name} under compile")


@pytest.mark.parametrize("block_d", [16, 64, 128, 256])
@pytest.mark.parametrize("element_size", [2, 4])
@pytest.mark.parametrize("shared_memory", [101376, 232448])  # bytes per block: consumer GPUs, H100
def test_forward_configs_fit_the_head_dim(block_d, element_size, shared_memory):
    configs = forward_configs(block_d, element_size, shared_memory)
    assert configs
    for c in configs:
        block_m, block_n = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        tiles = (block_m + 2 * block_n * c.num_stages) * block_d * element_size
        assert tiles <= shared_memory or c.num_stages == 1
        # A 128 x 128 float32 accumulator needs 8 warps (64 values per thread).
        assert block_m * block_d <= 64 * 32 * c.num_warps
    if block_d == 16:  # small tiles: everything fits but 8 warps on 64 rows and 4 stages past 32 keys
        assert len(configs) == 14


def test_backward_settings_rule():
    h100, a100, consumer = 232448, 166912, 101376  # shared memory per block, bytes
    assert backward_settings(64, 2, h100) == {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
    assert backward_settings(128, 2, h100) == {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2}
    assert backward_settings(128, 4, h100)["BLOCK_M"] == 32
    assert backward_settings(256, 2, h100) == {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 8, "num_stages": 1}
    # Smaller GPUs: fewer stages first, then smaller blocks.
    assert backward_settings(128, 2, consumer) == {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 8, "num_stages": 1}
    assert backward_settings(256, 4, a100) == {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 8, "num_stages": 1}
    for block_d in (16, 32, 64, 128, 256):
        for element_size in (2, 4):
            for shared_memory in (h100, a100, consumer):
                s = backward_settings(block_d, element_size, shared_memory)
                need = attention_configs.backward_shared_bytes(s["BLOCK_M"], s["BLOCK_N"], s["num_stages"], block_d,
                                                           element_size)  # fmt: skip
                assert need <= shared_memory, (block_d, element_size, shared_memory)


@pytest.mark.parametrize(
    "q, k, v, kwargs, error, match",
    [
        (torch.ones(1, 4, 8, dtype=torch.int32), torch.ones(1, 4, 8), torch.ones(1, 4, 8), {}, TypeError,
         "q has dtype torch.int32"),
        (torch.ones(1, 4, 8), torch.ones(1, 4, 8, dtype=torch.float16), torch.ones(1, 4, 8), {}, TypeError,
         "k has dtype torch.float16 but q has torch.float32"),
        (torch.ones(1, 4, 8), torch.ones(1, 4, 8), torch.ones(1, 4, 8, device="meta"), {}, ValueError,
         "v is on meta but q is on cpu"),
        (torch.ones(8), torch.ones(8), torch.ones(8), {}, ValueError, r"q has shape \(8,\); expected \(\.\.\., seq"),
        (torch.ones(2, 4, 8), torch.ones(3, 4, 8), torch.ones(3, 4, 8), {}, ValueError,
         r"k has shape \(3, 4, 8\) but q has \(2, 4, 8\); expected \(2, Nk, 8\)"),
        (torch.ones(1, 4, 8), torch.ones(1, 4, 16), torch.ones(1, 4, 16), {}, ValueError, "k has shape"),
        (torch.ones(1, 4, 8), torch.ones(4, 8), torch.ones(4, 8), {}, ValueError, "k has shape"),
        (torch.ones(1, 4, 8), torch.ones(1, 4, 8), torch.ones(1, 5, 8), {}, ValueError,
         r"v has shape \(1, 5, 8\) but k has \(1, 4, 8\)"),
        (torch.ones(1, 4, 512), torch.ones(1, 4, 512), torch.ones(1, 4, 512), {}, ValueError,
         "q has head_dim 512; expected 1 to 256"),
        (torch.ones(1, 4, 0), torch.ones(1, 4, 0), torch.ones(1, 4, 0), {}, ValueError, "q has head_dim 0"),
        (torch.ones(1, 4, 8), torch.ones(1, 4, 8), torch.ones(1, 4, 8), {"scale": float("nan")}, ValueError,
         "scale is nan"),
        (torch.ones(1, 4, 8), torch.ones(1, 4, 8), torch.ones(1, 4, 8), {"scale": "0.5"}, ValueError, "scale is '0.5'"),
        (torch.ones(1, 4, 8), torch.ones(1, 4, 8), torch.ones(1, 4, 8), {"causal": 1}, TypeError, "causal is 1"),
        ([1.0], torch.ones(1, 4, 8), torch.ones(1, 4, 8), {}, TypeError, "q must be a torch.Tensor"),
    ],
)  # fmt: skip
def test_bad_input_is_refused(q, k, v, kwargs, error, match):
    with pytest.raises(error, match=match):
        flash_attention(q, k, v, **kwargs)


@pytest.mark.skipif(CUDA, reason="checks the error for CPU tensors without the interpreter")
def test_cpu_tensors_without_interpreter_are_refused(monkeypatch):
    monkeypatch.setattr(flash_module, "INTERPRETING", False)
    with pytest.raises(ValueError, match="q is on cpu; the Triton kernels need a CUDA device"):
        flash_attention(torch.ones(1, 4, 8), torch.ones(1, 4, 8), torch.ones(1, 4, 8))


@on_cuda_only
def test_offsets_past_2_to_the_31_elements():
    # 16400 heads of 1024 x 128 bfloat16: 2.15e9 elements per tensor, so the
    # last heads start past 2^31 and need int64 offsets; only they are checked.
    free, _ = torch.cuda.mem_get_info()
    if free < 40 * 2**30:
        pytest.skip("needs about 35 GiB of free GPU memory")
    q, k, v, do = (torch.randn(16400, 1024, 128, device=DEVICE, dtype=torch.bfloat16) for _ in range(4))
    assert q.numel() > 2**31
    tails = [t[-2:].clone() for t in (q, k, v, do)]
    for t in (q, k, v):
        t.requires_grad_()
    o = flash_attention(q, k, v)
    o.backward(do)
    got = [t[-2:].clone() for t in (o.detach(), q.grad, k.grad, v.grad)]
    del q, k, v, do, o
    want = _reference(*tails, True)
    same = _torch_same_dtype(*tails, True)
    for g, t, w, name in zip(got, same, (want[0], *want[2:]), NAMES):
        assert_within_torch_error(g, t, w, name=f"{name}, last heads")
