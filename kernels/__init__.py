"""scratchlm.kernels: fused Triton kernels with PyTorch autograd wrappers.

Each public function is a ``torch.autograd.Function`` whose forward and
backward are Triton kernels, registered as PyTorch operators so that
``torch.compile`` traces through them without graph breaks:

- ``rmsnorm(x, weight, eps=1e-5)``: x (..., d), weight (d,)
- ``swiglu(a, b)``: silu(a) * b, elementwise
- ``geglu(a, b)``: gelu_tanh(a) * b, elementwise (Gemma's MLP; SwiGLU's kernels with the GeLU gate)
- ``rope(x, cos, sin)``: x (..., seq, d); cos, sin (seq, d/2), adjacent pairs
  (``apply_rope``, its former name, is the same function)
- ``flash_attention(q, k, v, causal=True, scale=None, document_ids=None, window=None, softcap=None)``: FlashAttention-2,
  q (..., Nq, D), k and v (..., Nk, D); saves only the float32 logsumexp (..., Nq) for backward,
  which ``flash_attention_with_lse`` (same arguments) also returns: (o, logsumexp).
  Grouped-query attention: k and v may have fewer heads (dim -3) than q, Hkv
  dividing Hq; query head h uses K/V head h // (Hq // Hkv), read without a copy.
  ``document_ids`` (..., Nk): packed documents, attention kept inside each one
  (see ``documents``), key tiles of other documents skipped
- ``linear_cross_entropy(hidden, weight, targets, ignore_index=-100, reduction="mean", z_loss=0.0)``:
  cross-entropy of hidden @ weight.T without ever holding the (N, V) logits

``flash_attention_tiled`` is the same algorithm in plain PyTorch, written to be
read (and a second reference in the tests); ``linear_cross_entropy_chunked``
is the loss over row chunks in plain PyTorch (the model's "torch" loss
backend). Both import without Triton.

They run on CUDA devices, and on the CPU through Triton's interpreter when
``TRITON_INTERPRET=1`` is set before Triton is imported (slow; for tests).
The model uses them with ``TransformerLM(..., kernels="triton")``.
"""

import importlib
import sys
import types

# Public name -> the module defining it. Imported on first use (PEP 562), so that
# importing a plain-PyTorch module of this package (flash_attention_tiled,
# linear_cross_entropy_chunked: the "torch" loss backend) never needs Triton.
_EXPORTS = {
    "apply_rope": "rope",
    "flash_attention": "flash_attention",
    "flash_attention_tiled": "flash_attention_tiled",
    "flash_attention_tiled_with_lse": "flash_attention_tiled",
    "flash_attention_with_lse": "flash_attention",
    "geglu": "swiglu",
    "linear_cross_entropy": "linear_cross_entropy",
    "linear_cross_entropy_chunked": "linear_cross_entropy_chunked",
    "rmsnorm": "rmsnorm",
    "rope": "rope",
    "swiglu": "swiglu",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'scratchlm.kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"scratchlm.kernels.{_EXPORTS[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


class _Package(types.ModuleType):
    """This package's module type: a submodule never hides the public function of its name.

    Importing ``scratchlm.kernels.flash_attention`` (the module) makes the
    import system set it as the attribute ``flash_attention`` of this package,
    over the function of that name, and ``__getattr__`` above is never asked
    again. Here such an assignment stores the function instead, so
    ``from scratchlm.kernels import flash_attention`` is the function in any
    import order; the module stays reachable as
    ``importlib.import_module("scratchlm.kernels.flash_attention")``.
    """

    def __setattr__(self, name: str, value) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType) and value.__name__ == f"{__name__}.{_EXPORTS[name]}":
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
