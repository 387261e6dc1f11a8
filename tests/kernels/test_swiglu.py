"""The fused gates against float64, forward and backward: SwiGLU silu(a) * b and GeGLU gelu_tanh(a) * b (one kernel)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close, assert_within_torch_error
from scratchlm.kernels import geglu
from scratchlm.kernels.swiglu import swiglu

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
on_cuda_only = pytest.mark.skipif(not CUDA, reason="large shapes are for the GPU; the interpreter is too slow")

SHAPES = [(1,), (8, 64), (3, 113, 1000), (2, 5, 33), (4, 1023)]
LARGE_SHAPES = [
    pytest.param((4096, 11008), marks=on_cuda_only),
    pytest.param((2, 4096, 14336), marks=on_cuda_only),
    pytest.param((2, 4096, 16384), marks=on_cuda_only),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


# The kernel op and the PyTorch gate it is checked against, per gated unit.
GATES = {"swiglu": (swiglu, F.silu), "geglu": (geglu, gelu_tanh)}
each_gate = pytest.mark.parametrize("gate", list(GATES))


def _reference(a: torch.Tensor, b: torch.Tensor, dy: torch.Tensor, dtype: torch.dtype, gate=F.silu):
    """gate(a) * b (silu: SwiGLU) and its gradients computed by PyTorch autograd in ``dtype``."""
    a = a.detach().to(dtype).requires_grad_()
    b = b.detach().to(dtype).requires_grad_()
    y = gate(a) * b
    y.backward(dy.to(dtype))
    return y.detach(), a.grad, b.grad


def _run_kernel(a: torch.Tensor, b: torch.Tensor, dy: torch.Tensor, op=swiglu):
    a = a.detach().clone().requires_grad_()
    b = b.detach().clone().requires_grad_()
    y = op(a, b)
    y.backward(dy)
    return y.detach(), a.grad, b.grad


@each_gate
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [*SHAPES, *LARGE_SHAPES])
def test_matches_float64_reference(shape, dtype, gate):
    op, reference_gate = GATES[gate]
    a = torch.randn(shape, device=DEVICE, dtype=dtype) * 3
    b = torch.randn(shape, device=DEVICE, dtype=dtype)
    dy = torch.randn(shape, device=DEVICE, dtype=dtype)
    got = _run_kernel(a, b, dy, op)
    want = _reference(a, b, dy, torch.float64, reference_gate)
    names = ("y", "da", "db")
    assert all(g.dtype == dtype for g in got)
    if dtype == torch.float32:
        for g, w, name in zip(got, want, names):
            assert_close(g, w, atol=1e-5, rtol=1e-5, name=name)
    else:
        same_dtype = _reference(a, b, dy, dtype, reference_gate)
        for g, t, w, name in zip(got, same_dtype, want, names):
            assert_within_torch_error(g, t, w, name=f"{name} {dtype}")


@each_gate
def test_non_contiguous_inputs_and_inputs_untouched(gate):
    op, reference_gate = GATES[gate]
    base = torch.randn(6, 40, device=DEVICE)
    a = base[:, ::2]  # stride 2 along the last dim
    b = torch.randn(20, 6, device=DEVICE).t()  # transposed
    a_before, b_before = a.clone(), b.clone()
    dy = torch.randn(6, 20, device=DEVICE)
    got = _run_kernel(a, b, dy, op)
    want = _reference(a, b, dy, torch.float64, reference_gate)
    for g, w, name in zip(got, want, ("y", "da", "db")):
        assert_close(g, w, atol=1e-5, rtol=1e-5, name=name)
    assert torch.equal(a, a_before) and torch.equal(b, b_before)


def test_backward_is_deterministic():
    a = torch.randn(3, 113, 100, device=DEVICE)
    b = torch.randn(3, 113, 100, device=DEVICE)
    dy = torch.randn(3, 113, 100, device=DEVICE)
    first, second = _run_kernel(a, b, dy), _run_kernel(a, b, dy)
    assert all(torch.equal(x, y) for x, y in zip(first, second))


def test_empty_input():
    a = torch.randn(0, 5, device=DEVICE, requires_grad=True)
    y = swiglu(a, torch.randn(0, 5, device=DEVICE))
    y.sum().backward()
    assert y.shape == (0, 5) and a.grad.shape == (0, 5)


@each_gate
def test_traced_by_torch_compile_without_graph_breaks(gate):
    op, _ = GATES[gate]
    backend = "inductor" if CUDA else "aot_eager"
    compiled = torch.compile(lambda a, b: (op(a, b) * 2).sum(), fullgraph=True, backend=backend)
    a = torch.randn(4, 37, device=DEVICE, requires_grad=True)
    b = torch.randn(4, 37, device=DEVICE, requires_grad=True)
    compiled(a, b).backward()
    eager = _run_kernel(a, b, torch.full((4, 37), 2.0, device=DEVICE), op)
    assert_close(a.grad, eager[1], atol=1e-6, rtol=1e-6, name="da under compile")
    assert_close(b.grad, eager[2], atol=1e-6, rtol=1e-6, name="db under compile")


@pytest.mark.parametrize(
    "a, b, error, match",
    [
        (torch.ones(3, dtype=torch.int64), torch.ones(3, dtype=torch.int64), TypeError, "a has dtype torch.int64"),
        (torch.ones(3), torch.ones(4), ValueError, r"b has shape \(4,\) but a has \(3,\)"),
        (torch.ones(3), torch.ones(3, dtype=torch.float16), TypeError, "b has dtype torch.float16 but a has"),
        ([1.0, 2.0], torch.ones(2), TypeError, "a must be a torch.Tensor"),
    ],
)
@each_gate
def test_bad_input_is_refused(a, b, error, match, gate):
    with pytest.raises(error, match=match):
        GATES[gate][0](a, b)


@on_cuda_only
def test_offsets_beyond_two_to_the_31_elements():
    n = 2**31 + 4099  # int32 offsets would wrap before the end of this tensor
    a = torch.empty(n, device="cuda", dtype=torch.bfloat16).fill_(1.5)
    b = torch.empty(n, device="cuda", dtype=torch.bfloat16).fill_(2.0)
    a[-3:] = torch.tensor([1.0, -2.0, 3.0], dtype=torch.bfloat16)
    y = swiglu(a, b)
    tail = F.silu(a[-3:].float()) * 2.0
    assert_close(y[-3:], tail, atol=2e-2, rtol=2e-2, name="tail past 2^31")
    assert_close(y[:2], F.silu(a[:2].float()) * 2.0, atol=2e-2, rtol=2e-2, name="head")
