"""GeGLU's gate, y = gelu_tanh(a) * b, elementwise over rows x d_ff (Gemma's MLP).

Bytes each mode must move (s = element size, M rows, F = d_ff), as for SwiGLU:

    fwd      read a, b + write y                     3 M F s
    fwd_bwd  fwd + (read a, b, dy + write da, db)    8 M F s

The Triton provider is SwiGLU's kernel with the GeLU (tanh) gate; its tanh is
computed as a sigmoid, so the two gates should run at the same GB/s.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from bench_swiglu import measure_gate
from common import MODES, PROVIDERS, compiled, import_kernel, pick_shapes, require_provider, shape_id

# 4096 rows by Gemma 3's d_ff: 270M (2048), 1B (6912), 4B (10240), 12B (15360).
SHAPES = pick_shapes(
    full=[(4096, d_ff) for d_ff in (2048, 6912, 10240, 15360)],
    smoke=[(128, 704), (128, 2048)],
)


def geglu_provider(provider: str) -> tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], str]:
    """(op(a, b), note) for one provider."""
    from scratchlm.model import functional
    from scratchlm.model.backends import get_op

    require_provider(provider)
    if provider == "reference":
        return functional.geglu, ""
    if provider == "torch":
        return get_op("geglu", "torch"), ""
    if provider == "compile":
        return compiled(functional.geglu), ""
    if provider == "triton":
        return import_kernel("swiglu", "geglu"), ""
    from liger_kernel.ops.geglu import LigerGELUMulFunction

    return LigerGELUMulFunction.apply, "Liger's GELUMul (tanh approximation)"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("provider", PROVIDERS)
def bench_geglu(benchmark, provider: str, shape: tuple[int, int], mode: str) -> None:
    op, note = geglu_provider(provider)
    measure_gate(benchmark, "geglu", op, note, provider, shape, mode)
