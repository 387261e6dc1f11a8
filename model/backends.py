"""The ``kernels=`` switch: which implementation computes each hot op.

Six ops are swappable, each with one signature shared by every backend:

    rmsnorm(x, weight, eps, offset=0.0) -> y
                                          x (..., d), weight (d,); scales by offset + weight (Gemma: 1 + w)
    swiglu(a, b) -> silu(a) * b           same shapes
    geglu(a, b) -> gelu_tanh(a) * b       same shapes (Gemma's MLP)
    rope(x, cos, sin, *, layout="pairs") -> x rotated
                                          x (..., seq, d), cos/sin (..., seq, d/2); layout "pairs" rotates
                                          (x[2i], x[2i+1]), "halves" (x[i], x[i+d/2]) (HF's rotate_half)
    attention(q, k, v, document_ids=None, *, scale=None, window=None, softcap=None) -> out
                                          causal; q (..., heads, q_seq, d), k/v (..., kv_heads, k_seq, d);
                                          document_ids (..., k_seq) keeps attention inside each document;
                                          scale None is d ** -0.5; window W: a query sees its last W keys;
                                          softcap c: scores become c * tanh(score / c) before the softmax
                                          (not in the Triton kernel yet: a model refuses it at construction)
    linear_cross_entropy(hidden, weight, targets, ignore_index=-100, softcap=None) -> mean loss
                                          lm_head plus cross-entropy; hidden (..., d), weight (vocab, d),
                                          targets (...); float32 math whatever the input dtype

One name per op: the op's key here is also the name of its reference function
in ``scratchlm.model.functional``, of its Triton kernel in
``scratchlm.kernels`` (``scratchlm.kernels.rmsnorm``, ...), of its test
(``tests/kernels/test_<op>.py``) and of its benchmark
(``benchmarks/bench_<op>.py``). One exception: attention's kernel is
``flash_attention``, the name of its algorithm (FlashAttention-2), since
plain attention is what the reference computes.

Old op names stay accepted wherever an op is named (``kernels=`` dicts,
``get_op``, the ``backends`` a model reports): "loss" is
"linear_cross_entropy" (``OP_ALIASES``).

Attention takes grouped-query inputs on every backend: k and v may have fewer
heads than q (a divisor of q's), and query head h reads key/value head
h // (heads / kv_heads); no backend copies k or v per query head.

Attention with ``document_ids`` (one integer per key position, for the dims
before the heads; the queries are the last q_seq keys): query i sees key j
only if j is not after i and both lie in the same document, a document being
a run of equal consecutive ids (an id that goes down starts a new document
too, on every backend; see ``scratchlm.kernels.documents``). Packed training
rows get their ids from ``functional.document_ids_from_eos``.

Backends: "reference" (``scratchlm.model.functional``, written out by hand),
"torch" (PyTorch's fused ops), "triton" (this project's kernels in
``scratchlm.kernels``, FlashAttention-2 for attention). For linear_cross_entropy,
"reference" forms the full (N, vocab) logits; "torch" is the chunked
plain-PyTorch ``linear_cross_entropy_chunked`` (PyTorch has no fused
linear cross-entropy) and "triton" the fused kernel ``linear_cross_entropy``:
neither ever holds the logits. A model resolves its ``kernels=`` argument once, at
construction, into one function per op and keeps those; ``forward`` never asks
which backend it is on.

The Triton kernels run on CUDA devices, and on the CPU only through Triton's
interpreter (``TRITON_INTERPRET=1``, set before Triton is imported), which is
how the tests check them; they are imported only when first asked for, so
``scratchlm.model`` imports without Triton installed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Union

import functools
import importlib
import importlib.util
import os
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor

from scratchlm.kernels.documents import document_rows, document_spans
from scratchlm.kernels.linear_cross_entropy_chunked import linear_cross_entropy_chunked
from scratchlm.model import functional

OPS = ("rmsnorm", "swiglu", "geglu", "rope", "attention", "linear_cross_entropy")
# Old op name -> its op, accepted wherever an op is named so that code written
# before the rename keeps working.
OP_ALIASES = {"loss": "linear_cross_entropy"}
BACKENDS = ("reference", "torch", "triton")
KERNEL_CHOICES = (*BACKENDS, "auto")

# What ``kernels=`` accepts: one choice for every op, or a choice per op
# (ops left out of the dict get "auto").
KernelsSpec = Union[str, Mapping[str, str]]


def _op_name(op: str) -> str:
    """The op's name in ``OPS`` for an op name or an old one from ``OP_ALIASES``."""
    return OP_ALIASES.get(op, op) if isinstance(op, str) else op


