"""What is GeGLU's own beside SwiGLU's kernels (test_swiglu.py checks both gates against float64): the tanh gate."""

from __future__ import annotations

import math

import torch

from helpers import assert_close
from scratchlm.kernels import geglu

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_the_gate_is_the_written_out_tanh_formula_far_into_both_tails():
    """gelu_tanh(a) = a/2 (1 + tanh(u)), computed by the kernel as a * sigmoid(2u): equal, even where tanh saturates."""
    a = torch.linspace(-30, 30, 601, device=DEVICE)
    b = torch.ones_like(a)
    expected = 0.5 * a.double() * (1 + torch.tanh(math.sqrt(2 / math.pi) * (a.double() + 0.044715 * a.double() ** 3)))
    assert_close(geglu(a, b), expected, atol=1e-6, rtol=1e-6, name="gate")
