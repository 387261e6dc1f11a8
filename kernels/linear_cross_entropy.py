"""Fused lm_head + cross-entropy: the loss of logits = h W^T without the (N, V) logits.

For a row h (d,) with target t, weight W (V, d) and z = W h (the logits):

    lse  = log(sum_j exp(z_j))
    loss = lse - z_t + z_loss * lse^2       (the last term is PaLM's z-loss)

With ``softcap`` c (Gemma 2), z is first capped to c * tanh(z / c) wherever
it is formed, and the backward multiplies dZ by the cap's slope
1 - (capped z / c)^2 (a constexpr SOFTCAP: the uncapped kernels are unchanged).

Rows whose target is ``ignore_index`` contribute 0 and are not counted in the
mean. Forward: one program per block of rows walks the vocabulary in tiles;
each logit tile is h_block @ W_tile^T (float32 accumulation, d itself walked
in tiles so d = 4096 never sits in registers), folded into a running max m
and running sum l in log2 units (exp2, as in the attention kernel):

    m_new = max(m, rowmax(z_tile * log2(e)))
    l     = l * exp2(m - m_new) + rowsum(exp2(z_tile * log2(e) - m_new))

and the target's logit is picked out of the tile it falls in. At the end
lse = ln(2) * (m + log2(l)); lse is saved, one float32 per row.

Backward, with p = softmax(z) = exp(z - lse) and g the upstream gradient of
the row's loss (scalar / count for "mean", scalar for "sum", per row for "none"):

    d loss / d z_j = p_j - [j = t] + z_loss * 2 * lse * p_j    (d lse / d z_j = p_j)
    dZ = g * (p * (1 + 2 z_loss lse) - onehot(t))              (0 on ignored rows)
    dH = dZ W,   dW = dZ^T H

Memory trick: the logits are never stored, forward or backward. The backward
recomputes each (rows, vocab) tile of p from the saved lse (exact, no running
max needed) and uses it at once: the dH kernel (one program per row block,
looping over vocab tiles) adds dZ_tile W_tile into its own rows of dH, the dW
kernel (one program per vocab block, looping over row blocks) adds
dZ_tile^T H_block into its own rows of dW. Each gradient element therefore
has a single writer that adds its terms in a fixed order: no atomics, and
bitwise-identical gradients from run to run. The price is computing the
logits three times (forward, dH, dW); extra memory is O(N) plus a float32
copy of dH and dW for 16-bit inputs, the buffers the kernels add into tile
by tile (rows of d are walked in BLOCK_D tiles there too). For 16-bit inputs
each dZ tile is rounded to the input dtype before its two products, as
PyTorch's own 16-bit backward rounds dZ, so they run on tensor cores.

Targets are read as values and only compared with vocabulary indices, so a
target out of [0, V) can never cause an out-of-bounds read; the public
function still refuses one, checking min and max on the host (skipped while
torch.compile traces, where that check would need a graph break).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from scratchlm.kernels._registration import INTERPRETING, check_float_tensor, check_same, kernel_op, launch
from scratchlm.kernels._triton_utils import LN2, LOG2E, dot, round_to

REDUCTIONS = ("mean", "sum", "none")


@triton.jit
def _load_rows(base, stride, rows_left, offs_d, dim, BLOCK_ROWS: tl.constexpr):
    """Columns ``offs_d`` of the BLOCK_ROWS rows at ``base``, (BLOCK_ROWS, BLOCK_D); 0 outside the matrix."""
    offs_r = tl.arange(0, BLOCK_ROWS)
    mask = (offs_r < rows_left)[:, None] & (offs_d < dim)[None, :]
    return tl.load(base + offs_r[:, None] * stride + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _logits_tile(
    h_block, w_tile, stride_h, stride_w, rows_left, vocab_left, dim,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """(BLOCK_M, BLOCK_V) float32 logits of the rows at ``h_block`` against the vocabulary rows at
    ``w_tile``, walking d in BLOCK_D tiles; 0 past ``rows_left`` rows and ``vocab_left`` entries."""
    # Offsets inside a tile are int32: the tile's base pointer carries the int64 part.
    acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
    for start_d in range(0, dim, BLOCK_D):
        offs_d = start_d + tl.arange(0, BLOCK_D)
        h = _load_rows(h_block, stride_h, rows_left, offs_d, dim, BLOCK_M)
        w = _load_rows(w_tile, stride_w, vocab_left, offs_d, dim, BLOCK_V)
        acc = dot(h, tl.trans(w), acc)
    return acc


@triton.jit
def _capped(z, softcap, SOFTCAP: tl.constexpr):
    """softcap * tanh(z / softcap) when SOFTCAP, else z; tanh from exp2 of -2|x| (never overflows)."""
    if SOFTCAP:
        x = z / softcap
        e = tl.exp2(tl.abs(x) * (-2.0 * LOG2E))
        t = (1.0 - e) / (1.0 + e)
        z = softcap * tl.where(x < 0, -t, t)
    return z


@triton.jit
def _local_targets(targets_ptr, start_m, rows_left, ignore_index, BLOCK_M: tl.constexpr):
    """The block's targets as int32 vocabulary ids, -1 on ignored and padding rows (never a column)."""
    offs_m = tl.arange(0, BLOCK_M)
    targets = tl.load(targets_ptr + start_m + offs_m, mask=offs_m < rows_left, other=ignore_index)
    return tl.where(targets == ignore_index, -1, targets).to(tl.int32)