class OpBackends(dict):
    """op -> backend name, as ``resolve_kernels`` returns it: a dict keyed by ``OPS``.

    Looking up an old op name reads its op's entry, so
    ``model.backends["loss"]`` is ``model.backends["linear_cross_entropy"]``;
    iterating, printing and comparing show the names in ``OPS`` only.
    """

    def __missing__(self, op: str) -> str:
        if op in OP_ALIASES:
            return self[OP_ALIASES[op]]
        raise KeyError(op)

    def __contains__(self, op: object) -> bool:
        return super().__contains__(_op_name(op))

    def get(self, op: str, default: str | None = None) -> str | None:
        return super().get(_op_name(op), default)


class KernelsUnavailableError(ValueError, NotImplementedError):
    """A valid backend that cannot run here (Triton without CUDA or without Triton installed).

    It is both a ValueError (bad ``--kernels`` value for this machine) and a
    NotImplementedError (what is missing is not the user's input).
    """


def _torch_rmsnorm(x: Tensor, weight: Tensor, eps: float, offset: float = 0.0) -> Tensor:
    dtype = functional.compute_dtype(x.dtype)
    return F.rms_norm(x.to(dtype), (x.shape[-1],), offset + weight.to(dtype), eps).to(x.dtype)


def _torch_swiglu(a: Tensor, b: Tensor) -> Tensor:
    return F.silu(a) * b


def _torch_geglu(a: Tensor, b: Tensor) -> Tensor:
    return F.gelu(a, approximate="tanh") * b


def _torch_rope(x: Tensor, cos: Tensor, sin: Tensor, *, layout: str = "pairs") -> Tensor:
    # PyTorch has no RoPE op. This form avoids the strided even/odd slices of
    # the reference: x * cos + swap_pairs(x) * sin, where swap_pairs maps each
    # pair (x0, x1) to (-x1, x0) and cos/sin are repeated to full width. The
    # pair members sit on a new last axis (pairs) or a new axis before the
    # d/2 pairs (halves: Hugging Face's x * cos + rotate_half(x) * sin).
    if layout not in ("pairs", "halves"):
        raise ValueError(f"layout={layout!r} is not a RoPE layout; expected one of ('pairs', 'halves')")
    dtype = functional.compute_dtype(x.dtype)
    split, member_axis = ((-1, 2), -1) if layout == "pairs" else ((2, -1), -2)
    grouped = x.to(dtype).unflatten(-1, split)  # (..., seq, d/2, 2) or (..., seq, 2, d/2)
    x0, x1 = grouped.unbind(member_axis)
    swapped = torch.stack((-x1, x0), dim=member_axis)
    cos = cos.to(dtype).unsqueeze(member_axis)  # (..., seq, d/2, 1) or (..., seq, 1, d/2)
    sin = sin.to(dtype).unsqueeze(member_axis)
    return (grouped * cos + swapped * sin).flatten(-2).to(x.dtype)


