"""RMSNorm, fused: y = x * rstd * w over the last dim, rstd = 1 / sqrt(mean(x^2) + eps).

Everything is computed in float32 and y is stored in x's dtype. Forward: one
program per row reads x once, reduces sum(x^2), writes y and the row's rstd.

Backward, per row of d elements, with x_hat = x * rstd and g = w * dy:

    d rstd / d x_j = -rstd^3 * x_j / d
    dx_j = rstd * g_j + sum_i(g_i * x_i) * (-rstd^3 * x_j / d)
         = rstd * (g_j - x_hat_j * mean(x_hat * g))
    dw_j = sum over rows of dy_j * x_hat_j

Memory trick: the only tensor saved beyond x and w is rstd, one float32 per row
(4 bytes per row against 2*d or 4*d for x_hat), from which x_hat is rebuilt in
the backward kernel. That kernel writes dx and, instead of one atomic add per
row into dw, each program walks a contiguous range of rows, sums its rows'
dy * x_hat into a float32 row of a (programs, d) buffer, and torch sums the
buffer over programs afterwards: no atomics, so gradients are bitwise
identical from run to run.

Rows longer than the largest block (64 KiB of x) are walked in column blocks
inside the kernels: the forward then reads x twice (once for the sum of
squares, once to normalise) and the backward reads x and dy twice.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from scratchlm.kernels._registration import INTERPRETING, check_float_tensor, kernel_op, launch

# The largest row block, in bytes of its float32 values in registers: 16 KiB
# is 4096 columns of any dtype, 16 per thread on 8 warps. The backward holds
# x, dy, w and the dw sum of a block; 8192-column blocks need 16 warps, which
# leave a thread 128 registers, and spill on sm_80 (`kernels/NOTES.md`).
# Longer rows loop over column blocks.
MAX_BLOCK_BYTES = 16384
# Backward programs per streaming multiprocessor: enough resident programs to
# hide memory latency, few enough that the (programs, d) dw buffer and its
# final sum stay small next to x (528 x d float32 on a 132-SM H100).
BACKWARD_PROGRAMS_PER_SM = 4
# Under the interpreter every program is a Python loop iteration: a few
# programs, each with several rows, exercise the same code paths quickly.
INTERPRETER_BACKWARD_PROGRAMS = 4


@triton.jit
def _rmsnorm_fwd_kernel(
    x_ptr,
    w_ptr,
    y_ptr,
    rstd_ptr,
    x_row_stride,
    y_row_stride,
    n_cols,
    eps,
    offset,
    BLOCK_SIZE: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
):
    # int64 before multiplying: tensors over 2^31 elements must not wrap.
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_row_stride
    y_row = y_ptr + row * y_row_stride
    if ONE_BLOCK:
        # The whole row fits in one block: x is read from memory exactly once.
        cols = tl.arange(0, BLOCK_SIZE)
        mask = cols < n_cols
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32) + offset
        tl.store(y_row + cols, (x * rstd * w).to(y_ptr.dtype.element_ty), mask=mask)
    else:
        sum_sq = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_SIZE):
            cols = start + tl.arange(0, BLOCK_SIZE)
            x = tl.load(x_row + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
            sum_sq += x * x
        rstd = 1.0 / tl.sqrt(tl.sum(sum_sq, axis=0) / n_cols + eps)
        for start in range(0, n_cols, BLOCK_SIZE):
            cols = start + tl.arange(0, BLOCK_SIZE)
            mask = cols < n_cols
            x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32) + offset
            tl.store(y_row + cols, (x * rstd * w).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rmsnorm_bwd_kernel(
    x_ptr,
    w_ptr,
    dy_ptr,
    rstd_ptr,
    dx_ptr,
    dw_partial_ptr,
    x_row_stride,
    dy_row_stride,
    dx_row_stride,
    dw_partial_row_stride,
    n_rows,
    n_cols,
    rows_per_program,
    offset,
    BLOCK_SIZE: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
):
    program = tl.program_id(0).to(tl.int64)
    row_start = program * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    dw_row = dw_partial_ptr + program * dw_partial_row_stride
    if ONE_BLOCK:
        # w and this program's dw sum stay in registers across all its rows.
        cols = tl.arange(0, BLOCK_SIZE)
        mask = cols < n_cols
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32) + offset
        dw_sum = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
        for row in range(row_start, row_end):
            x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + row * dy_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + row)
            x_hat = x * rstd
            g = w * dy
            mean_x_hat_g = tl.sum(x_hat * g, axis=0) / n_cols
            dx = rstd * (g - x_hat * mean_x_hat_g)
            tl.store(dx_ptr + row * dx_row_stride + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            dw_sum += dy * x_hat
        tl.store(dw_row + cols, dw_sum, mask=mask)
    else:
        # Long rows: mean(x_hat * g) needs the whole row before any dx, so each
        # row is walked twice; the dw row (zeroed by the launcher) is updated in
        # memory, each element always by the same thread, in row order.
        for row in range(row_start, row_end):
            x_row = x_ptr + row * x_row_stride
            dy_row = dy_ptr + row * dy_row_stride
            rstd = tl.load(rstd_ptr + row)
            dot = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
            for start in range(0, n_cols, BLOCK_SIZE):
                cols = start + tl.arange(0, BLOCK_SIZE)
                mask = cols < n_cols
                x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(dy_row + cols, mask=mask, other=0.0).to(tl.float32)
                w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32) + offset
                dot += x * w * dy
            mean_x_hat_g = tl.sum(dot, axis=0) * rstd / n_cols
            for start in range(0, n_cols, BLOCK_SIZE):
                cols = start + tl.arange(0, BLOCK_SIZE)
                mask = cols < n_cols
                x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(dy_row + cols, mask=mask, other=0.0).to(tl.float32)
                w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32) + offset
                x_hat = x * rstd
                dx = rstd * (w * dy - x_hat * mean_x_hat_g)
                tl.store(dx_ptr + row * dx_row_stride + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
                dw_sum = tl.load(dw_row + cols, mask=mask, other=0.0)
                tl.store(dw_row + cols, dw_sum + dy * x_hat, mask=mask)


class LaunchSettings(NamedTuple):
    block_size: int  # columns per block, a power of two
    one_block: bool  # whether a whole row fits in one block
    num_warps: int
    backward_programs: int  # programs sharing the rows in the backward kernel


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def launch_settings(n_rows: int, n_cols: int, element_size: int, device: torch.device) -> LaunchSettings:
    """The launch settings for (n_rows, n_cols) rows of ``element_size``-byte elements.

    A pure function of its arguments (and the GPU's SM count), so a given
    shape always launches, and reduces dw, the same way.
    """
    max_block = MAX_BLOCK_BYTES // 4
    block_size = min(triton.next_power_of_2(max(n_cols, 1)), max_block)
    # 4 warps up to 2048 columns, 8 at 4096: at most 16 float32 values per thread.
    num_warps = min(max(block_size // 512, 4), 8)
    if device.type == "cuda" and not INTERPRETING:
        programs = BACKWARD_PROGRAMS_PER_SM * _sm_count(device.index if device.index is not None else 0)
    else:
        programs = INTERPRETER_BACKWARD_PROGRAMS
    return LaunchSettings(block_size, block_size >= n_cols, num_warps, max(min(n_rows, programs), 1))


def _fwd_fake(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(x), x.new_empty(x.shape[0], dtype=torch.float32)


@kernel_op("rmsnorm_fwd", fake=_fwd_fake)
def rmsnorm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, rstd) for contiguous x (rows, d) and weight (d,), scaled by offset + weight; rstd is float32 (rows,)."""
    n_rows, n_cols = x.shape
    y = torch.empty_like(x)
    rstd = torch.empty(n_rows, device=x.device, dtype=torch.float32)
    if n_rows:
        s = launch_settings(n_rows, n_cols, x.element_size(), x.device)
        launch(_rmsnorm_fwd_kernel)[(n_rows,)](
            x, weight, y, rstd,
            x.stride(0), y.stride(0),
            n_cols, eps, offset,
            BLOCK_SIZE=s.block_size, ONE_BLOCK=s.one_block, num_warps=s.num_warps,
        )  # fmt: skip
    return y, rstd


def _bwd_fake(x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, dy: torch.Tensor, offset: float):
    return torch.empty_like(x), torch.empty_like(weight)


@kernel_op("rmsnorm_bwd", fake=_bwd_fake)
def rmsnorm_bwd(
    x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, dy: torch.Tensor, offset: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dweight) for contiguous x, dy (rows, d), weight (d,), the forward's rstd and its offset."""
    n_rows, n_cols = x.shape
    dx = torch.empty_like(x)
    if not n_rows:
        return dx, torch.zeros_like(weight)
    s = launch_settings(n_rows, n_cols, x.element_size(), x.device)
    rows_per_program = triton.cdiv(n_rows, s.backward_programs)
    programs = triton.cdiv(n_rows, rows_per_program)  # none left without rows
    # The looping kernel accumulates into its dw row in memory, so it starts at zero.
    allocate = torch.empty if s.one_block else torch.zeros
    dw_partial = allocate(programs, n_cols, device=x.device, dtype=torch.float32)
    launch(_rmsnorm_bwd_kernel)[(programs,)](
        x, weight, dy, rstd, dx, dw_partial,
        x.stride(0), dy.stride(0), dx.stride(0), dw_partial.stride(0),
        n_rows, n_cols, rows_per_program, offset,
        BLOCK_SIZE=s.block_size, ONE_BLOCK=s.one_block, num_warps=s.num_warps,
    )  # fmt: skip
    # A fixed-shape reduction in float32: the same order, so the same bits, every run.
    return dx, dw_partial.sum(dim=0).to(weight.dtype)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
        x_2d = x.contiguous().view(-1, x.shape[-1])  # (rows, d); a view when x is contiguous
        weight = weight.contiguous()
        y, rstd = rmsnorm_fwd(x_2d, weight, eps, offset)
        ctx.save_for_backward(x_2d, weight, rstd)
        ctx.offset = offset
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        x_2d, weight, rstd = ctx.saved_tensors
        dx, dweight = rmsnorm_bwd(x_2d, weight, rstd, dy.reshape(x_2d.shape).contiguous(), ctx.offset)
        return dx.view(dy.shape), dweight, None, None


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5, offset: float = 0.0) -> torch.Tensor:
    """x / sqrt(mean(x^2, dim=-1) + eps) * (offset + weight), with a fused Triton forward and backward.

    ``offset`` 1.0 is Gemma's norm (weights stored as the scale minus 1): the
    kernels add it to each weight as they load it, and the weight gradient is
    the same sum of dy * x_hat as without it.

    ``x``: (..., d), float32, bfloat16 or float16, any layout. ``weight``: (d,),
    on x's device, in x's dtype or float32 (float32 weights with 16-bit
    activations, as in mixed-precision training). Computes in float32; returns
    x's dtype, and the weight gradient in weight's dtype.
    """
    check_float_tensor("x", x)
    check_float_tensor("weight", weight)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x has shape {tuple(x.shape)}; expected (..., d) with d >= 1")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}; expected one device")
    if weight.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"weight has dtype {weight.dtype} but x has {x.dtype}; expected {x.dtype} or torch.float32")
    if weight.shape != (x.shape[-1],):
        raise ValueError(
            f"weight has shape {tuple(weight.shape)} but x has last dim {x.shape[-1]}; expected ({x.shape[-1]},)"
        )
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < math.inf:
        raise ValueError(f"eps is {eps!r}; expected a finite number >= 0")
    if isinstance(offset, bool) or not isinstance(offset, (int, float)) or not math.isfinite(offset):
        raise ValueError(f"offset is {offset!r}; expected a finite number (0: Llama's norm, 1: Gemma's)")
    if x.device.type != "cuda" and not INTERPRETING:
        raise ValueError(f"x is on {x.device}; the Triton kernels need a CUDA device (or TRITON_INTERPRET=1)")
    return RMSNormFunction.apply(x, weight, float(eps), float(offset))
