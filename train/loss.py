"""Cross-entropy of next-token logits, computed stably.

For one position with logits ``o`` over the vocabulary and target ``y``::

    loss = -log softmax(o)[y] = logsumexp(o) - o[y]
    logsumexp(o) = max(o) + log(sum(exp(o - max(o))))

Subtracting the max first keeps every ``exp`` in (0, 1], so logits of 1e4 (whose
``exp`` overflows even float64) give the exact loss instead of ``inf``/``nan``;
the softmax itself is never formed. The math lives in
``scratchlm.model.functional.cross_entropy``, which the model's "reference"
loss backend uses too, so training through the model and scoring logits here
give the same number.
"""

from __future__ import annotations

import torch

from scratchlm.model.functional import cross_entropy


def cross_entropy_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int | None = None) -> torch.Tensor:
    """Mean cross-entropy over all positions (those whose target is not ``ignore_index``).

    ``logits``: (..., vocab) float; ``targets``: (...) integer ids in [0, vocab).
    Any number of leading dims, e.g. (batch, seq, vocab) with (batch, seq).
    Returns a scalar in float32 (float64 for float64 logits): half-precision
    logits are upcast first, since their rounding would swamp small losses.
    """
    return cross_entropy(logits, targets, ignore_index)