def _torch_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    document_ids: Tensor | None = None,
    *,
    scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> Tensor:
    """Causal attention through PyTorch's fused kernels.

    Without ``document_ids``: ``F.scaled_dot_product_attention`` with
    ``is_causal`` (an explicit bottom-right mask under a KV cache). With them:
    FlexAttention (``torch.nn.attention.flex_attention``, compiled, with a
    block mask that skips whole blocks outside the documents) on CUDA when
    this PyTorch has it and the head size suits its kernel (a power of two,
    >= 16); elsewhere (the CPU, other head sizes, no FlexAttention) SDPA with
    the explicit boolean causal-and-same-document mask, which PyTorch runs
    through its math or memory-efficient kernel over the whole (q_seq, k_seq)
    square. A sliding ``window`` is always an explicit boolean mask for SDPA.

    ``softcap`` (Gemma 2), which no SDPA kernel applies: FlexAttention with a
    tanh score_mod on CUDA (windows and documents in its mask), the written-out
    reference elsewhere.
    """
    if softcap is not None:
        if q.device.type == "cuda" and _flex_suits(q) and _flex_attention() is not None:
            return _flex_document_attention(q, k, v, document_ids, scale=scale, window=window, softcap=softcap)
        return functional.attention(q, k, v, document_ids, scale=scale, window=window, softcap=softcap)
    heads, kv_heads = functional.group_heads(q, k)
    # enable_gqa: SDPA's own grouped-query support, the same h // group mapping.
    extra = {"enable_gqa": True} if heads != kv_heads else {}
    if scale is not None:
        extra["scale"] = scale
    if document_ids is not None:
        if q.device.type == "cuda" and _flex_suits(q) and _flex_attention() is not None:
            return _flex_document_attention(q, k, v, document_ids, scale=scale, window=window)
        mask = functional.causal_document_mask(q, k, document_ids, window=window)  # (..., 1, q_seq, k_seq)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **extra)
    if q.shape[-2] == k.shape[-2] and window is None:
        # is_causal lets PyTorch pick a flash/memory-efficient kernel that skips masked blocks.
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, **extra)
    # With a KV cache the queries are the last positions; is_causal would align
    # them with the first keys instead, so pass the (bottom-right) mask explicitly.
    mask = functional.causal_mask(q.shape[-2], k.shape[-2], device=q.device, window=window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **extra)


def _flex_suits(q: Tensor) -> bool:
    # FlexAttention's Triton kernel wants a head size of at least 16 and, on
    # older PyTorch, a power of two; other sizes take the SDPA path.
    head_dim = q.shape[-1]
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


@functools.lru_cache(maxsize=None)
def _flex_attention() -> SimpleNamespace | None:
    """FlexAttention's two functions (flex_attention, create_block_mask), or None when this PyTorch lacks them.

    Imported on first use, so importing the model costs nothing and a
    CPU-only run never touches it.
    """
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    return SimpleNamespace(flex_attention=flex_attention, create_block_mask=create_block_mask)


@functools.lru_cache(maxsize=None)
def _compiled_flex_attention() -> Callable[..., Tensor]:
    # Wrapped once, on the first CUDA call (building the wrapper imports the compiler, seconds):
    # without torch.compile flex_attention runs an unfused reference that forms every score.
    return torch.compile(_flex_attention().flex_attention)


def _flex_document_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    document_ids: Tensor | None,
    *,
    compiled: bool = True,
    scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> Tensor:
    """Causal, same-document attention through FlexAttention; the shapes of ``_torch_attention``.

    A sliding ``window`` joins the mask (query at position p keeps keys
    p-W+1..p), so FlexAttention skips the blocks outside it too; ``softcap``
    is a score_mod, c * tanh(score / c); ``document_ids`` None is one document.

    FlexAttention takes 4-dim (batch, heads, seq, d) inputs, so the dims
    before the heads are flattened into one batch dim (each batch row has its
    own row of ids). The mask compares document runs (0, 1, ... counting the
    changes of id), not the ids themselves, so decreasing ids start a new
    document as on every other backend. ``compiled=False`` runs PyTorch's
    unfused reference of flex_attention (any device; what the CPU tests use).
    Inside a compiled model the plain functions are called and the outer
    torch.compile fuses them.
    """
    flex = _flex_attention()
    if flex is None:
        raise NotImplementedError("this PyTorch has no torch.nn.attention.flex_attention (PyTorch >= 2.5 has it)")
    heads, kv_heads = functional.group_heads(q, k)
    q_len, k_len, head_dim = q.shape[-2], k.shape[-2], q.shape[-1]
    if document_ids is None:
        document_ids = torch.zeros(k_len, dtype=torch.int32, device=q.device)
    rows = document_rows(document_ids, q, k)  # (batch, k_seq), checked
    run = document_spans(rows)[0]  # (batch, k_seq): a document's number within its row
    offset = k_len - q_len  # the queries are the last q_len keys
    reach = k_len if window is None else window  # keys a query sees, itself included

    def same_document_causal(batch, head, q_index, kv_index):
        q_position = q_index + offset
        inside = (kv_index <= q_position) & (kv_index > q_position - reach)
        return inside & (run[batch, q_position] == run[batch, kv_index])

    def capped(score, batch, head, q_index, kv_index):
        return softcap * torch.tanh(score / softcap)

    batch = rows.shape[0]
    compile_here = compiled and not torch.compiler.is_compiling()
    # Built per call (per layer): compiled, it is one fused pass over the (q_seq, k_seq)
    # mask points, about 1 / (heads * head_dim) of the attention's own work.
    block_mask = flex.create_block_mask(
        same_document_causal, B=batch, H=None, Q_LEN=q_len, KV_LEN=k_len, device=q.device, _compile=compile_here
    )
    attend = _compiled_flex_attention() if compile_here else flex.flex_attention
    out = attend(
        q.reshape(batch, heads, q_len, head_dim),
        k.reshape(batch, kv_heads, k_len, head_dim),
        v.reshape(batch, kv_heads, k_len, v.shape[-1]),
        block_mask=block_mask,
        enable_gqa=heads != kv_heads,
        scale=scale,
        score_mod=None if softcap is None else capped,
    )
    return out.reshape(*q.shape[:-1], v.shape[-1])


