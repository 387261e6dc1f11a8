"""The lm_head matmul and cross-entropy in one pass over row chunks, in plain PyTorch.

For N rows of hidden states h (N, d), the head weight W (V, d) and targets y::

    logits = h W^T                                 (N, V), never held whole
             (with softcap c: c * tanh(h W^T / c), whose slope 1 - (logits / c)^2 joins G)
    lse_i  = logsumexp(logits_i)
    loss_i = lse_i - logits_i[y_i] + z_loss * lse_i^2      (0 where y_i == ignore_index)

and the loss is the mean over the non-ignored rows ("mean"), their sum
("sum"), or loss_i itself ("none").

Backward, per row: d loss_i / d logits_i = softmax_i * (1 + 2 z_loss lse_i) - onehot(y_i)
(the softmax is exp(logits_i - lse_i)), so with G the (N, V) gradient of the
logits, scaled by the reduction, d_hidden = G W and d_weight = G^T h.

Memory trick: the logits of a full batch are large (8192 tokens x 50257 words
x 4 bytes = 1.6 GB, and autograd keeps several such tensors), but every row is
independent. So the rows are walked in chunks of ``chunk_rows``: each chunk's
logits are formed in float32, reduced to the loss and at once turned into the
chunk's G, which is multiplied into d_hidden (its rows) and a float32
d_weight accumulator, then dropped. For "mean" and "sum" the whole gradient
is therefore ready when forward ends, and backward only multiplies it by the
(scalar) grad_output. For "none" each row's gradient carries its own
grad_output factor, unknown during forward; there forward keeps only its
inputs and backward walks the chunks again, recomputing the logits and the
softmax (one more matmul per chunk: the simplest correct way). Peak extra
memory is one chunk of logits (worked on in place) plus d_weight and d_hidden
in float32, and a float32 copy of a 16-bit weight.

This is the readable twin of the Triton kernel ``linear_cross_entropy`` and
follows the same contract.
"""

from __future__ import annotations

import torch
from torch import Tensor

from scratchlm.kernels._registration import compute_dtype

REDUCTIONS = ("mean", "sum", "none")

# Each chunk's float32 logits take about this many bytes (at least one row).
CHUNK_BYTES = 32 * 1024 * 1024