@triton.jit
def _lce_fwd_kernel(
    h_ptr, w_ptr, targets_ptr, loss_ptr, lse_ptr,
    stride_h, stride_w,
    n_rows, vocab, dim, ignore_index, z_loss, softcap,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, SOFTCAP: tl.constexpr,
):  # fmt: skip
    # One program per block of rows; int64 so start_m * stride never wraps.
    start_m = tl.program_id(0).to(tl.int64) * BLOCK_M
    rows_left = n_rows - start_m
    h_block = h_ptr + start_m * stride_h
    targets = _local_targets(targets_ptr, start_m, rows_left, ignore_index, BLOCK_M)
    offs_v = tl.arange(0, BLOCK_V)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    target_logit = tl.zeros([BLOCK_M], dtype=tl.float32)
    w_tile = w_ptr  # advanced by whole tiles: pointer arithmetic is 64-bit
    for start_v in range(0, vocab, BLOCK_V):
        vocab_left = vocab - start_v
        z = _logits_tile(h_block, w_tile, stride_h, stride_w, rows_left, vocab_left, dim, BLOCK_M, BLOCK_V, BLOCK_D)
        z = _capped(z, softcap, SOFTCAP)
        target_logit += tl.sum(tl.where(offs_v[None, :] == targets[:, None] - start_v, z, 0.0), 1)
        s = tl.where((offs_v < vocab_left)[None, :], z * LOG2E, float("-inf"))
        # Every tile holds at least one real column, so m_new is finite and
        # the first tile's rescale factor is exp2(-inf) = 0, never NaN.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
        m_i = m_new
        w_tile += BLOCK_V * stride_w
    lse = (m_i + tl.log2(l_i)) * LN2  # back to natural log
    loss = tl.where(targets < 0, 0.0, lse - target_logit + z_loss * lse * lse)
    offs_m = tl.arange(0, BLOCK_M)
    tl.store(loss_ptr + start_m + offs_m, loss, mask=offs_m < rows_left)
    tl.store(lse_ptr + start_m + offs_m, lse, mask=offs_m < rows_left)


