"""The FlashAttention-2 kernels against float64 softmax attention, forward (o, logsumexp) and backward."""

from __future__ import annotations

import importlib

import pytest
import torch

from attention_reference import DEVICE, attention_inputs, attention_reference, run_attention, torch_attention_same_dtype
from attention_reference import assert_attention_close, assert_compiled_matches_eager, assert_each_within_torch_error
from attention_reference import assert_kernel_matches_reference
from scratchlm.kernels.flash_attention import flash_attention, flash_attention_with_lse
from scratchlm.kernels.flash_attention_kernels import flash_attention_fwd_kernel

# The module itself: the package may export a function under the same name.
flash_module = importlib.import_module("scratchlm.kernels.flash_attention")
attention_configs = importlib.import_module("scratchlm.kernels.flash_attention_configs")

CUDA = torch.cuda.is_available()
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


def _case_id(case):
    q_shape, k_len, causal = case
    return f"q{'x'.join(map(str, q_shape))}-nk{k_len}-{'causal' if causal else 'full'}"


# o and logsumexp, then dq, dk, dv, against float64 math.
FLOAT32_TOLERANCE = {"atol": 1e-5, "rtol": 1e-5, "grad_atol": 2e-5, "grad_rtol": 1e-4}


def _run_kernel(q, k, v, do, causal, scale=None):
    """(o, logsumexp, dq, dk, dv) from the kernels."""
    return run_attention(flash_attention_with_lse, q, k, v, do, causal=causal, scale=scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [*CASES, *LARGE_CASES], ids=_case_id)
def test_matches_float64_reference(case, dtype):
    q_shape, k_len, causal = case
    q, k, v, do = attention_inputs(q_shape, k_len, dtype)
    got = _run_kernel(q, k, v, do, causal)
    o, lse, *grads = got
    assert o.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert lse.dtype == torch.float32
    assert_kernel_matches_reference(got, q, k, v, do, causal, FLOAT32_TOLERANCE)


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
        q, k, v, do = attention_inputs((1, 1, q_len, 16), k_len, torch.float32)
        label = f" blocks {blocks}, Nq={q_len}, Nk={k_len}"
        want = attention_reference(q, k, v, do, True)
        assert_attention_close(_run_kernel(q, k, v, do, True), want, **FLOAT32_TOLERANCE, label=label)


# On the GPU the tiles are 32 to 128 wide: offsets around those edges, and lengths over two tiles.
CUDA_OFFSET_SWEEP = [(130, 130 + offset) for offset in (0, 1, 2, 31, 32, 33, 63, 64, 65, 127, 128, 129)]
CUDA_OFFSET_SWEEP += [(131, 130), (200, 71), (257, 1), (1, 257)]


@on_cuda_only
@pytest.mark.parametrize("head_dim", [64, 128])
def test_causal_loop_bounds_for_every_diagonal_offset_in_every_autotuned_config(monkeypatch, head_dim):
    # The autotuner would pick one config per length bucket; each candidate is pinned in turn, so
    # the bounds are checked for every tile shape the GPU may run (the backward's settings are fixed).
    import triton

    device = (attention_configs.device_capability(0), attention_configs.shared_memory_per_block(0))
    configs = attention_configs.forward_configs(head_dim, 4, *device)
    for config in configs:
        pinned = triton.autotune(configs=[config], key=["q_len_bucket"])(flash_attention_fwd_kernel)
        monkeypatch.setattr(flash_module, "_forward_autotuner", lambda *args, kernel=pinned: kernel)
        for q_len, k_len in CUDA_OFFSET_SWEEP:
            q, k, v, do = attention_inputs((1, 2, q_len, head_dim), k_len, torch.float32)
            label = f" config {config}, Nq={q_len}, Nk={k_len}"
            want = attention_reference(q, k, v, do, True)
            assert_attention_close(_run_kernel(q, k, v, do, True), want, **FLOAT32_TOLERANCE, label=label)


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
    q, k, v, do = attention_inputs((1, 2, 33, 32), 33, torch.float32)
    got = _run_kernel(q, k, v, do, causal, scale=scale)
    want = attention_reference(q, k, v, do, causal, scale=scale)
    assert_attention_close(got, want, **FLOAT32_TOLERANCE, label=f" scale={scale}")
    default = attention_reference(q, k, v, do, causal).o
    assert (got[0].double() - default).abs().max() > 1e-2


