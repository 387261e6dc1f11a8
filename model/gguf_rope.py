"""Llama 3.1 RoPE scaling as a GGUF stores it: per-frequency factors.

Hugging Face configs describe the scaling by parameters, {"rope_type":
"llama3", factor, low_freq_factor, high_freq_factor,
original_max_position_embeddings}. llama.cpp's converter instead computes one
factor per rotary frequency and stores them as the tensor
``rope_freqs.weight`` (head_dim / 2 float32 values); at run time frequency
i becomes freq_i / factor_i. With wavelength w_i = 2 pi / freq_i and
L = original_max_position_embeddings:

    w_i < L / high_freq_factor      factor_i = 1                  (fast pairs untouched)
    w_i > L / low_freq_factor       factor_i = factor             (slow pairs slowed down)
    otherwise                       factor_i = 1 / ((1 - s) / factor + s),
                                    s = (L / w_i - low_freq_factor) / (high_freq_factor - low_freq_factor)

which is the Hugging Face formula written as a divisor. The metadata keeps no
parameters, so :func:`llama3_scaling_from_factors` recovers them and accepts
only factors that the recovered parameters reproduce.

The parameters are not unique: the factors depend on L only through
low_freq_factor / L and high_freq_factor / L. L is therefore fixed first
(the file's ``rope.scaling.original_context_length`` if present, else 8192,
the value of every Llama 3.x release), then the two factors are taken as
Meta's (1, 4) if they reproduce the tensor, else fitted (:func:`_fit_band`).
Whatever is chosen must reproduce every stored factor, so the model turns
exactly as llama.cpp would; only the spelling of the parameters may differ
from the original config.
"""

from __future__ import annotations

import math

import numpy as np

LLAMA3_ORIGINAL_CONTEXT = 8192
_META_FREQ_FACTORS = (1.0, 4.0)  # (low_freq_factor, high_freq_factor) of Llama 3.1, 3.2 and 3.3
# Stored as float32, computed by llama.cpp from float32 frequencies.
_RTOL = 1e-5


def llama3_factors(scaling: dict, theta: float, head_dim: int) -> np.ndarray:
    """The per-frequency divisors llama.cpp stores for ``scaling`` (float64, head_dim / 2 values)."""
    freqs = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelengths = 2 * math.pi / freqs
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    context = scaling["original_max_position_embeddings"]
    smooth = (context / wavelengths - low) / (high - low)
    medium = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelengths < context / high, 1.0, np.where(wavelengths > context / low, factor, medium))


def _matches(scaling: dict, factors: np.ndarray, theta: float, head_dim: int) -> bool:
    return bool(np.allclose(llama3_factors(scaling, theta, head_dim), factors, rtol=_RTOL, atol=0))


def _fit_band(inverse_wavelength: np.ndarray, factors: np.ndarray, factor: float) -> tuple[float, float] | None:
    """(alpha, beta) = (low_freq_factor / L, high_freq_factor / L) consistent with ``factors``.

    A pair with u_i = 1 / w_i is untouched when u_i > beta, slowed by
    ``factor`` when u_i < alpha, and in between s_i = (u_i - alpha) / (beta - alpha),
    where s_i follows from its factor. Two or more pairs in between fix the
    line; with fewer, any band between the neighbouring pairs fits, and the
    middle of the allowed range is taken.
    """
    margin = 1e-4 * (factor - 1)
    medium = (factors > 1 + margin) & (factors < factor - margin)
    slowed, untouched = factors >= factor - margin, factors <= 1 + margin
    u, smooth = inverse_wavelength[medium], (1 / factors[medium] - 1 / factor) / (1 - 1 / factor)
    below = inverse_wavelength[slowed].max() if slowed.any() else 0.0
    above = inverse_wavelength[untouched].min() if untouched.any() else 2 * inverse_wavelength.max()
    if u.size >= 2:
        slope, intercept = np.polyfit(u, smooth, 1)
        if slope <= 0:
            return None
        width = 1 / slope
        return -intercept * width, -intercept * width + width
    if u.size == 1:
        # alpha = u - s * width and beta = u + (1 - s) * width must stay strictly inside (below, above).
        (point,), (s,) = u, smooth
        limits = [(point - below) / s if s > 0 else math.inf, (above - point) / (1 - s) if s < 1 else math.inf]
        width = min(limits) / 2
        return point - s * width, point + (1 - s) * width
    gap = above - below
    return below + gap / 3, below + 2 * gap / 3


def llama3_scaling_from_factors(
    factors: np.ndarray, theta: float, head_dim: int, original_context: int | None, source: str
) -> dict | None:
    """The llama3 rope_scaling that gives ``factors``; None when all are 1 (no scaling).

    Raises ValueError, naming ``source``, when no llama3 parameters reproduce them.
    """
    factors = np.asarray(factors, dtype=np.float64).reshape(-1)
    if factors.shape != (head_dim // 2,):
        raise ValueError(
            f"{source}: rope_freqs.weight has {factors.size} values; expected head_dim / 2 = {head_dim // 2}"
        )
    if not np.all(np.isfinite(factors)) or np.any(factors <= 0):
        raise ValueError(f"{source}: rope_freqs.weight holds non-positive or non-finite values")
    if np.allclose(factors, 1.0, rtol=_RTOL, atol=0):
        return None
    context = int(original_context or LLAMA3_ORIGINAL_CONTEXT)
    factor = float(factors.max())
    base = {"rope_type": "llama3", "factor": factor, "original_max_position_embeddings": context}

    candidate = {**base, "low_freq_factor": _META_FREQ_FACTORS[0], "high_freq_factor": _META_FREQ_FACTORS[1]}
    if _matches(candidate, factors, theta, head_dim):
        return candidate
    freqs = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    band = _fit_band(freqs / (2 * math.pi), factors, factor) if factor > 1 else None
    if band is not None and 0 < band[0] < band[1]:
        candidate = {**base, "low_freq_factor": band[0] * context, "high_freq_factor": band[1] * context}
        if _matches(candidate, factors, theta, head_dim):
            return candidate
    raise ValueError(
        f"{source}: rope_freqs.weight = {np.round(factors, 6).tolist()} is not Llama 3.1 rope scaling for any "
        f"factor, low_freq_factor and high_freq_factor; only that scaling is supported"
    )
