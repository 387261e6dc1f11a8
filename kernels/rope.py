"""Rotary position embedding (RoPE), fused: rotate feature pairs in either of two layouts.

For each row of x (one position of one sequence of one head) and each pair
i < d/2, with c = cos[pos, i] and s = sin[pos, i] (the angle pos * theta^(-2i/d),
tabulated by the caller), the layout says which two features form pair i:

    "pairs" (RoFormer, this project's model): (x[2i], x[2i+1])
        out[2i]       = x[2i] * c - x[2i+1] * s
        out[2i+1]     = x[2i] * s + x[2i+1] * c
    "halves" (Hugging Face's ``rotate_half``, Llama checkpoints): (x[i], x[i+d/2])
        out[i]        = x[i] * c - x[i+d/2] * s
        out[i+d/2]    = x[i] * s + x[i+d/2] * c

that is out = R(angle) x for each pair, R a 2-D rotation matrix. Hugging Face
writes the halves form as x * cos_full + rotate_half(x) * sin_full with
rotate_half(x) = (-x[d/2:], x[:d/2]) and tables repeated to width d; the
repeat holds nothing new, so cos/sin here are (..., seq, d/2) in both layouts
(a caller holding Hugging Face's tables passes cos[..., :d/2]).

One kernel serves both layouts: the rotation of a pair is the same math, only
the offsets of its two members differ (2i and 2i+1, or i and i+d/2). The
``HALVES`` constexpr picks the offsets at compile time, so each layout is its
own compiled kernel with no runtime branch. Everything below holds pair by
pair, so it holds for either layout.

Backward: the map is linear in x with matrix R(angle), so dx = R(angle)^T dy,
and R^T = R(-angle) for a rotation. The backward pass is therefore the same
kernel run on dy with sin negated (the ``INVERSE`` constexpr), in the same
layout, not a second copy of the math. cos and sin are constants of the
position (tables built once by the model) and get no gradient.

Memory trick: x is not saved for backward (dx needs only dy and the tables),
so the forward keeps nothing alive but the cos/sin tables the model holds
anyway. Each program reads its rows of x once, as two loads that together
cover every cache line exactly once: stride-2 loads (even and odd elements)
for pairs, two contiguous half rows for halves, so splitting the pairs costs
no extra memory traffic in either layout; the tables, d/2 values per
position, are shared by every head and batch row and stay in cache.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from scratchlm.kernels._registration import check_float_tensor, check_same, kernel_op, launch

# One program rotates a tile of 1024 pairs (2048 elements of x): BLOCK_ROWS
# rows of up to BLOCK_PAIRS pairs. A head dim of 128 gives 16 rows per program
# instead of 64 pairs per program, enough work to hide memory latency.
TILE_PAIRS = 1024
# Pairs per step of the loop over a row; longer rows (d > 2048) take several steps.
MAX_BLOCK_PAIRS = 1024
NUM_WARPS = 4
# The ways of grouping a head's features into rotated pairs (see the module docstring).
LAYOUTS = ("pairs", "halves")


@triton.jit
def _rope_kernel(
    x_ptr,
    cos_ptr,
    sin_ptr,
    out_ptr,
    stride_x_row,
    stride_table_outer,
    stride_table_head,
    stride_table_seq,
    n_rows,
    n_heads,
    seq_len,
    n_pairs,
    INVERSE: tl.constexpr,
    HALVES: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_PAIRS: tl.constexpr,
):
    # int64 before multiplying: tensors over 2^31 elements must not wrap.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)  # (BLOCK_ROWS,)
    row_mask = rows < n_rows
    # Row r of x viewed as (outer, heads, seq, d) is (r // (heads * seq), r // seq % heads, r % seq).
    position = rows % seq_len
    head = (rows // seq_len) % n_heads
    outer = rows // seq_len // n_heads
    x_row = rows * stride_x_row
    table_row = outer * stride_table_outer + head * stride_table_head + position * stride_table_seq
    for start in range(0, n_pairs, BLOCK_PAIRS):
        pairs = start + tl.arange(0, BLOCK_PAIRS)  # (BLOCK_PAIRS,)
        mask = row_mask[:, None] & (pairs < n_pairs)[None, :]
        if HALVES:
            first = x_row[:, None] + pairs[None, :]  # offsets of x[i]; x[i+d/2] is half a row on
            second = first + n_pairs
        else:
            first = x_row[:, None] + 2 * pairs[None, :]  # offsets of x[2i]; x[2i+1] is the next element
            second = first + 1
        x0 = tl.load(x_ptr + first, mask=mask, other=0.0).to(tl.float32)
        x1 = tl.load(x_ptr + second, mask=mask, other=0.0).to(tl.float32)
        table = table_row[:, None] + pairs[None, :]
        cos = tl.load(cos_ptr + table, mask=mask, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + table, mask=mask, other=0.0).to(tl.float32)
        if INVERSE:
            sin = -sin
        tl.store(out_ptr + first, (x0 * cos - x1 * sin).to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(out_ptr + second, (x0 * sin + x1 * cos).to(out_ptr.dtype.element_ty), mask=mask)


def _launch_settings(n_pairs: int) -> tuple[int, int]:
    """(BLOCK_ROWS, BLOCK_PAIRS): a tile of TILE_PAIRS pairs, as many whole rows as fit."""
    block_pairs = min(triton.next_power_of_2(n_pairs), MAX_BLOCK_PAIRS)
    return max(1, TILE_PAIRS // block_pairs), block_pairs


def _table_as_4d(table: torch.Tensor, x_shape: torch.Size) -> torch.Tensor:
    """``table`` (..., seq, d/2) broadcast to x's (outer, heads, seq, d/2), without copying when possible.

    Broadcast dims get stride 0, so a (seq, d/2) table is read by every head
    and sequence; only leading dims that cannot be merged into one (e.g. a
    5-D x with a table varying in its first dim only) force a copy.
    """
    full = table.expand(*x_shape[:-1], table.shape[-1])  # (..., seq, d/2)
    while full.dim() < 4:
        full = full.unsqueeze(0)
    return full.flatten(0, -4)


@kernel_op("rope", fake=lambda x, cos, sin, inverse, halves=False: torch.empty_like(x))
def rope_rotate(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool, halves: bool = False
) -> torch.Tensor:
    """Rotate the pairs of contiguous x (..., seq, d) by the angles in cos/sin (..., seq, d/2).

    With ``inverse`` the rotation is by minus those angles (the backward pass).
    Pairs are (x[2i], x[2i+1]), or (x[i], x[i+d/2]) with ``halves``.
    """
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    n_pairs = x.shape[-1] // 2
    # cos and sin have one shape and are contiguous, so their 4-D views share strides.
    cos4, sin4 = _table_as_4d(cos, x.shape), _table_as_4d(sin, x.shape)
    _, n_heads, seq_len, _ = cos4.shape
    n_rows = x.numel() // x.shape[-1]
    block_rows, block_pairs = _launch_settings(n_pairs)
    grid = (triton.cdiv(n_rows, block_rows),)
    launch(_rope_kernel)[grid](
        x,
        cos4,
        sin4,
        out,
        x.shape[-1],
        cos4.stride(0),
        cos4.stride(1),
        cos4.stride(2),
        n_rows,
        n_heads,
        seq_len,
        n_pairs,
        INVERSE=inverse,
        HALVES=halves,
        BLOCK_ROWS=block_rows,
        BLOCK_PAIRS=block_pairs,
        num_warps=NUM_WARPS,
    )
    return out


class RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, halves: bool) -> torch.Tensor:
        cos, sin = cos.contiguous(), sin.contiguous()
        ctx.save_for_backward(cos, sin)
        ctx.halves = halves
        return rope_rotate(x.contiguous(), cos, sin, False, halves)

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        cos, sin = ctx.saved_tensors
        # dx = R(-angle) dy in the same layout; the tables are constants and get no gradient.
        return rope_rotate(dy.contiguous(), cos, sin, True, ctx.halves), None, None, None


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, layout: str = "pairs") -> torch.Tensor:
    """Rotate the feature pairs of x by the angles whose cos/sin are given.

    ``layout``: "pairs" rotates adjacent pairs (x[2i], x[2i+1]) (RoFormer,
    this project's model); "halves" rotates (x[i], x[i+d/2]), Hugging Face's
    ``rotate_half`` (Llama and most checkpoints on the Hub).

    The "rope" op's kernel (``scratchlm.model.backends``); ``apply_rope`` is
    its former name, the same function.

    ``x``: (..., seq, d) with d even, float32, bfloat16 or float16, any strides.
    ``cos``, ``sin``: one shape, (seq, d/2), or (..., seq, d/2) with leading
    dims broadcastable to x's (e.g. (batch, 1, seq, d/2) for x (batch, heads,
    seq, d)); float32 or x's dtype; x's device. Both layouts take the same
    d/2 angles: Hugging Face's tables, (..., seq, d) with the angles written
    twice, are passed as cos[..., :d/2] and sin[..., :d/2]. Computes in
    float32 and returns a contiguous tensor of x's shape and dtype. Gradients
    flow to x only: cos and sin are treated as constants. An unknown
    ``layout`` raises ValueError.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not a RoPE layout; expected one of {LAYOUTS}")
    check_float_tensor("x", x)
    check_float_tensor("cos", cos)
    check_float_tensor("sin", sin)
    if x.dim() < 2 or x.shape[-1] % 2 != 0:
        raise ValueError(f"x has shape {tuple(x.shape)}; expected (..., seq, d) with d even, since RoPE rotates pairs")
    if cos.device != x.device:
        raise ValueError(f"cos is on {cos.device} but x is on {x.device}; expected one device")
    if cos.dtype not in (torch.float32, x.dtype):
        raise TypeError(f"cos has dtype {cos.dtype}; expected float32 or x's dtype {x.dtype}")
    check_same("sin", sin, "cos", cos)
    if sin.shape != cos.shape:
        raise ValueError(f"sin has shape {tuple(sin.shape)} but cos has {tuple(cos.shape)}; expected the same shape")
    seq_len, n_pairs = x.shape[-2], x.shape[-1] // 2
    leading = x.shape[:-2]
    table_leading = cos.shape[:-2]
    broadcasts = cos.dim() >= 2 and len(table_leading) <= len(leading)
    if broadcasts:
        aligned = leading[len(leading) - len(table_leading) :]
        broadcasts = all(t in (1, n) for t, n in zip(table_leading, aligned))
    if not broadcasts or cos.shape[-2:] != (seq_len, n_pairs):
        raise ValueError(
            f"cos has shape {tuple(cos.shape)}; expected ({seq_len}, {n_pairs}) = (seq, d/2) for x of shape "
            f"{tuple(x.shape)}, optionally with leading dims broadcastable to {tuple(leading)}"
        )
    return RoPEFunction.apply(x, cos, sin, layout == "halves")


apply_rope = rope  # the former name, kept for code that uses it