@triton.jit
def _row_state(targets_ptr, lse_ptr, grad_ptr, start_m, rows_left, ignore_index, z_loss, BLOCK_M: tl.constexpr):
    """Per row of a block: the local target, lse in log2 units, g * (1 + 2 z_loss lse) and g
    (g = 0 on ignored and padding rows, so their dZ is 0)."""
    offs_m = tl.arange(0, BLOCK_M)
    m_mask = offs_m < rows_left
    targets = _local_targets(targets_ptr, start_m, rows_left, ignore_index, BLOCK_M)
    lse = tl.load(lse_ptr + start_m + offs_m, mask=m_mask, other=0.0)
    g = tl.load(grad_ptr + start_m + offs_m, mask=m_mask, other=0.0)
    g = tl.where(targets < 0, 0.0, g)
    return targets, lse * LOG2E, g * (1.0 + 2.0 * z_loss * lse), g


@triton.jit
def _dlogits(z, targets, lse_log2, p_scale, g, vocab_left, softcap, BLOCK_V: tl.constexpr, SOFTCAP: tl.constexpr):
    """dZ = g * (p * (1 + 2 z_loss lse) - onehot(t)) for one (rows, vocab) tile of raw logits ``z``,
    0 past the vocabulary; with SOFTCAP, through the cap: times 1 - tanh^2 = 1 - (capped / softcap)^2.
    ``targets`` are relative to the tile's first vocabulary entry."""
    offs_v = tl.arange(0, BLOCK_V)
    z = _capped(z, softcap, SOFTCAP)
    p = tl.exp2(z * LOG2E - lse_log2[:, None])
    p = tl.where((offs_v < vocab_left)[None, :], p, 0.0)
    onehot = offs_v[None, :] == targets[:, None]
    dz = p * p_scale[:, None] - tl.where(onehot, g[:, None], 0.0)
    if SOFTCAP:
        ratio = z / softcap
        dz = dz * (1.0 - ratio * ratio)
    return dz


@triton.jit
def _lce_bwd_dh_kernel(
    h_ptr, w_ptr, targets_ptr, lse_ptr, grad_ptr, dh_ptr,
    stride_h, stride_w, stride_dh,
    n_rows, vocab, dim, ignore_index, z_loss, softcap,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, SOFTCAP: tl.constexpr,
):  # fmt: skip
    # One program per row block owns those rows of the float32, zeroed dH and
    # adds dZ_tile @ W_tile into them, vocabulary tile after tile, in order.
    start_m = tl.program_id(0).to(tl.int64) * BLOCK_M
    rows_left = n_rows - start_m
    h_block = h_ptr + start_m * stride_h
    dh_block = dh_ptr + start_m * stride_dh
    targets, lse_log2, p_scale, g = _row_state(
        targets_ptr, lse_ptr, grad_ptr, start_m, rows_left, ignore_index, z_loss, BLOCK_M
    )  # fmt: skip
    offs_m = tl.arange(0, BLOCK_M)
    m_mask = offs_m < rows_left
    w_tile = w_ptr
    for start_v in range(0, vocab, BLOCK_V):
        vocab_left = vocab - start_v
        z = _logits_tile(h_block, w_tile, stride_h, stride_w, rows_left, vocab_left, dim, BLOCK_M, BLOCK_V, BLOCK_D)
        dz = _dlogits(z, targets - start_v, lse_log2, p_scale, g, vocab_left, softcap, BLOCK_V, SOFTCAP)
        dz = round_to(dz, w_ptr.dtype.element_ty)
        for start_d in range(0, dim, BLOCK_D):
            offs_d = start_d + tl.arange(0, BLOCK_D)
            d_mask = offs_d < dim
            w = _load_rows(w_tile, stride_w, vocab_left, offs_d, dim, BLOCK_V)
            dh_ptrs = dh_block + offs_m[:, None] * stride_dh + offs_d[None, :]
            dh_mask = m_mask[:, None] & d_mask[None, :]
            dh = dot(dz, w, tl.load(dh_ptrs, mask=dh_mask, other=0.0))
            tl.store(dh_ptrs, dh, mask=dh_mask)
        w_tile += BLOCK_V * stride_w