class _TritonKernel:
    """``scratchlm.kernels.<module>.<name>``, imported on first use (Triton is optional).

    Calling it loads the kernel once and calls it, which lets a model hold an
    op whose import is put off until it first runs (see ``get_op(lazy=True)``).
    """

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name
        self._function: Callable[..., Tensor] | None = None

    def load(self) -> Callable[..., Tensor]:
        if self._function is None:
            self._function = getattr(importlib.import_module(f"scratchlm.kernels.{self.module}"), self.name)
        return self._function

    def __call__(self, *args, **kwargs) -> Tensor:
        return self.load()(*args, **kwargs)


# op name -> backend name -> implementation. A backend missing from an op's
# table is not available for that op.
_REGISTRY: dict[str, dict[str, Callable[..., Tensor] | _TritonKernel]] = {
    "rmsnorm": {
        "reference": functional.rmsnorm,
        "torch": _torch_rmsnorm,
        "triton": _TritonKernel("rmsnorm", "rmsnorm"),
    },
    "swiglu": {
        "reference": functional.swiglu,
        "torch": _torch_swiglu,
        "triton": _TritonKernel("swiglu", "swiglu"),
    },
    "geglu": {
        "reference": functional.geglu,
        "torch": _torch_geglu,
        # SwiGLU's kernel with the GeLU (tanh) gate.
        "triton": _TritonKernel("swiglu", "geglu"),
    },
    "rope": {
        "reference": functional.rope,
        "torch": _torch_rope,
        "triton": _TritonKernel("rope", "rope"),
    },
    "attention": {
        "reference": functional.attention,
        "torch": _torch_attention,
        # The one kernel not named after its op: flash_attention is the algorithm
        # (FlashAttention-2) computing it. Causal by default, aligned bottom-right
        # when a KV cache makes q shorter than k; document_ids (keyword) go straight to the kernel.
        "triton": _TritonKernel("flash_attention", "flash_attention"),
    },
    "linear_cross_entropy": {
        "reference": functional.linear_cross_entropy,
        # Plain PyTorch over row chunks (PyTorch has no fused linear cross-entropy);
        # its module, like the kernels package itself, imports without Triton.
        "torch": linear_cross_entropy_chunked,
        "triton": _TritonKernel("linear_cross_entropy", "linear_cross_entropy"),
    },
}


