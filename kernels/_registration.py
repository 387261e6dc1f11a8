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

Importing this module under the interpreter also mends one interpreter defect
of Triton 3.6 with NumPy >= 2.4 (see ``_mend_interpreter_index``), so every
kernel module, which imports this one, runs its loops there too.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable

import torch

NAMESPACE = "scratchlm"
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
USE_TRITON_OP = hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton") and not INTERPRETING


def _mend_interpreter_index() -> bool:
    """Let range() take runtime scalars under Triton 3.6's interpreter with NumPy >= 2.4; True if mended.

    The interpreter holds every scalar (a kernel argument, program_id, a
    loaded value and anything computed from them) as a one-element 1-D NumPy
    array, and Python's range() converts its bounds through ``__index__``,
    which Triton 3.6 defines as ``int(self.handle.data)``. NumPy 2.4 made int()
    of an array with ndim > 0 a TypeError ("only 0-dimensional arrays can be
    converted to Python scalars"), so every loop with a runtime bound fails,
    ``for start in range(0, n_cols, BLOCK)`` included; tl.range and
    tl.static_range are plain range() in the interpreter and fail alike.
    Triton fixed it after 3.6 (triton-lang/triton#9171, PR #9172) with
    ``int(self.handle.data.squeeze())``; this installs that same ``__index__``
    where the defective one is found. No kernel changes; compiled code never
    sees it, as only the interpreter calls ``_patch_lang_tensor``.
    """
    try:
        from triton.runtime import interpreter

        patch_tensor = interpreter._patch_lang_tensor
        defective = "int(self.handle.data))" in inspect.getsource(patch_tensor)
    except (ImportError, AttributeError, OSError, TypeError):
        return False  # an interpreter laid out otherwise: nothing known to mend
    if not defective:
        return False

    def patch_tensor_with_scalar_index(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patch_tensor_with_scalar_index
    return True


if INTERPRETING:
    _mend_interpreter_index()


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