@triton.jit
def _lce_bwd_dw_kernel(
    h_ptr, w_ptr, targets_ptr, lse_ptr, grad_ptr, dw_ptr,
    stride_h, stride_w, stride_dw,
    n_rows, vocab, dim, ignore_index, z_loss, softcap,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, SOFTCAP: tl.constexpr,
):  # fmt: skip
    # One program per vocabulary block owns those rows of the float32, zeroed
    # dW and adds dZ_tile^T @ H_block into them, row block after row block.
    start_v = tl.program_id(0).to(tl.int64) * BLOCK_V
    vocab_left = vocab - start_v
    w_tile = w_ptr + start_v * stride_w
    dw_tile = dw_ptr + start_v * stride_dw
    offs_v = tl.arange(0, BLOCK_V)
    v_mask = offs_v < vocab_left
    h_block = h_ptr
    for start_m in range(0, n_rows, BLOCK_M):
        rows_left = n_rows - start_m
        targets, lse_log2, p_scale, g = _row_state(
            targets_ptr, lse_ptr, grad_ptr, start_m, rows_left, ignore_index, z_loss, BLOCK_M
        )  # fmt: skip
        z = _logits_tile(h_block, w_tile, stride_h, stride_w, rows_left, vocab_left, dim, BLOCK_M, BLOCK_V, BLOCK_D)
        dz = _dlogits(z, targets - start_v.to(tl.int32), lse_log2, p_scale, g, vocab_left, softcap, BLOCK_V, SOFTCAP)
        dz_t = round_to(tl.trans(dz), h_ptr.dtype.element_ty)
        for start_d in range(0, dim, BLOCK_D):
            offs_d = start_d + tl.arange(0, BLOCK_D)
            d_mask = offs_d < dim
            h = _load_rows(h_block, stride_h, rows_left, offs_d, dim, BLOCK_M)
            dw_ptrs = dw_tile + offs_v[:, None] * stride_dw + offs_d[None, :]
            dw_mask = v_mask[:, None] & d_mask[None, :]
            dw = dot(dz_t, h, tl.load(dw_ptrs, mask=dw_mask, other=0.0))
            tl.store(dw_ptrs, dw, mask=dw_mask)
        h_block += BLOCK_M * stride_h


class LaunchSettings(NamedTuple):
    block_m: int  # rows per tile
    block_v: int  # vocabulary entries per tile
    block_d: int  # hidden features per step of the inner d loop
    num_warps: int
    num_stages: int


# Under the interpreter every tile op is a numpy call: small tiles keep the
# tests fast and still give several row, vocabulary and d tiles, ragged ones
# included, on shapes like (37, 24, 131). 16 is the smallest tl.dot.
INTERPRETER_SETTINGS = LaunchSettings(16, 32, 16, 4, 1)


def launch_settings(element_size: int) -> LaunchSettings:
    """Fixed launch settings by element size: one shape always launches, and rounds, the same way.

    16-bit inputs take 64 x 128 (rows x vocab) tiles with d walked 32 at a
    time, float32 16 x 64 tiles and 16-wide d steps, on 8 warps: the largest
    that compile without spilling on every generation from sm_80 to sm_120
    (figures in ``kernels/NOTES.md``).
    """
    if INTERPRETING:
        return INTERPRETER_SETTINGS
    if element_size == 2:
        return LaunchSettings(64, 128, 32, 8, 3)
    return LaunchSettings(16, 64, 16, 8, 3)


def _fwd_fake(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int, z_loss: float, softcap: float
):
    rows = hidden.shape[0]
    return hidden.new_empty(rows, dtype=torch.float32), hidden.new_empty(rows, dtype=torch.float32)


