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

The host-side checks the kernels and their plain-PyTorch twins share live
here too (dtypes, devices, the grouped-query head rule, the twins' compute
dtype): this module needs only torch, so the twins import without Triton.

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


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the plain-PyTorch twins compute in: float32 for 16-bit inputs, float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def kv_group_size(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    """G, the number of query heads that share each K/V head, after checking the shapes.

    Heads are dim -3: q (..., Hq, Nq, D), k and v (..., Hkv, Nk, D), with the
    same dims before the heads, the same D, and Hq a multiple of Hkv; then
    G = Hq // Hkv (1 when the head counts match). With 2 dims, (N, D), there
    is no heads dim, k must be (Nk, D) and G = 1.
    """
    head_dim = q.shape[-1]
    if q.dim() < 3:
        if k.dim() != q.dim() or k.shape[-1] != head_dim:
            raise ValueError(
                f"k has shape {tuple(k.shape)} but q has {tuple(q.shape)}; expected (Nk, {head_dim}), "
                "the same leading dims and head_dim as q"
            )
        group = 1
    else:
        q_heads, kv_heads = q.shape[-3], (k.shape[-3] if k.dim() >= 3 else 0)
        if k.dim() != q.dim():
            problem = f"k has {k.dim()} dims where q has {q.dim()}"
        elif k.shape[:-3] != q.shape[:-3]:
            problem = f"the dims before the heads differ, {tuple(k.shape[:-3])} against {tuple(q.shape[:-3])}"
        elif k.shape[-1] != head_dim:
            problem = f"head_dim {k.shape[-1]} is not q's {head_dim}"
        elif (q_heads % kv_heads if kv_heads else q_heads) != 0:
            problem = f"q's {q_heads} heads are not a multiple of k's {kv_heads}"
        else:
            problem = None
        if problem is not None:
            lead = "".join(f"{n}, " for n in q.shape[:-3])
            raise ValueError(
                f"k has shape {tuple(k.shape)} but q has {tuple(q.shape)}; expected ({lead}{q_heads}, Nk, "
                f"{head_dim}), or ({lead}Hkv, Nk, {head_dim}) with Hkv dividing {q_heads} for grouped-query "
                f"attention ({problem})"
            )
        group = q_heads // kv_heads if kv_heads else 1
    if v.shape != k.shape:
        raise ValueError(f"v has shape {tuple(v.shape)} but k has {tuple(k.shape)}; expected the same shape")
    return group
