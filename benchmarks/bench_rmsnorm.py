"""RMSNorm, y = x / sqrt(mean(x^2) + eps) * weight, over rows x hidden.

Bytes each mode must move (s = element size, M rows, N hidden; rstd is the
float32 1/rms per row a fused forward saves for the backward):

    fwd      read x (M N s) + read w (N s) + write y (M N s)
    bwd      read x, dy (2 M N s) + read w (N s) + read rstd (4 M)
             + write dx (M N s) + write dw (N s)
    fwd_bwd  fwd + write rstd (4 M) + bwd

This is the least a fused implementation can move; the same count is used for
every provider, so GB/s compares them on equal work (an unfused provider moves
more bytes and shows up as a lower GB/s).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import pytest
import torch

from common import (
    DEVICE,
    MODES,
    PROVIDERS,
    dtype_under_test,
    compiled,
    forward_backward_step,
    forward_step,
    import_kernel,
    measure,
    pick_shapes,
    require_provider,
    shape_id,
)

EPS = 1e-5
# 4096 rows (e.g. batch 4 x 1024 tokens) by the hidden sizes of models from
# GPT-2 medium (1024) to beyond Llama-2 70B (8192), up to 32768 to show long rows.
SHAPES = pick_shapes(
    full=[(4096, hidden) for hidden in (1024, 2048, 4096, 8192, 16384, 32768)],
    smoke=[(128, 512), (128, 1000), (128, 2048)],
)


def bytes_moved(rows: int, hidden: int, element_size: int, mode: str) -> int:
    forward = 2 * rows * hidden * element_size + hidden * element_size
    if mode == "fwd":
        return forward
    backward = 3 * rows * hidden * element_size + 2 * hidden * element_size + 4 * rows
    return forward + 4 * rows + backward


def rmsnorm_provider(provider: str) -> Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]:
    """op(x, weight, eps) for one provider."""
    from scratchlm.model import functional
    from scratchlm.model.backends import get_op

    require_provider(provider)
    if provider == "reference":
        return functional.rmsnorm
    if provider == "torch":
        return get_op("rmsnorm", "torch")
    if provider == "compile":
        return compiled(functional.rmsnorm)
    if provider == "triton":
        return import_kernel("rmsnorm", "rmsnorm")
    from liger_kernel.transformers.functional import liger_rms_norm

    # in_place=False where the release has it: Liger otherwise writes dx over
    # dy, the grad_output every repetition reuses.
    keywords = {"in_place": False} if "in_place" in inspect.signature(liger_rms_norm).parameters else {}

    def liger(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return liger_rms_norm(x, weight, eps, **keywords)

    return liger


def _measure_norm(benchmark, op, provider: str, shape: tuple[int, int], mode: str, offset: float) -> None:
    """Time op(x, weight, EPS) with weights around 1 - offset (the scale offset + weight stays near 1)."""
    dtype = dtype_under_test()
    rows, hidden = shape
    x = torch.randn(rows, hidden, device=DEVICE, dtype=dtype)
    weight = (1.0 - offset) + 0.1 * torch.randn(hidden, device=DEVICE, dtype=dtype)
    if mode == "fwd":
        step = forward_step(op, (x, weight, EPS))
    else:
        x.requires_grad_(True)
        weight.requires_grad_(True)
        dy = torch.randn_like(x)
        step = forward_backward_step(op, (x, weight, EPS), (x, weight), (dy,))
    measure(
        benchmark,
        step,
        op="rmsnorm",
        provider=provider,
        mode=mode,
        shape=shape,
        shape_label=f"{rows} x {hidden}" + (f", offset {offset:g}" if offset else ""),
        bytes_moved=bytes_moved(rows, hidden, x.element_size(), mode),
        dtype=dtype,
        extra={"offset": offset} if offset else None,
    )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("provider", PROVIDERS)
def bench_rmsnorm(benchmark, provider: str, shape: tuple[int, int], mode: str) -> None:
    _measure_norm(benchmark, rmsnorm_provider(provider), provider, shape, mode, offset=0.0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("provider", [p for p in PROVIDERS if p != "liger"])
def bench_rmsnorm_offset(benchmark, provider: str, shape: tuple[int, int], mode: str) -> None:
    """Gemma's norm, x / rms(x) * (1 + weight): the same bytes as the plain norm, one more add per weight."""
    plain = rmsnorm_provider(provider)

    def op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return plain(x, weight, eps, offset=1.0)

    _measure_norm(benchmark, op, provider, shape, mode, offset=1.0)