def _triton_unavailable_reason(device: torch.device | str | None) -> str | None:
    """Why the Triton kernels cannot run on ``device``, or None when they can."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install triton; Linux only)"
    device_type = "cuda" if device is None and torch.cuda.is_available() else torch.device(device or "cpu").type
    if device_type == "meta":
        return None  # shapes only (TransformerLM.empty); the real device was checked before
    if device_type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return (
            "Triton kernels need a CUDA device; on the CPU they run only through Triton's interpreter "
            "(set TRITON_INTERPRET=1 before starting Python; slow, for testing)"
        )
    return None


def _auto_backend(device: torch.device | str | None) -> str:
    """"triton" on CUDA (or "torch" there when Triton is missing), "reference" elsewhere."""
    if device is None:
        on_cuda = torch.cuda.is_available()
    else:
        on_cuda = torch.device(device).type == "cuda"
    if not on_cuda:
        return "reference"
    return "triton" if _triton_unavailable_reason(device) is None else "torch"


def _check_choice(choice: object, where: str) -> str:
    if not isinstance(choice, str) or choice not in KERNEL_CHOICES:
        raise ValueError(f"{where}={choice!r}: expected one of {list(KERNEL_CHOICES)} or a dict op -> one of those")
    return choice


def _expected_ops() -> str:
    old_names = ", ".join(f"{old!r} for {op!r}" for old, op in OP_ALIASES.items())
    return f"{list(OPS)} (or an old name: {old_names})"


def _choices_per_op(kernels: Mapping[str, str]) -> dict[str, str]:
    """A ``kernels=`` dict keyed by op names, old names (``OP_ALIASES``) turned into theirs."""
    unknown = sorted((str(key) for key in kernels if _op_name(key) not in OPS))
    if unknown:
        raise ValueError(f"kernels has unknown ops {unknown}; expected keys among {_expected_ops()}")
    choices: dict[str, str] = {}
    given_as: dict[str, str] = {}
    for key, choice in kernels.items():
        op = _op_name(key)
        if op in choices:
            raise ValueError(
                f"kernels names the op {op!r} twice, as {given_as[op]!r} and {key!r}; expected one of the two"
            )
        choices[op], given_as[op] = _check_choice(choice, f"kernels[{key!r}]"), key
    return choices


def resolve_kernels(kernels: KernelsSpec = "auto", device: torch.device | str | None = None) -> OpBackends:
    """Turn a ``kernels=`` value into one backend name per op, checking it is usable.

    ``device`` decides what "auto" means (None: CUDA if available) and whether
    "triton" can run. A dict may name an op by an old name ("loss"), not by
    both names. Raises ValueError for unknown ops or backends and
    ``KernelsUnavailableError`` for "triton" where it cannot run.

    >>> resolve_kernels("reference")["rope"]
    'reference'
    >>> list(resolve_kernels("reference"))
    ['rmsnorm', 'swiglu', 'geglu', 'rope', 'attention', 'linear_cross_entropy']
    >>> resolve_kernels({"loss": "torch"}, device="cpu")["loss"]  # the old name of linear_cross_entropy
    'torch'
    """
    if isinstance(kernels, Mapping):
        given = _choices_per_op(kernels)
        choices = {op: given.get(op, "auto") for op in OPS}
    else:
        choice = _check_choice(kernels, "kernels")
        choices = {op: choice for op in OPS}

    auto = _auto_backend(device)
    resolved = OpBackends((op, auto if choice == "auto" else choice) for op, choice in choices.items())
    if "triton" in resolved.values():
        reason = _triton_unavailable_reason(device)
        if reason is not None:
            raise KernelsUnavailableError(f"kernels={kernels!r} asks for the 'triton' backend, but {reason}")
    return resolved


def get_op(
    op: str, backend: str = "reference", device: torch.device | str | None = None, *, lazy: bool = False
) -> Callable[..., Tensor]:
    """The implementation of one op for one backend choice (any of ``KERNEL_CHOICES``).

    ``op`` is a name in ``OPS`` or an old one ("loss"). A Triton kernel is
    imported here, unless ``lazy``: then a callable that imports it on its
    first call comes back (the model's linear_cross_entropy, which only
    training calls, is held this way).
    """
    name = _op_name(op)
    if name not in _REGISTRY:
        raise ValueError(f"op={op!r} is unknown; expected one of {_expected_ops()}")
    implementation = _REGISTRY[name][resolve_kernels({name: backend}, device)[name]]
    if isinstance(implementation, _TritonKernel) and not lazy:
        return implementation.load()
    return implementation
