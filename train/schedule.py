"""Learning-rate schedule: linear warmup, then cosine annealing, then a floor.

::

    t <  T_w:        a_t = t / T_w * a_max
    T_w <= t <= T_c: a_t = a_min + (1 + cos(pi * (t - T_w) / (T_c - T_w))) / 2 * (a_max - a_min)
    t >  T_c:        a_t = a_min

Warmup keeps the first updates small while Adam's second-moment estimate is
still noisy; the cosine spends most of the run near a_max and slows smoothly.
"""

from __future__ import annotations

import math


def learning_rate_schedule(t: int, a_max: float, a_min: float, T_w: int, T_c: int) -> float:
    """The learning rate at step ``t`` (0-based); see the module docstring."""
    if T_w < 0 or T_c < T_w:
        raise ValueError(f"expected 0 <= T_w <= T_c (warmup within the cosine cycle), got T_w={T_w}, T_c={T_c}")
    if t < T_w:
        return t / T_w * a_max
    if t <= T_c:
        # A zero-length cosine (T_c == T_w) is just the point a_max.
        progress = (t - T_w) / (T_c - T_w) if T_c > T_w else 0.0
        return a_min + 0.5 * (1.0 + math.cos(math.pi * progress)) * (a_max - a_min)
    return a_min
