"""GeGLU's gate, y = gelu_tanh(a) * b, elementwise over rows x d_ff (Gemma's MLP).

Bytes each mode must move (s = element size, M rows, F = d_ff), as for SwiGLU:

    fwd      read a, b + write y                     3 M F s
    fwd_bwd  fwd + (read a, b, dy + write da, db)    8 M F s

The Triton provider is SwiGLU's kernel with the GeLU (tanh) gate; its tanh is
computed as a sigmoid, so the two gates should run at the same GB/s.
"""

from __future__ import annotations

import pytest

from bench_swiglu import gate_provider, measure_gate
from common import MODES, PROVIDERS, pick_shapes, shape_id

# 4096 rows by Gemma 3's d_ff: 270M (2048), 1B (6912), 4B (10240), 12B (15360).
SHAPES = pick_shapes(
    full=[(4096, d_ff) for d_ff in (2048, 6912, 10240, 15360)],
    smoke=[(128, 704), (128, 2048)],
)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("provider", PROVIDERS)
def bench_geglu(benchmark, provider: str, shape: tuple[int, int], mode: str) -> None:
    op, note = gate_provider("geglu", provider)
    measure_gate(benchmark, "geglu", op, note, provider, shape, mode)
