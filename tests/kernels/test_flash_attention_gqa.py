"""Grouped-query attention in the Triton FlashAttention kernels: k and v with fewer heads than q.

The reference repeats each K/V head for the query heads of its group and runs
float64 softmax attention; autograd through the repeat sums dK and dV over the
group, which is what the kernels must produce without ever making that copy.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from helpers import assert_close, assert_within_torch_error
from test_flash_attention import _torch_same_dtype
from scratchlm.kernels.flash_attention import flash_attention

flash_module = importlib.import_module("scratchlm.kernels.flash_attention")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
on_cuda_only = pytest.mark.skipif(not CUDA, reason="large shapes are for the GPU; the interpreter is too slow")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NAMES = ("o", "dq", "dk", "dv")

# (q shape, K/V heads, key length, causal); heads are dim -3. Groups of 1, 2
# and 4 and MQA (one K/V head), odd lengths against the interpreter's 16 x 16
# tiles, Nq < Nk (decoding after a cache) and Nq > Nk (rows that see no key).
CASES = [
    ((1, 2, 17, 16), 2, 17, True),  # group of 1: plain attention
    ((2, 4, 17, 32), 2, 17, True),  # group of 2
    ((1, 8, 37, 16), 2, 37, False),  # group of 4
    ((1, 3, 97, 16), 1, 97, True),  # MQA, a group of 3
    ((1, 4, 5, 16), 2, 37, True),  # Nq < Nk
    ((1, 6, 37, 16), 2, 20, True),  # Nq > Nk: queries 0..16 see no key
    ((1, 3, 20, 16), 1, 37, False),  # MQA, Nq < Nk, no mask
    ((4, 20, 16), 2, 20, True),  # (heads, seq, head_dim): no batch dim
    ((2, 1, 4, 17, 16), 1, 17, True),  # two leading dims before the heads
]
LARGE_CASES = [
    pytest.param(((2, 32, 1024, 128), 8, 1024, True), marks=on_cuda_only),  # Llama-3-8B's heads
    pytest.param(((1, 8, 2048, 64), 1, 2048, True), marks=on_cuda_only),
    pytest.param(((2, 16, 1000, 96), 4, 1023, True), marks=on_cuda_only),
    pytest.param(((1, 12, 777, 256), 3, 777, False), marks=on_cuda_only),
]


def _case_id(case):
    q_shape, kv_heads, k_len, causal = case
    return f"q{'x'.join(map(str, q_shape))}-kv{kv_heads}-nk{k_len}-{'causal' if causal else 'full'}"


def _inputs(q_shape, kv_heads, k_len, dtype):
    k_shape = (*q_shape[:-3], kv_heads, k_len, q_shape[-1])
    q = torch.randn(q_shape, device=DEVICE, dtype=torch.float32).mul(2).to(dtype)  # peaked softmax rows
    k = torch.randn(k_shape, device=DEVICE, dtype=dtype)
    v = torch.randn(k_shape, device=DEVICE, dtype=dtype)
    do = torch.randn(q_shape, device=DEVICE, dtype=dtype)
    return q, k, v, do


def _repeat_kv(q, t):
    """t (..., Hkv, N, D) with each head repeated for the Hq // Hkv query heads of its group."""
    return t.repeat_interleave(q.shape[-3] // t.shape[-3], dim=-3)


def _causal_mask(q_len, k_len):
    return torch.ones(q_len, k_len, dtype=torch.bool, device=DEVICE).tril(k_len - q_len)


def _reference(q, k, v, do, causal):
    """Softmax attention in float64 over explicitly repeated K/V heads: (o, logsumexp, dq, dk, dv)."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    scores = q @ _repeat_kv(q, k).transpose(-2, -1) * q.shape[-1] ** -0.5
    mask = _causal_mask(q.shape[-2], k.shape[-2]) | (not causal)  # all True without the causal mask
    sees_a_key = mask.any(dim=-1, keepdim=True)
    scores = torch.where(sees_a_key, scores.masked_fill(~mask, float("-inf")), 0.0)
    lse = torch.logsumexp(scores, dim=-1).masked_fill(~sees_a_key.squeeze(-1), float("-inf"))
    o = (torch.softmax(scores, dim=-1) * sees_a_key) @ _repeat_kv(q, v)
    o.backward(do.double())
    return o.detach(), lse.detach(), q.grad, k.grad, v.grad


def _run_kernel(q, k, v, do, causal):
    """(o, logsumexp, dq, dk, dv) from the kernels; logsumexp is the one saved for backward."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o = flash_attention(q, k, v, causal=causal)
    lse = o.grad_fn.saved_tensors[-1].view(q.shape[:-1])
    o.backward(do)
    return o.detach(), lse, q.grad, k.grad, v.grad


def _assert_float32_close(got, want, label=""):
    o, lse, *grads = got
    assert_close(o, want[0], atol=1e-5, rtol=1e-5, name=f"o{label}")
    assert_close(lse, want[1], atol=1e-5, rtol=1e-5, name=f"logsumexp{label}")
    for g, w, name in zip(grads, want[2:], NAMES[1:]):
        assert_close(g, w, atol=3e-5, rtol=1e-4, name=f"{name}{label}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [*CASES, *LARGE_CASES], ids=_case_id)
def test_matches_float64_reference_with_repeated_heads(case, dtype):
    q_shape, kv_heads, k_len, causal = case
    q, k, v, do = _inputs(q_shape, kv_heads, k_len, dtype)
    got = _run_kernel(q, k, v, do, causal)
    want = _reference(q, k, v, do, causal)
    o, lse, dq, dk, dv = got
    assert o.shape == q.shape and dq.shape == q.shape and dk.shape == k.shape and dv.shape == k.shape
    assert o.dtype == dtype and all(g.dtype == dtype for g in (dq, dk, dv)) and lse.dtype == torch.float32
    assert not any(t.isnan().any() for t in got)
    if dtype == torch.float32:
        _assert_float32_close(got, want)
    else:
        assert_close(lse, want[1], atol=1e-5, rtol=1e-5, name=f"logsumexp {dtype}")
        same = _torch_same_dtype(q, k, v, do, causal)
        for g, t, w, name in zip((o, dq, dk, dv), same, (want[0], *want[2:]), NAMES):
            assert_within_torch_error(g, t, w, name=f"{name} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_outputs_and_dq_equal_plain_attention_on_repeated_heads(dtype):
    # Per query head the forward and dQ run the very same arithmetic whether
    # K/V are shared or repeated, so they agree bit for bit; dK/dV are then the
    # sums of plain attention's per-head gradients over each group.
    q, k, v, do = _inputs((1, 6, 37, 16), 2, 29, dtype)
    grouped = _run_kernel(q, k, v, do, True)
    plain = _run_kernel(q, _repeat_kv(q, k), _repeat_kv(q, v), do, True)
    for index, name in ((0, "o"), (1, "logsumexp"), (2, "dq")):
        assert torch.equal(grouped[index], plain[index]), name
    for index, name in ((3, "dk"), (4, "dv")):
        per_head = plain[index].float().unflatten(-3, (2, 3))  # (batch, K/V head, group member, Nk, D)
        # bf16: plain attention rounds each head's share before the sum; the grouped kernel rounds once.
        atol = 1e-5 if dtype == torch.float32 else 3 * 2**-8 * float(per_head.abs().max())
        assert_close(grouped[index], per_head.sum(dim=2), atol=atol, rtol=1e-5, name=f"{name} vs summed per-head")


@pytest.mark.parametrize(
    "q_shape, kv_heads, k_len, dtype",
    [((1, 4, 37, 16), 1, 37, torch.float32), ((1, 4, 33, 16), 2, 40, torch.bfloat16),
     pytest.param((2, 32, 1024, 128), 8, 1024, torch.bfloat16, marks=on_cuda_only)],
)  # fmt: skip
def test_backward_is_bitwise_deterministic(q_shape, kv_heads, k_len, dtype):
    q, k, v, do = _inputs(q_shape, kv_heads, k_len, dtype)
    first, second = _run_kernel(q, k, v, do, True), _run_kernel(q, k, v, do, True)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_non_contiguous_inputs():
    # The layout a model's projections produce, (batch, seq, heads, D), seen as (batch, heads, seq, D).
    q = torch.randn(2, 20, 4, 32, device=DEVICE).transpose(1, 2)
    k = torch.randn(2, 2, 32, 25, device=DEVICE).transpose(-2, -1)  # last dim strided: copied
    v = torch.randn(2, 25, 2, 32, device=DEVICE).transpose(1, 2)
    do = torch.randn(2, 20, 4, 32, device=DEVICE).transpose(1, 2)
    _assert_float32_close(_run_kernel(q, k, v, do, True), _reference(q, k, v, do, True))


def _kernel_name(kernel) -> str:
    while hasattr(kernel, "fn"):  # autotuner -> JIT function -> Python function
        kernel = kernel.fn
    return kernel.__name__


def test_kernels_read_shared_kv_heads_in_place(monkeypatch):
    # No repeated K/V anywhere: autograd saves k and v themselves, every kernel
    # gets them as they are, and the dK/dV kernel runs one program per
    # (key block, K/V head), not per query head.
    launches = []
    real_launch = flash_module.launch

    def recording_launch(kernel):
        launcher = real_launch(kernel)

        class Recorder:
            def __getitem__(self, grid):
                def run(*args, **kwargs):
                    launches.append((_kernel_name(kernel), grid, args, kwargs))
                    return launcher[grid](*args, **kwargs)

                return run

        return Recorder()

    monkeypatch.setattr(flash_module, "launch", recording_launch)
    q, k, v, do = _inputs((2, 8, 19, 16), 1, 40, torch.float32)
    q.requires_grad_()
    k.requires_grad_()
    v.requires_grad_()
    o = flash_attention(q, k, v)
    saved_q, saved_k, saved_v = o.grad_fn.saved_tensors[:3]
    assert saved_k.shape == (2, 40, 16) and saved_v.shape == (2, 40, 16)
    assert saved_k.data_ptr() == k.data_ptr() and saved_v.data_ptr() == v.data_ptr()
    o.backward(do)
    assert k.grad.shape == k.shape and v.grad.shape == v.shape
    by_name = {name: (grid, args, kwargs) for name, grid, args, kwargs in launches}
    assert set(by_name) >= {"_flash_attention_fwd_kernel", "_flash_attention_bwd_dkdv_kernel",
                            "_flash_attention_bwd_dq_kernel"}  # fmt: skip
    for name in ("_flash_attention_fwd_kernel", "_flash_attention_bwd_dkdv_kernel", "_flash_attention_bwd_dq_kernel"):
        _, args, _ = by_name[name]
        assert args[1].data_ptr() == k.data_ptr() and args[2].data_ptr() == v.data_ptr(), name
        assert args[1].shape == (2, 40, 16) and args[2].shape == (2, 40, 16), name
    grid, _, kwargs = by_name["_flash_attention_bwd_dkdv_kernel"]
    assert grid == (-(-40 // kwargs["BLOCK_N"]) * 2,)  # key blocks x (batch x 1 K/V head)


def test_traced_by_torch_compile_without_graph_breaks():
    backend = "inductor" if CUDA else "aot_eager"
    compiled = torch.compile(lambda q, k, v: (flash_attention(q, k, v) * 2).sum(), fullgraph=True, backend=backend)
    q, k, v, _ = _inputs((2, 4, 19, 32), 2, 23, torch.float32)
    for t in (q, k, v):
        t.requires_grad_()
    out = compiled(q, k, v)
    out.backward()
    assert k.grad.shape == k.shape and v.grad.shape == v.shape
    eager = _run_kernel(q, k, v, torch.full_like(q, 2.0), True)
    assert_close(out, eager[0].sum() * 2, atol=1e-4, rtol=1e-6, name="output under compile")
    for got, want, name in zip((q.grad, k.grad, v.grad), eager[2:], NAMES[1:]):
        assert_close(got, want, atol=1e-6, rtol=1e-6, name=f"{name} under compile")


@pytest.mark.parametrize(
    "q_shape, k_shape, v_shape, match",
    [
        ((1, 6, 4, 8), (1, 4, 4, 8), (1, 4, 4, 8), r"q's 6 heads are not a multiple of k's 4"),
        ((1, 2, 4, 8), (1, 4, 4, 8), (1, 4, 4, 8), r"q's 2 heads are not a multiple of k's 4"),
        ((1, 2, 4, 8), (1, 0, 4, 8), (1, 0, 4, 8), r"q's 2 heads are not a multiple of k's 0"),
        ((2, 4, 4, 8), (3, 2, 4, 8), (3, 2, 4, 8),
         r"k has shape \(3, 2, 4, 8\) but q has \(2, 4, 4, 8\); expected \(2, 4, Nk, 8\), or \(2, Hkv, Nk, 8\)"
         r".*the dims before the heads differ"),
        ((2, 4, 4, 8), (2, 2, 4, 16), (2, 2, 4, 16), r"head_dim 16 is not q's 8"),
        ((2, 4, 4, 8), (2, 4, 8), (2, 4, 8), r"k has 3 dims where q has 4"),
        ((2, 4, 4, 8), (2, 2, 4, 8), (2, 4, 4, 8), r"v has shape \(2, 4, 4, 8\) but k has \(2, 2, 4, 8\)"),
    ],
)  # fmt: skip
def test_bad_head_counts_are_refused(q_shape, k_shape, v_shape, match):
    with pytest.raises(ValueError, match=match):
        flash_attention(torch.ones(q_shape), torch.ones(k_shape), torch.ones(v_shape))
