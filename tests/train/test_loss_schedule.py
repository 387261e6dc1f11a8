"""cross_entropy_loss against F.cross_entropy; the learning-rate schedule at its key points."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close

from scratchlm.train import cross_entropy_loss, learning_rate_schedule


@pytest.mark.parametrize("shape", [(6, 11), (2, 5, 17), (2, 3, 4, 9)])
def test_cross_entropy_matches_torch_any_leading_dims(shape):
    logits = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, shape[-1], shape[:-1])
    ours = cross_entropy_loss(logits, targets)
    expected = F.cross_entropy(logits.reshape(-1, shape[-1]), targets.reshape(-1))
    assert ours.shape == ()
    assert_close(ours, expected, atol=1e-12, rtol=0, name="loss")
    (grad_ours,) = torch.autograd.grad(ours, logits)
    (grad_expected,) = torch.autograd.grad(expected, logits)
    assert_close(grad_ours, grad_expected, atol=1e-12, rtol=0, name="dlogits")


def test_cross_entropy_is_stable_for_huge_logits():
    logits = torch.randn(4, 3, 50) * 1e4  # exp overflows float32 (and float64) without the shift
    logits[0, 0, 7] = 1e4
    targets = torch.randint(0, 50, (4, 3))
    ours = cross_entropy_loss(logits, targets)
    expected = F.cross_entropy(logits.reshape(-1, 50).double(), targets.reshape(-1))
    assert torch.isfinite(ours)
    assert_close(ours.double(), expected, atol=1e-3, rtol=1e-6, name="loss at 1e4 logits")


def test_cross_entropy_upcasts_half_precision():
    logits = torch.randn(8, 100).to(torch.bfloat16)
    targets = torch.randint(0, 100, (8,))
    ours = cross_entropy_loss(logits, targets)
    assert ours.dtype == torch.float32
    assert_close(ours, F.cross_entropy(logits.float(), targets), atol=1e-6, rtol=0, name="bf16 loss")


def test_cross_entropy_rejects_mismatched_targets():
    with pytest.raises(ValueError, match=r"targets .*\(2, 3\).*got \(2, 4\)"):
        cross_entropy_loss(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))


A_MAX, A_MIN, T_W, T_C = 1.0, 0.1, 10, 110


@pytest.mark.parametrize(
    "t, expected",
    [
        (0, 0.0),
        (5, 0.5),  # halfway through warmup
        (T_W, A_MAX),  # warmup ends at the peak
        (60, A_MIN + 0.5 * (A_MAX - A_MIN)),  # cosine midpoint
        (35, A_MIN + 0.5 * (1 + math.cos(math.pi * 0.25)) * (A_MAX - A_MIN)),
        (T_C, A_MIN),
        (T_C + 1, A_MIN),
        (10_000, A_MIN),
    ],
)
def test_learning_rate_schedule_key_points(t, expected):
    assert learning_rate_schedule(t, A_MAX, A_MIN, T_W, T_C) == pytest.approx(expected, abs=1e-12)


def test_learning_rate_schedule_is_monotone_after_warmup():
    values = [learning_rate_schedule(t, A_MAX, A_MIN, T_W, T_C) for t in range(T_W, T_C + 5)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_learning_rate_schedule_rejects_warmup_past_cycle():
    with pytest.raises(ValueError, match="T_w=20, T_c=10"):
        learning_rate_schedule(0, 1.0, 0.1, 20, 10)
