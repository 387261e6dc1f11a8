"""SwiGLU's gate, fused: y = silu(a) * b = a * sigmoid(a) * b, elementwise; and GeGLU's.

Backward, with s = sigmoid(a) and silu'(a) = s * (1 + a * (1 - s)):

    da = dy * b * s * (1 + a * (1 - s))
    db = dy * a * s

GeGLU (Gemma's MLP) shares both kernels through the constexpr GELU_TANH: its
gate is GeLU's tanh approximation, which is also a sigmoid gate,

    gelu_tanh(a) = a/2 * (1 + tanh(u)) = a * sigmoid(2u),   u = sqrt(2/pi) * (a + 0.044715 a^3)

(since (1 + tanh(u)) / 2 = sigmoid(2u)), so with s = sigmoid(2u):

    gelu_tanh'(a) = s + a * s * (1 - s) * 2 * sqrt(2/pi) * (1 + 3 * 0.044715 a^2)

Memory trick: nothing but the inputs is saved; sigmoid(a) is recomputed in
the backward kernel, which reads a, b, dy once and writes da, db once (five
tensors moved, the minimum), instead of autograd's chain of four elementwise
ops each with its own round trip to memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from scratchlm.kernels._registration import check_float_tensor, check_same, kernel_op, launch

# 1024 elements per program: 4 warps x 32 threads x 8 elements, enough
# loads in flight to saturate memory bandwidth on current GPUs.
BLOCK_SIZE = 1024
NUM_WARPS = 4

SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
GELU_CUBIC = tl.constexpr(0.044715)


@triton.jit
def _gate(a, GELU_TANH: tl.constexpr):
    """(gate(a), gate'(a)) in float32: silu, or GeLU's tanh approximation."""
    if GELU_TANH:
        inner = SQRT_2_OVER_PI * (a + GELU_CUBIC * a * a * a)
        s = tl.sigmoid(2.0 * inner)
        slope = s + a * s * (1.0 - s) * 2.0 * SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_CUBIC * a * a)
        return a * s, slope
    s = tl.sigmoid(a)
    return a * s, s * (1.0 + a * (1.0 - s))


@triton.jit
def _swiglu_fwd_kernel(a_ptr, b_ptr, y_ptr, n_elements, BLOCK_SIZE: tl.constexpr, GELU_TANH: tl.constexpr):
    # int64 before multiplying: tensors over 2^31 elements must not wrap.
    offsets = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    a = tl.load(a_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    gate, _ = _gate(a, GELU_TANH)
    y = gate * b
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    a_ptr, b_ptr, dy_ptr, da_ptr, db_ptr, n_elements, BLOCK_SIZE: tl.constexpr, GELU_TANH: tl.constexpr
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    a = tl.load(a_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    gate, slope = _gate(a, GELU_TANH)
    da = dy * b * slope
    db = dy * gate
    tl.store(da_ptr + offsets, da.to(da_ptr.dtype.element_ty), mask=mask)
    tl.store(db_ptr + offsets, db.to(db_ptr.dtype.element_ty), mask=mask)


def _grid(n_elements: int) -> tuple[int]:
    return (triton.cdiv(n_elements, BLOCK_SIZE),)


def _forward(a: torch.Tensor, b: torch.Tensor, gelu_tanh: bool) -> torch.Tensor:
    y = torch.empty_like(a)
    n = a.numel()
    if n:
        launch(_swiglu_fwd_kernel)[_grid(n)](
            a, b, y, n, BLOCK_SIZE=BLOCK_SIZE, GELU_TANH=gelu_tanh, num_warps=NUM_WARPS
        )
    return y


def _backward(a: torch.Tensor, b: torch.Tensor, dy: torch.Tensor, gelu_tanh: bool):
    da, db = torch.empty_like(a), torch.empty_like(b)
    n = a.numel()
    if n:
        launch(_swiglu_bwd_kernel)[_grid(n)](
            a, b, dy, da, db, n, BLOCK_SIZE=BLOCK_SIZE, GELU_TANH=gelu_tanh, num_warps=NUM_WARPS
        )
    return da, db


@kernel_op("swiglu_fwd", fake=lambda a, b: torch.empty_like(a))
def swiglu_fwd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(a) * b for contiguous a, b of one shape and dtype."""
    return _forward(a, b, False)


@kernel_op("swiglu_bwd", fake=lambda a, b, dy: (torch.empty_like(a), torch.empty_like(b)))
def swiglu_bwd(a: torch.Tensor, b: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(da, db) for contiguous a, b, dy of one shape and dtype."""
    return _backward(a, b, dy, False)


@kernel_op("geglu_fwd", fake=lambda a, b: torch.empty_like(a))
def geglu_fwd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(a) * b for contiguous a, b of one shape and dtype."""
    return _forward(a, b, True)


@kernel_op("geglu_bwd", fake=lambda a, b, dy: (torch.empty_like(a), torch.empty_like(b)))
def geglu_bwd(a: torch.Tensor, b: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(da, db) of GeGLU for contiguous a, b, dy of one shape and dtype."""
    return _backward(a, b, dy, True)


class SwiGLUFunction(torch.autograd.Function):
    """silu(a) * b, or gelu_tanh(a) * b with ``gelu_tanh``: the one Function of both gates."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, gelu_tanh: bool = False) -> torch.Tensor:
        a, b = a.contiguous(), b.contiguous()
        ctx.save_for_backward(a, b)
        ctx.gelu_tanh = gelu_tanh
        return (geglu_fwd if gelu_tanh else swiglu_fwd)(a, b)

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        a, b = ctx.saved_tensors
        da, db = (geglu_bwd if ctx.gelu_tanh else swiglu_bwd)(a, b, dy.contiguous())
        return da, db, None


def _check(a: torch.Tensor, b: torch.Tensor) -> None:
    check_float_tensor("a", a)
    check_float_tensor("b", b)
    check_same("b", b, "a", a)
    if a.shape != b.shape:
        raise ValueError(f"b has shape {tuple(b.shape)} but a has {tuple(a.shape)}; expected the same shape")


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(a) * b, elementwise, with a fused Triton forward and backward.

    ``a`` and ``b``: same shape, device and dtype (float32, bfloat16 or
    float16), any layout. Computes in float32, returns ``a``'s dtype.
    """
    _check(a, b)
    return SwiGLUFunction.apply(a, b)


def geglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(a) * b (GeLU's tanh approximation, as F.gelu(a, approximate="tanh")), fused like ``swiglu``.

    The same arguments and kernels as ``swiglu``, with the GeLU gate.
    """
    _check(a, b)
    return SwiGLUFunction.apply(a, b, True)
