"""SwiGLU's gate, y = silu(a) * b, elementwise over rows x d_ff.

Bytes each mode must move (s = element size, M rows, F = d_ff):

    fwd      read a, b + write y                     3 M F s
    bwd      read a, b, dy + write da, db            5 M F s
    fwd_bwd  fwd + bwd                               8 M F s

sigmoid(a) is recomputed in the backward, so nothing else needs saving; an
unfused provider moves more and shows up as a lower GB/s.
"""

from __future__ import annotations

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

# 4096 rows by the d_ff of TinyLlama-style (2816, 5632), Llama-2 7B (11008) and
# Llama-3 8B (14336) feed-forward layers.
SHAPES = pick_shapes(
    full=[(4096, d_ff) for d_ff in (2816, 5632, 11008, 14336)],
    smoke=[(128, 704), (128, 2816)],
)


def bytes_moved(rows: int, d_ff: int, element_size: int, mode: str) -> int:
    per_tensor = rows * d_ff * element_size
    return 3 * per_tensor if mode == "fwd" else 8 * per_tensor


def _liger_swiglu() -> tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], str]:
    from liger_kernel.transformers.functional import liger_swiglu

    # Liger's backward writes da and db over a and b; the values drift from one
    # repetition to the next, which changes nothing about the time.
    return liger_swiglu, "backward overwrites its inputs a, b in place"


def _liger_geglu() -> tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], str]:
    from liger_kernel.ops.geglu import LigerGELUMulFunction

    return LigerGELUMulFunction.apply, "Liger's GELUMul (tanh approximation)"


LIGER_GATES = {"swiglu": _liger_swiglu, "geglu": _liger_geglu}


def gate_provider(op_name: str, provider: str) -> tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], str]:
    """(op(a, b), note) for one gate ("swiglu" or "geglu") and one provider; Triton runs SwiGLU's kernel for both."""
    from scratchlm.model import functional
    from scratchlm.model.backends import get_op

    require_provider(provider)
    if provider == "reference":
        return getattr(functional, op_name), ""
    if provider == "torch":
        return get_op(op_name, "torch"), ""
    if provider == "compile":
        return compiled(getattr(functional, op_name)), ""
    if provider == "triton":
        return import_kernel("swiglu", op_name), ""
    return LIGER_GATES[op_name]()


def measure_gate(benchmark, op_name: str, op, note: str, provider: str, shape: tuple[int, int], mode: str) -> None:
    """Time one gated-MLP middle op(a, b) (SwiGLU, GeGLU) on rows x d_ff inputs, forward or forward+backward."""
    dtype = dtype_under_test()
    rows, d_ff = shape
    a = torch.randn(rows, d_ff, device=DEVICE, dtype=dtype)
    b = torch.randn(rows, d_ff, device=DEVICE, dtype=dtype)
    if mode == "fwd":
        step = forward_step(op, (a, b))
    else:
        a.requires_grad_(True)
        b.requires_grad_(True)
        dy = torch.randn(rows, d_ff, device=DEVICE, dtype=dtype)
        step = forward_backward_step(op, (a, b), (a, b), (dy,))
    measure(
        benchmark,
        step,
        op=op_name,
        provider=provider,
        mode=mode,
        shape=shape,
        shape_label=f"{rows} x {d_ff}",
        bytes_moved=bytes_moved(rows, d_ff, a.element_size(), mode),
        dtype=dtype,
        note=note if mode == "fwd_bwd" else "",
    )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("provider", PROVIDERS)
def bench_swiglu(benchmark, provider: str, shape: tuple[int, int], mode: str) -> None:
    op, note = gate_provider("swiglu", provider)
    measure_gate(benchmark, "swiglu", op, note, provider, shape, mode)