@pytest.mark.parametrize(
    "q_shape, k_len, dtype",
    [((1, 2, 97, 64), 97, torch.float32), ((2, 1, 40, 32), 33, torch.bfloat16),
     pytest.param((2, 8, 1024, 64), 1024, torch.bfloat16, marks=on_cuda_only)],
)  # fmt: skip
def test_backward_is_bitwise_deterministic(q_shape, k_len, dtype):
    q, k, v, do = attention_inputs(q_shape, k_len, dtype)
    first, second = _run_kernel(q, k, v, do, True), _run_kernel(q, k, v, do, True)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_that_see_no_key_give_zeros_not_nan(dtype):
    # 37 queries on 5 keys: query i sees keys 0 .. i - 32, so rows 0..31 see none.
    q, k, v, do = attention_inputs((2, 2, 37, 16), 5, dtype)
    o, lse, dq, dk, dv = _run_kernel(q * 100, k * 100, v, do, True)  # huge scores too
    assert not any(t.isnan().any() for t in (o, lse, dq, dk, dv))
    assert torch.equal(o[..., :32, :], torch.zeros_like(o[..., :32, :]))
    assert torch.equal(dq[..., :32, :], torch.zeros_like(dq[..., :32, :]))
    assert torch.isneginf(lse[..., :32]).all() and torch.isfinite(lse[..., 32:]).all()
    assert (o[..., 32:, :] != 0).any() and (dk != 0).any()


def test_non_contiguousattention_inputs():
    q = torch.randn(2, 20, 3, 32, device=DEVICE).transpose(1, 2)  # (B, H, N, D) view of (B, N, H, D)
    k = torch.randn(2, 3, 32, 20, device=DEVICE).transpose(-2, -1)  # last dim strided
    v = torch.randn(2, 3, 20, 64, device=DEVICE)[..., ::2]
    do = torch.randn(2, 20, 3, 32, device=DEVICE).transpose(1, 2)
    assert_attention_close(_run_kernel(q, k, v, do, True), attention_reference(q, k, v, do, True), **FLOAT32_TOLERANCE)


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
    assert_attention_close(_run_kernel(q, k, v, do, True), attention_reference(q, k, v, do, True), **FLOAT32_TOLERANCE)


def test_saves_inputs_output_and_a_float32_logsumexp_only():
    q, k, v, _ = attention_inputs((2, 3, 17, 32), 17, torch.bfloat16)
    o = flash_attention(q.requires_grad_(), k, v)
    saved = list(o.grad_fn.saved_tensors)  # no document table without document_ids
    assert [tuple(t.shape) for t in saved] == [(6, 17, 32)] * 4 + [(2, 3, 17)]
    assert saved[-1].dtype == torch.float32
    assert saved[0].data_ptr() == q.data_ptr()  # contiguous inputs are not copied


def test_inputs_untouched_by_forward_and_backward():
    q, k, v, do = attention_inputs((1, 2, 21, 32), 21, torch.bfloat16)
    for t in (q, k, v):
        t.requires_grad_()
    before = [t.detach().clone() for t in (q, k, v, do)]
    flash_attention(q, k, v).backward(do)
    assert all(torch.equal(t.detach(), b) for t, b in zip((q, k, v, do), before))


def test_empty_sequences():
    q, k, v, do = attention_inputs((1, 2, 4, 16), 0, torch.float32)
    o, lse, dq, dk, dv = _run_kernel(q, k, v, do, False)  # no key at all: every row outputs 0
    assert torch.equal(o, torch.zeros_like(o)) and torch.equal(dq, torch.zeros_like(dq))
    assert torch.isneginf(lse).all() and dk.shape == (1, 2, 0, 16)
    q, k, v, do = attention_inputs((1, 2, 0, 16), 6, torch.float32)
    o, _, dq, dk, dv = _run_kernel(q, k, v, do, True)
    assert o.shape == (1, 2, 0, 16) and torch.equal(dk, torch.zeros_like(dk)) and torch.equal(dv, torch.zeros_like(dv))


def test_traced_by_torch_compile_without_graph_breaks():
    q, k, v, _ = attention_inputs((2, 2, 19, 32), 19, torch.float32)
    assert_compiled_matches_eager(flash_attention_with_lse, q, k, v)


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
    want = attention_reference(*tails, True)
    same = torch_attention_same_dtype(*tails, True)
    assert_each_within_torch_error(got, same, want.without_lse(), ", last heads")
