"""The fused GeGLU gate gelu_tanh(a) * b (SwiGLU's kernels with the GeLU gate) against float64, forward and backward."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import test_swiglu as swiglu_tests
from helpers import assert_close, assert_within_torch_error
from scratchlm.kernels import geglu

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
on_cuda_only = pytest.mark.skipif(not CUDA, reason="large shapes are for the GPU; the interpreter is too slow")

SHAPES = [(1,), (3, 113, 1000), (2, 5, 33), (4, 1023)]
LARGE_SHAPES = [pytest.param((2, 4096, 16384), marks=on_cuda_only)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _reference(a: torch.Tensor, b: torch.Tensor, dy: torch.Tensor, dtype: torch.dtype):
    """F.gelu(a, approximate="tanh") * b and its gradients by PyTorch autograd in ``dtype``."""
    return swiglu_tests._reference(a, b, dy, dtype, gate=gelu_tanh)


def _run_kernel(a: torch.Tensor, b: torch.Tensor, dy: torch.Tensor):
    return swiglu_tests._run_kernel(a, b, dy, op=geglu)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [*SHAPES, *LARGE_SHAPES])
def test_matches_float64_reference(shape, dtype):
    a = torch.randn(shape, device=DEVICE, dtype=dtype) * 3
    b = torch.randn(shape, device=DEVICE, dtype=dtype)
    dy = torch.randn(shape, device=DEVICE, dtype=dtype)
    got = _run_kernel(a, b, dy)
    want = _reference(a, b, dy, torch.float64)
    names = ("y", "da", "db")
    assert all(g.dtype == dtype for g in got)
    if dtype == torch.float32:
        for g, w, name in zip(got, want, names):
            assert_close(g, w, atol=1e-5, rtol=1e-5, name=name)
    else:
        same_dtype = _reference(a, b, dy, dtype)
        for g, t, w, name in zip(got, same_dtype, want, names):
            assert_within_torch_error(g, t, w, name=f"{name} {dtype}")


def test_the_gate_is_the_written_out_tanh_formula_far_into_both_tails():
    """gelu_tanh(a) = a/2 (1 + tanh(u)), computed by the kernel as a * sigmoid(2u): equal, even where tanh saturates."""
    a = torch.linspace(-30, 30, 601, device=DEVICE)
    b = torch.ones_like(a)
    expected = 0.5 * a.double() * (1 + torch.tanh(math.sqrt(2 / math.pi) * (a.double() + 0.044715 * a.double() ** 3)))
    assert_close(geglu(a, b), expected, atol=1e-6, rtol=1e-6, name="gate")


def test_non_contiguous_inputs_and_inputs_untouched():
    base = torch.randn(6, 40, device=DEVICE)
    a = base[:, ::2]
    b = torch.randn(20, 6, device=DEVICE).t()
    a_before, b_before = a.clone(), b.clone()
    dy = torch.randn(6, 20, device=DEVICE)
    got = _run_kernel(a, b, dy)
    want = _reference(a, b, dy, torch.float64)
    for g, w, name in zip(got, want, ("y", "da", "db")):
        assert_close(g, w, atol=1e-5, rtol=1e-5, name=name)
    assert torch.equal(a, a_before) and torch.equal(b, b_before)


def test_traced_by_torch_compile_without_graph_breaks():
    backend = "inductor" if CUDA else "aot_eager"
    compiled = torch.compile(lambda a, b: (geglu(a, b) * 2).sum(), fullgraph=True, backend=backend)
    a = torch.randn(4, 37, device=DEVICE, requires_grad=True)
    b = torch.randn(4, 37, device=DEVICE, requires_grad=True)
    compiled(a, b).backward()
    eager = _run_kernel(a, b, torch.full((4, 37), 2.0, device=DEVICE))
    assert_close(a.grad, eager[1], atol=1e-6, rtol=1e-6, name="da under compile")
    assert_close(b.grad, eager[2], atol=1e-6, rtol=1e-6, name="db under compile")


@pytest.mark.parametrize(
    "a, b, error, match",
    [
        (torch.ones(3), torch.ones(4), ValueError, r"b has shape \(4,\) but a has \(3,\)"),
        (torch.ones(3), torch.ones(3, dtype=torch.float16), TypeError, "b has dtype torch.float16 but a has"),
    ],
)
def test_bad_input_is_refused(a, b, error, match):
    with pytest.raises(error, match=match):
        geglu(a, b)