@kernel_op("linear_cross_entropy_fwd", fake=_fwd_fake)
def linear_cross_entropy_fwd(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int, z_loss: float, softcap: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, lse), float32 (N,) each, for hidden (N, d) and weight (V, d) with unit last-dim
    strides and int64 targets (N,); loss is 0 on ignored rows. ``softcap`` 0 is no capping."""
    n_rows, dim = hidden.shape
    vocab = weight.shape[0]
    loss = torch.empty(n_rows, device=hidden.device, dtype=torch.float32)
    lse = torch.empty(n_rows, device=hidden.device, dtype=torch.float32)
    if n_rows:
        s = launch_settings(hidden.element_size())
        launch(_lce_fwd_kernel)[(triton.cdiv(n_rows, s.block_m),)](
            hidden, weight, targets, loss, lse,
            hidden.stride(0), weight.stride(0),
            n_rows, vocab, dim, ignore_index, z_loss, softcap,
            BLOCK_M=s.block_m, BLOCK_V=s.block_v, BLOCK_D=s.block_d, SOFTCAP=softcap > 0,
            num_warps=s.num_warps, num_stages=s.num_stages,
        )  # fmt: skip
    return loss, lse


def _bwd_fake(hidden, weight, targets, lse, grad, ignore_index: int, z_loss: float, softcap: float):
    return torch.empty_like(hidden), torch.empty_like(weight)


@kernel_op("linear_cross_entropy_bwd", fake=_bwd_fake)
def linear_cross_entropy_bwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    grad: torch.Tensor,
    ignore_index: int,
    z_loss: float,
    softcap: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d_hidden, d_weight) in the inputs' dtypes, from the forward's inputs, its lse and
    ``grad``, the float32 (N,) gradient of each row's loss (ignored rows are zeroed here)."""
    n_rows, dim = hidden.shape
    vocab = weight.shape[0]
    # The kernels add tile after tile into float32 buffers, so they start at zero.
    dh = torch.zeros(n_rows, dim, device=hidden.device, dtype=torch.float32)
    dw = torch.zeros(vocab, dim, device=hidden.device, dtype=torch.float32)
    if n_rows:
        s = launch_settings(hidden.element_size())
        options = {"BLOCK_M": s.block_m, "BLOCK_V": s.block_v, "BLOCK_D": s.block_d, "SOFTCAP": softcap > 0}
        options.update(num_warps=s.num_warps, num_stages=s.num_stages)
        launch(_lce_bwd_dh_kernel)[(triton.cdiv(n_rows, s.block_m),)](
            hidden, weight, targets, lse, grad, dh,
            hidden.stride(0), weight.stride(0), dh.stride(0),
            n_rows, vocab, dim, ignore_index, z_loss, softcap, **options,
        )  # fmt: skip
        launch(_lce_bwd_dw_kernel)[(triton.cdiv(vocab, s.block_v),)](
            hidden, weight, targets, lse, grad, dw,
            hidden.stride(0), weight.stride(0), dw.stride(0),
            n_rows, vocab, dim, ignore_index, z_loss, softcap, **options,
        )  # fmt: skip
    return dh.to(hidden.dtype), dw.to(weight.dtype)


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """x (..., d) as (rows, d) with a unit last-dim stride; a view whenever the leading dims merge."""
    x = x.reshape(-1, x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        ignore_index: int,
        reduction: str,
        z_loss: float,
        softcap: float = 0.0,
    ) -> torch.Tensor:
        hidden_2d, weight = _as_rows(hidden), weight if weight.stride(-1) == 1 else weight.contiguous()
        targets_1d = targets.reshape(-1).to(torch.int64)
        loss, lse = linear_cross_entropy_fwd(hidden_2d, weight, targets_1d, ignore_index, z_loss, softcap)
        count = (targets_1d != ignore_index).sum()
        ctx.save_for_backward(hidden_2d, weight, targets_1d, lse, count)
        ctx.ignore_index, ctx.reduction, ctx.z_loss, ctx.hidden_shape = ignore_index, reduction, z_loss, hidden.shape
        ctx.softcap = softcap
        if reduction == "none":
            return loss.view(targets.shape)
        total = loss.sum()
        # All rows ignored: count 0, the sum is 0, and so is the mean (not 0/0).
        return total / count.clamp_min(1) if reduction == "mean" else total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        hidden_2d, weight, targets_1d, lse, count = ctx.saved_tensors
        n_rows = targets_1d.shape[0]
        grad_out = grad_out.float()
        if ctx.reduction == "none":
            grad = grad_out.reshape(n_rows).contiguous()
        elif ctx.reduction == "sum":
            grad = grad_out.expand(n_rows).contiguous()
        else:
            grad = (grad_out / count.clamp_min(1)).expand(n_rows).contiguous()
        dh, dw = linear_cross_entropy_bwd(
            hidden_2d, weight, targets_1d, lse, grad, ctx.ignore_index, ctx.z_loss, ctx.softcap
        )
        return dh.view(ctx.hidden_shape), dw, None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    z_loss: float = 0.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` against ``targets``, never holding the logits.

    ``hidden``: (..., d), float32, bfloat16 or float16, any layout. ``weight``:
    (V, d), hidden's dtype and device. ``targets``: hidden's leading dims, any
    integer dtype, each in [0, V) or ``ignore_index``; ignored rows add nothing
    and are not counted in the mean (all ignored: loss 0, zero gradients).
    ``reduction``: "mean", "sum", or "none" (per-row losses in targets' shape,
    0 where ignored). ``z_loss`` >= 0 adds z_loss * logsumexp^2 per counted
    row. ``softcap`` c first caps each logit z to c * tanh(z / c) (Gemma 2's
    final soft-capping). Computes in float32 and returns float32. Targets out of range raise
    ValueError, checked on the host from their min and max (one device sync),
    except while torch.compile traces.
    """
    check_float_tensor("hidden", hidden)
    check_float_tensor("weight", weight)
    check_same("weight", weight, "hidden", hidden)
    if hidden.dim() == 0 or hidden.shape[-1] == 0:
        raise ValueError(f"hidden has shape {tuple(hidden.shape)}; expected (..., d) with d >= 1")
    if weight.dim() != 2 or weight.shape[0] == 0 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight has shape {tuple(weight.shape)} but hidden has d = {hidden.shape[-1]}; "
            f"expected (V, {hidden.shape[-1]}) with V >= 1"
        )
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"targets has dtype {targets.dtype}; expected an integer dtype")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(
            f"targets has shape {tuple(targets.shape)} but hidden has shape {tuple(hidden.shape)}; "
            f"expected {tuple(hidden.shape[:-1])}"
        )
    if targets.device != hidden.device:
        raise ValueError(f"targets is on {targets.device} but hidden is on {hidden.device}; expected one device")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index is {ignore_index!r}; expected an int")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction is {reduction!r}; expected one of {', '.join(map(repr, REDUCTIONS))}")
    if isinstance(z_loss, bool) or not isinstance(z_loss, (int, float)) or not 0 <= z_loss < float("inf"):
        raise ValueError(f"z_loss is {z_loss!r}; expected a finite number >= 0")
    if softcap is not None and (
        isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not 0 < softcap < float("inf")
    ):
        raise ValueError(f"softcap is {softcap!r}; expected a positive finite number or None (no capping)")
    if hidden.device.type != "cuda" and not INTERPRETING:
        raise ValueError(f"hidden is on {hidden.device}; the Triton kernels need a CUDA device (or TRITON_INTERPRET=1)")
    if not torch.compiler.is_compiling():
        _check_target_range(targets, ignore_index, weight.shape[0])
    cap = 0.0 if softcap is None else float(softcap)
    return LinearCrossEntropyFunction.apply(hidden, weight, targets, ignore_index, reduction, float(z_loss), cap)


def _check_target_range(targets: torch.Tensor, ignore_index: int, vocab: int) -> None:
    """Refuse targets outside [0, vocab) other than ignore_index, from their min and max."""
    counted = targets[targets != ignore_index]
    if counted.numel():
        low, high = int(counted.min()), int(counted.max())
        if low < 0 or high >= vocab:
            bad = low if low < 0 else high
            raise ValueError(
                f"targets holds {bad}, outside [0, {vocab}) (weight has V = {vocab} rows) "
                f"and not ignore_index = {ignore_index}"
            )
