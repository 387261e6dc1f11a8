"""How each kernel launcher becomes a PyTorch operator that torch.compile traces.

On a GPU every launcher is a ``torch.library.triton_op`` and launches its
kernels through ``torch.library.wrap_triton``: the compiler then sees the Triton
kernels themselves and can schedule them with the rest of the graph. Under the
Triton interpreter (``TRITON_INTERPRET=1``, how the tests run on a CPU),
``wrap_triton`` cannot take interpreted kernels, and a torch without
``triton_op`` (before 2.6) has neither; there each launcher is a
``torch.library.custom_op`` with a shape-only fake implementation, an opaque
op that the compiler also traces without graph breaks.

The autograd ``Function`` in each kernel file calls these operators, so the
same code runs eagerly, under ``torch.compile``, and under the interpreter.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

NAMESPACE = "scratchlm"
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
USE_TRITON_OP = hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton") and not INTERPRETING


def launch(kernel):
    """The kernel, wrapped so a traced ``triton_op`` records its launch."""
    return torch.library.wrap_triton(kernel) if USE_TRITON_OP else kernel


def kernel_op(name: str, fake: Callable) -> Callable[[Callable], Callable]:
    """Register the decorated launcher as the operator ``scratchlm::<name>``.

    ``fake`` computes only output shapes and dtypes (``torch.empty_like`` and
    friends); it is used where the launcher cannot be traced (custom_op path).
    """

    def register(launcher: Callable) -> Callable:
        qualified = f"{NAMESPACE}::{name}"
        if USE_TRITON_OP:
            return torch.library.triton_op(qualified, mutates_args=())(launcher)
        op = torch.library.custom_op(qualified, mutates_args=())(launcher)
        op.register_fake(fake)
        return op

    return register


SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_float_tensor(name: str, tensor: object) -> torch.Tensor:
    """Refuse what the kernels cannot take, naming the argument and the value."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {tensor.dtype}; expected one of float32, bfloat16, float16")
    return tensor


def check_same(name: str, tensor: torch.Tensor, other_name: str, other: torch.Tensor) -> None:
    """``tensor`` must match ``other`` in device and dtype."""
    if tensor.device != other.device:
        raise ValueError(f"{name} is on {tensor.device} but {other_name} is on {other.device}; expected one device")
    if tensor.dtype != other.dtype:
        raise TypeError(f"{name} has dtype {tensor.dtype} but {other_name} has {other.dtype}; expected the same dtype")
