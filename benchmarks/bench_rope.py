"""RoPE: rotate feature pairs of q or k by per-position angles, in both layouts.

Layout "pairs" rotates adjacent pairs (x[2i], x[2i+1]) (this project's
model), "halves" rotates (x[i], x[i+d/2]) (Hugging Face's ``rotate_half``,
what ``apply_kernels`` runs on a transformers model); the halves cases carry
", halves" in their shape label. Shapes are (batch, seq, heads, head_dim); the
tensor itself is laid out (batch, heads, seq, head_dim), as attention holds
it and as ``rope(x, cos, sin, layout=...)`` takes it (x (..., seq, d),
cos/sin (seq, d/2) in both layouts). The cos/sin tables are in the input
dtype, as in a model cast to bfloat16.

Bytes each mode must move (n = batch*heads*seq*head_dim elements of size s;
tables of t bytes per element, cos + sin = seq * head_dim * t together):

    fwd      read x + write y + read cos, sin        2 n s + seq d t
    bwd      read dy + write dx + read cos, sin      2 n s + seq d t
    fwd_bwd  fwd + bwd                               4 n s + 2 seq d t

The backward is the inverse rotation (angle -theta), so it moves what the
forward moves.

Liger-Kernel rotates the half-split pairs (x[i], x[i + d/2]), Hugging Face's
convention: in the halves cases it computes the same function as ours, in the
pairs cases a different one (a speed reference only). It takes q and k
together; here the heads are split half to q and half to k, the same number
of elements in total, and its tables are full width (seq, head_dim), twice
ours, which this byte count leaves out.
"""

from __future__ import annotations

import functools
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

THETA = 10000.0
LAYOUTS = ("pairs", "halves")
# (batch, seq, heads, head_dim): 8192 tokens of 32 heads of 128 (Llama-2 7B),
# from many short sequences to one long one.
SHAPES = pick_shapes(
    full=[(8, 1024, 32, 128), (4, 2048, 32, 128), (1, 8192, 32, 128)],
    smoke=[(2, 128, 4, 64), (1, 512, 4, 64)],
)


def bytes_moved(shape: tuple[int, int, int, int], element_size: int, table_size: int, mode: str) -> int:
    batch, seq, heads, head_dim = shape
    one_way = 2 * batch * heads * seq * head_dim * element_size + seq * head_dim * table_size
    return one_way if mode == "fwd" else 2 * one_way


def rope_tables(seq: int, head_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of pos * theta^(-2i/d), each (seq, head_dim/2)."""
    frequencies = THETA ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=DEVICE) / head_dim)
    angles = torch.outer(torch.arange(seq, dtype=torch.float64, device=DEVICE), frequencies)
    return torch.cos(angles).to(dtype), torch.sin(angles).to(dtype)


def liger_case(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mode: str):
    """(op, args, wrt, grad_outputs) running Liger's q/k RoPE over the same number of elements."""
    from liger_kernel.transformers.functional import liger_rope

    heads = x.shape[1]
    q = x[:, : heads // 2].contiguous().requires_grad_(mode == "fwd_bwd")
    k = x[:, heads // 2 :].contiguous().requires_grad_(mode == "fwd_bwd")
    # Half-split convention: the angle of feature j is that of i = j mod d/2.
    cos_full = torch.cat((cos, cos), dim=-1).unsqueeze(0)  # (1, seq, head_dim)
    sin_full = torch.cat((sin, sin), dim=-1).unsqueeze(0)
    args = (q, k, cos_full, sin_full)
    return liger_rope, args, (q, k), (torch.randn_like(q), torch.randn_like(k))


def rope_provider(provider: str) -> Callable[..., torch.Tensor] | None:
    """op(x, cos, sin, layout=...) for one provider; None for Liger, whose call differs (``liger_case``)."""
    from scratchlm.model import functional
    from scratchlm.model.backends import get_op

    require_provider(provider)
    if provider == "reference":
        return functional.rope
    if provider == "torch":
        return get_op("rope", "torch")
    if provider == "compile":
        return compiled(functional.rope)
    if provider == "triton":
        return import_kernel("rope", "rope")
    return None


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("provider", PROVIDERS)
def bench_rope(benchmark, provider: str, shape: tuple[int, int, int, int], mode: str, layout: str) -> None:
    op = rope_provider(provider)
    dtype = dtype_under_test()
    batch, seq, heads, head_dim = shape
    x = torch.randn(batch, heads, seq, head_dim, device=DEVICE, dtype=dtype)
    cos, sin = rope_tables(seq, head_dim, dtype)
    note = ""
    if provider == "liger":
        op, args, wrt, grad_outputs = liger_case(x, cos, sin, mode)
        if layout == "pairs":
            note = "pairs cases: Liger rotates (x[i], x[i+d/2]), a different function: speed reference only"
    else:
        op = functools.partial(op, layout=layout)
        x.requires_grad_(mode == "fwd_bwd")
        args, wrt, grad_outputs = (x, cos, sin), (x,), (torch.randn_like(x),)
    step = forward_step(op, args) if mode == "fwd" else forward_backward_step(op, args, wrt, grad_outputs)
    measure(
        benchmark,
        step,
        op="rope",
        provider=provider,
        mode=mode,
        shape=shape,
        shape_label=f"{batch} x {seq} x {heads} x {head_dim}" + (", halves" if layout == "halves" else ""),
        bytes_moved=bytes_moved(shape, x.element_size(), cos.element_size(), mode),
        dtype=dtype,
        note=note,
        extra={"layout": layout},
    )