def default_chunk_rows(vocab_size: int) -> int:
    """Rows per chunk so that a chunk of float32 logits is about 32 MiB (at least 1 row)."""
    return max(1, CHUNK_BYTES // (4 * max(1, vocab_size)))


def _check_inputs(
    hidden: Tensor, weight: Tensor, targets: Tensor, reduction: str, z_loss: float, chunk_rows, softcap=None
) -> None:
    if not isinstance(hidden, Tensor) or not hidden.dtype.is_floating_point or hidden.dim() < 1:
        raise ValueError(f"hidden must be a floating-point tensor of shape (..., d), got {_describe(hidden)}")
    if not isinstance(weight, Tensor) or not weight.dtype.is_floating_point or weight.dim() != 2:
        raise ValueError(f"weight must be a floating-point tensor of shape (vocab, d), got {_describe(weight)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight has shape {tuple(weight.shape)}; expected (vocab, {hidden.shape[-1]}) to match hidden's last dim"
        )
    if weight.shape[0] < 1:
        raise ValueError(f"weight has shape {tuple(weight.shape)}; expected a vocabulary of at least one word")
    if not isinstance(targets, Tensor) or targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor of token ids, got {_describe(targets)}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"targets has shape {tuple(targets.shape)}; expected {tuple(hidden.shape[:-1])}, "
            f"hidden {tuple(hidden.shape)} without its last dim"
        )
    if hidden.device != weight.device or hidden.device != targets.device:
        raise ValueError(
            f"hidden, weight and targets are on {hidden.device}, {weight.device} and {targets.device}; "
            f"expected one device"
        )
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}: expected one of {list(REDUCTIONS)}")
    if not isinstance(z_loss, (int, float)) or z_loss < 0:
        raise ValueError(f"z_loss={z_loss!r}: expected a number >= 0")
    if softcap is not None and (
        isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not 0 < softcap < float("inf")
    ):
        raise ValueError(f"softcap={softcap!r}: expected a positive finite number or None (no capping)")
    if chunk_rows is not None and (not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise ValueError(f"chunk_rows={chunk_rows!r}: expected a positive int or None (about 32 MiB of logits)")


def _describe(value) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"{type(value).__name__} {value!r}"


def _chunk_logits(hidden: Tensor, weight: Tensor, softcap: float | None) -> tuple[Tensor, Tensor | None]:
    """(rows, V) logits of one chunk in the compute dtype, taken from inputs already in it, and with
    ``softcap`` c the derivative of the cap, 1 - tanh^2 = 1 - (logits / c)^2 (else None)."""
    logits = hidden @ weight.T
    if softcap is None:
        return logits, None
    capped = logits.div_(softcap).tanh_()
    slope = 1.0 - capped * capped
    return capped.mul_(softcap), slope


def _chunk_loss_and_grad(
    logits: Tensor, targets: Tensor, valid: Tensor, z_loss: float, row_scale: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """Per-row loss of one chunk and, with ``row_scale``, its logits gradient scaled per row.

    Works in place on ``logits`` (which the caller no longer needs), so a chunk
    costs one (rows, V) buffer: logits, then exp(logits - max), then the gradient.
    """
    safe_targets = torch.where(valid, targets, 0)  # ignored rows gather a dummy column, zeroed below
    target_logit = logits.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)  # before the buffer is reused
    row_max = logits.amax(dim=-1, keepdim=True)
    exp = logits.sub_(row_max).exp_()  # every exponent <= 0: no overflow
    sum_exp = exp.sum(dim=-1)
    lse = row_max.squeeze(-1) + sum_exp.log()
    loss = lse - target_logit
    if z_loss:
        loss = loss + z_loss * lse * lse
    loss = torch.where(valid, loss, 0.0)
    if row_scale is None:
        return loss, None
    # d loss / d logits = softmax * (1 + 2 z_loss lse) - onehot(target), times the row's scale.
    factor = 1.0 / sum_exp
    if z_loss:
        factor = factor * (1.0 + 2.0 * z_loss * lse)
    grad = exp.mul_(factor.unsqueeze(-1))
    grad.scatter_add_(-1, safe_targets.unsqueeze(-1), torch.full_like(lse, -1.0).unsqueeze(-1))
    # Ignored rows get scale 0: their (dummy) gradient vanishes.
    grad.mul_(torch.where(valid, row_scale, 0.0).unsqueeze(-1))
    return loss, grad


class LinearCrossEntropyChunked(torch.autograd.Function):
    """Loss of ``hidden @ weight.T`` against ``targets``, one chunk of rows at a time (see the module docstring)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, reduction, z_loss, chunk_rows, grad_wanted, softcap):
        # Under autocast the matmuls would drop to 16 bits; the contract is float32 math.
        with torch.autocast(hidden.device.type, enabled=False):
            return LinearCrossEntropyChunked._forward(
                ctx, hidden, weight, targets, ignore_index, reduction, z_loss, chunk_rows, grad_wanted, softcap
            )

    @staticmethod
    def _forward(ctx, hidden, weight, targets, ignore_index, reduction, z_loss, chunk_rows, grad_wanted, softcap):
        n_rows, vocab = hidden.shape[0], weight.shape[0]
        dtype = compute_dtype(torch.promote_types(hidden.dtype, weight.dtype))
        weight_c = weight.to(dtype)  # a no-op for float32 weights
        valid_all = targets != ignore_index
        # Under no_grad (evaluation) needs_input_grad still says True; grad_wanted knows better.
        grads_now = grad_wanted and reduction != "none"
        if reduction == "mean":
            # All rows ignored: count 0, loss 0 and gradients 0 (clamp avoids 0/0).
            count = valid_all.sum().clamp_min(1).to(dtype)
            scale = 1.0 / count
        else:
            scale = torch.ones((), dtype=dtype, device=hidden.device)
        losses = torch.empty(n_rows, dtype=dtype, device=hidden.device)
        d_hidden = torch.empty(n_rows, hidden.shape[1], dtype=dtype, device=hidden.device) if grads_now else None
        d_weight = torch.zeros(vocab, hidden.shape[1], dtype=dtype, device=hidden.device) if grads_now else None
        for start in range(0, n_rows, chunk_rows):
            rows = slice(start, min(start + chunk_rows, n_rows))
            hidden_c = hidden[rows].to(dtype)
            valid = valid_all[rows]
            row_scale = scale.expand(valid.shape) if grads_now else None
            logits, slope = _chunk_logits(hidden_c, weight_c, softcap)
            losses[rows], grad = _chunk_loss_and_grad(logits, targets[rows], valid, z_loss, row_scale)
            if grads_now:
                if slope is not None:
                    grad.mul_(slope)  # through the cap: d capped / d logit
                torch.matmul(grad, weight_c, out=d_hidden[rows])
                d_weight.addmm_(grad.T, hidden_c)
            del logits, grad, slope

        ctx.reduction, ctx.ignore_index, ctx.z_loss, ctx.chunk_rows = reduction, ignore_index, z_loss, chunk_rows
        ctx.softcap = softcap
        ctx.dtypes = (hidden.dtype, weight.dtype)
        if reduction == "none":
            ctx.save_for_backward(hidden, weight, targets)
            return losses
        ctx.save_for_backward(d_hidden, d_weight)
        return losses.sum() * scale if reduction == "mean" else losses.sum()

    @staticmethod
    def backward(ctx, grad_output):
        with torch.autocast(grad_output.device.type, enabled=False):
            return LinearCrossEntropyChunked._backward(ctx, grad_output)

    @staticmethod
    def _backward(ctx, grad_output):
        hidden_dtype, weight_dtype = ctx.dtypes
        if ctx.reduction != "none":
            d_hidden, d_weight = ctx.saved_tensors
            if d_hidden is None:
                return (None,) * 9
            g = grad_output.to(d_hidden.dtype)
            d_hidden = (d_hidden * g).to(hidden_dtype) if ctx.needs_input_grad[0] else None
            d_weight = (d_weight * g).to(weight_dtype) if ctx.needs_input_grad[1] else None
            return d_hidden, d_weight, None, None, None, None, None, None, None
        hidden, weight, targets = ctx.saved_tensors
        dtype = compute_dtype(torch.promote_types(hidden.dtype, weight.dtype))
        weight_c = weight.to(dtype)
        d_hidden = torch.empty(hidden.shape, dtype=dtype, device=hidden.device)
        d_weight = torch.zeros(weight.shape, dtype=dtype, device=hidden.device)
        row_scale_all = grad_output.to(dtype)
        for start in range(0, hidden.shape[0], ctx.chunk_rows):
            rows = slice(start, min(start + ctx.chunk_rows, hidden.shape[0]))
            hidden_c = hidden[rows].to(dtype)
            logits, slope = _chunk_logits(hidden_c, weight_c, ctx.softcap)
            valid = targets[rows] != ctx.ignore_index
            _, grad = _chunk_loss_and_grad(logits, targets[rows], valid, ctx.z_loss, row_scale_all[rows])
            if slope is not None:
                grad.mul_(slope)
            torch.matmul(grad, weight_c, out=d_hidden[rows])
            d_weight.addmm_(grad.T, hidden_c)
            del logits, grad, slope
        d_hidden = d_hidden.to(hidden_dtype) if ctx.needs_input_grad[0] else None
        d_weight = d_weight.to(weight_dtype) if ctx.needs_input_grad[1] else None
        return d_hidden, d_weight, None, None, None, None, None, None, None


def linear_cross_entropy_chunked(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    z_loss: float = 0.0,
    chunk_rows: int | None = None,
    softcap: float | None = None,
) -> Tensor:
    """Cross-entropy of ``hidden @ weight.T`` against ``targets`` without holding the (N, V) logits.

    hidden (..., d) any float dtype; weight (V, d); targets (...) integer ids,
    ``ignore_index`` marking rows that count for nothing. ``reduction``:
    "mean" over the non-ignored rows (0 when all are ignored), "sum", or
    "none" (per-row losses of shape (...), 0 at ignored rows). ``z_loss`` adds
    z_loss * logsumexp^2 per non-ignored row. The math is float32 (float64 for
    float64 inputs); the loss comes back in that dtype, the gradients in the
    inputs' dtypes. ``chunk_rows`` defaults to about 32 MiB of float32 logits.
    ``softcap`` c caps each logit z to c * tanh(z / c) first (Gemma 2's final
    soft-capping); a chunk then also holds the cap's slope, one more (rows, V) buffer.
    """
    _check_inputs(hidden, weight, targets, reduction, z_loss, chunk_rows, softcap)
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(weight.shape[0])
    flat_targets = targets.reshape(-1).long()
    hidden_2d = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    loss = LinearCrossEntropyChunked.apply(
        hidden_2d, weight.contiguous(), flat_targets, int(ignore_index), reduction, float(z_loss), chunk_rows,
        torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad),
        None if softcap is None else float(softcap),
    )
    return loss.view(targets.shape) if reduction == "none" else loss
