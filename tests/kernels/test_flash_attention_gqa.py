"""Grouped-query attention in the Triton FlashAttention kernels: k and v with fewer heads than q.

The shared float64 reference repeats each K/V head for the query heads of its
group; autograd through the repeat sums dK and dV over the group, which is what
the kernels must produce without ever making that copy.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from attention_reference import DEVICE, attention_inputs, attention_reference, run_attention
from attention_reference import assert_attention_close, assert_compiled_matches_eager, assert_kernel_matches_reference
from helpers import assert_close
from scratchlm.kernels.flash_attention import flash_attention, flash_attention_with_lse

flash_module = importlib.import_module("scratchlm.kernels.flash_attention")

CUDA = torch.cuda.is_available()
on_cuda_only = pytest.mark.skipif(not CUDA, reason="large shapes are for the GPU; the interpreter is too slow")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

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


# o and logsumexp, then dq, dk, dv, against float64 math.
FLOAT32_TOLERANCE = {"atol": 1e-5, "rtol": 1e-5, "grad_atol": 3e-5, "grad_rtol": 1e-4}


def _repeat_kv(q, t):
    """t (..., Hkv, N, D) with each head repeated for the Hq // Hkv query heads of its group."""
    return t.repeat_interleave(q.shape[-3] // t.shape[-3], dim=-3)


def _run_kernel(q, k, v, do, causal):
    """(o, logsumexp, dq, dk, dv) from the kernels."""
    return run_attention(flash_attention_with_lse, q, k, v, do, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [*CASES, *LARGE_CASES], ids=_case_id)
def test_matches_float64_reference_with_repeated_heads(case, dtype):
    q_shape, kv_heads, k_len, causal = case
    q, k, v, do = attention_inputs(q_shape, k_len, dtype, kv_heads=kv_heads)
    got = _run_kernel(q, k, v, do, causal)
    o, lse, dq, dk, dv = got
    assert o.shape == q.shape and dq.shape == q.shape and dk.shape == k.shape and dv.shape == k.shape
    assert o.dtype == dtype and all(g.dtype == dtype for g in (dq, dk, dv)) and lse.dtype == torch.float32
    assert_kernel_matches_reference(got, q, k, v, do, causal, FLOAT32_TOLERANCE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_outputs_and_dq_equal_plain_attention_on_repeated_heads(dtype):
    # Per query head the forward and dQ run the very same arithmetic whether
    # K/V are shared or repeated, so they agree bit for bit; dK/dV are then the
    # sums of plain attention's per-head gradients over each group.
    q, k, v, do = attention_inputs((1, 6, 37, 16), 29, dtype, kv_heads=2)
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
    q, k, v, do = attention_inputs(q_shape, k_len, dtype, kv_heads=kv_heads)
    first, second = _run_kernel(q, k, v, do, True), _run_kernel(q, k, v, do, True)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_non_contiguous_inputs():
    # The layout a model's projections produce, (batch, seq, heads, D), seen as (batch, heads, seq, D).
    q = torch.randn(2, 20, 4, 32, device=DEVICE).transpose(1, 2)
    k = torch.randn(2, 2, 32, 25, device=DEVICE).transpose(-2, -1)  # last dim strided: copied
    v = torch.randn(2, 25, 2, 32, device=DEVICE).transpose(1, 2)
    do = torch.randn(2, 20, 4, 32, device=DEVICE).transpose(1, 2)
    assert_attention_close(_run_kernel(q, k, v, do, True), attention_reference(q, k, v, do, True), **FLOAT32_TOLERANCE)


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
    q, k, v, do = attention_inputs((2, 8, 19, 16), 40, torch.float32, kv_heads=1)
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
    kernel_names = ("flash_attention_fwd_kernel", "flash_attention_bwd_dkdv_kernel", "flash_attention_bwd_dq_kernel")
    assert set(by_name) >= set(kernel_names)
    for name in kernel_names:
        _, args, _ = by_name[name]
        assert args[1].data_ptr() == k.data_ptr() and args[2].data_ptr() == v.data_ptr(), name
        assert args[1].shape == (2, 40, 16) and args[2].shape == (2, 40, 16), name
    grid, _, kwargs = by_name["flash_attention_bwd_dkdv_kernel"]
    assert grid == (-(-40 // kwargs["BLOCK_N"]) * 2,)  # key blocks x (batch x 1 K/V head)


def test_traced_by_torch_compile_without_graph_breaks():
    q, k, v, _ = attention_inputs((2, 4, 19, 32), 23, torch.float32, kv_heads=2)
    _, dk, dv = assert_compiled_matches_eager(flash_attention_with_lse, q, k, v)
    assert dk.shape == k.shape and dv.shape == v.shape


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
