"""Cross-entropy of next-token logits, computed stably.

For one position with logits ``o`` over the vocabulary and target ``y``::

    loss = -log softmax(o)[y] = logsumexp(o) - o[y]
    logsumexp(o) = max(o) + log(sum(exp(o - max(o))))

Subtracting the max first keeps every ``exp`` in (0, 1], so logits of 1e4 (whose
``exp`` overflows even float64) give the exact loss instead of ``inf``/``nan``;
the softmax itself is never formed.
"""

from __future__ import annotations

import torch


def cross_entropy_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over all positions.

    ``logits``: (..., vocab) float; ``targets``: (...) integer ids in [0, vocab).
    Any number of leading dims, e.g. (batch, seq, vocab) with (batch, seq).
    Returns a scalar in float32 (float64 for float64 logits): half-precision
    logits are upcast first, since their rounding would swamp small losses.
    """
    if logits.dim() < 1 or tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"targets must have the shape of logits without its last (vocab) dim: "
            f"logits {tuple(logits.shape)} expects targets {tuple(logits.shape[:-1])}, got {tuple(targets.shape)}"
        )
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor of token ids, got dtype {targets.dtype}")
    if logits.dtype != torch.float64:
        logits = logits.float()
    row_max = logits.amax(dim=-1, keepdim=True).detach()
    shifted = logits - row_max
    log_sum_exp = shifted.exp().sum(dim=-1).log()
    target_logit = shifted.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    return (log_sum_exp - target_logit).mean()
