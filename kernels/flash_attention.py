"""FlashAttention-2 for PyTorch: launchers, the autograd Function and the public functions.

``flash_attention(q, k, v, causal=True, scale=None, document_ids=None)`` and
``flash_attention_with_lse`` (which also returns the logsumexp) check their
inputs, view them as (heads, N, D) without copying where the layout allows,
and run the Triton kernels through PyTorch operators (``kernel_op``), so
``torch.compile`` traces them. The package's files, top to bottom:

* ``flash_attention_kernels.py``: the algorithm (online softmax forward,
  dK/dV and dQ backward, grouped-query heads), in its docstring and kernels;
* ``flash_attention_tiles.py``: which tiles a block visits and how each is masked;
* ``flash_attention_configs.py``: which tile shapes, warps and stages run where;
* this module: launch, autograd, the public API;
* ``flash_attention_tiled.py``: the same algorithm in plain PyTorch, loop by
  loop, to read beside the kernels and to test them against.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import triton

from scratchlm.kernels._registration import INTERPRETING, check_float_tensor, check_same, kernel_op, kv_group_size, launch
from scratchlm.kernels._triton_utils import LOG2E
from scratchlm.kernels.documents import document_rows, document_spans
from scratchlm.kernels.flash_attention_tiled import check_window_softcap
from scratchlm.kernels.flash_attention_configs import (
    MAX_HEAD_DIM,
    backward_settings,
    device_capability,
    forward_configs,
    padded_head_dim,
    shared_memory_per_block,
)
from scratchlm.kernels.flash_attention_kernels import (
    flash_attention_bwd_dkdv_kernel,
    flash_attention_bwd_dq_kernel,
    flash_attention_bwd_preprocess_kernel,
    flash_attention_fwd_kernel,
)

# Under the interpreter every tile op is a numpy call: small blocks keep the
# tests fast and exercise the diagonal and ragged-tile paths on short sequences.
INTERPRETER_BLOCKS = (16, 16)  # (BLOCK_M, BLOCK_N)


@functools.lru_cache(maxsize=None)
def _forward_autotuner(block_d: int, element_size: int, capability: int, shared_memory: int, windowed: bool):
    # One autotuner per (padded head dim, dtype size): its configs are pruned
    # ahead of time, so torch.compile sees a plain configs + key autotune.
    # The key holds power-of-two length buckets, not the lengths: decoding
    # with a growing KV cache must not re-tune at every new key length.
    return triton.autotune(
        configs=forward_configs(block_d, element_size, capability, shared_memory, windowed),
        key=["q_len_bucket", "k_len_bucket", "head_dim", "CAUSAL", "DOCUMENTS", "WINDOW", "SOFTCAP"],
    )(flash_attention_fwd_kernel)


def _group_size(heads: int, kv_heads: int) -> int:
    """Query heads per K/V head; the public functions have already checked this, with fuller messages."""
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"q has {heads} heads but k has {kv_heads}; expected k's heads to divide q's")
    return heads // kv_heads


def _documents_layout(documents: Optional[torch.Tensor], heads: int, fallback: torch.Tensor) -> tuple:
    """(pointer, kind stride, row stride, heads per row) of the (2, rows, Nk) document table, or of a
    stand-in that the kernels never read when there are no documents."""
    if documents is None:
        return fallback, 0, 0, max(heads, 1)
    return documents, documents.stride(0), documents.stride(1), heads // documents.shape[1]


def _window_softcap(window: Optional[int], softcap: Optional[float]) -> tuple:
    """The kernels' (window, softcap in log2 units, WINDOW, SOFTCAP) arguments; unused values are 0 and 1."""
    return (
        0 if window is None else window,
        1.0 if softcap is None else softcap * LOG2E.value,
    ), {"WINDOW": window is not None, "SOFTCAP": softcap is not None}


def _fwd_fake(q, k, v, causal: bool, scale: float, documents: Optional[torch.Tensor], window=None, softcap=None):
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32)


@kernel_op("flash_attention_fwd", fake=_fwd_fake)
def flash_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    scale: float,
    documents: Optional[torch.Tensor],
    window: Optional[int] = None,
    softcap: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, logsumexp) for q (heads, Nq, D), k and v (kv_heads, Nk, D), each with a unit last-dim stride.

    heads is a multiple of kv_heads; query head h reads K/V head h // (heads // kv_heads).
    ``documents``: None, or int32 (2, rows, Nk) from ``document_spans``: per key
    position its document's start and end, row r serving heads r * heads / rows onwards.
    o is contiguous in q's dtype; logsumexp is float32 (heads, Nq), natural log.
    ``window`` (causal only) and ``softcap`` as in ``flash_attention_with_lse``.
    """
    heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[:2]
    o = q.new_empty(q.shape)
    lse = torch.empty(heads, q_len, device=q.device, dtype=torch.float32)
    if heads == 0 or q_len == 0:
        return o, lse
    group = _group_size(heads, kv_heads)
    block_d = padded_head_dim(head_dim)
    doc, stride_doc_kind, stride_doc_row, heads_per_row = _documents_layout(documents, heads, lse)
    if INTERPRETING:
        block_m, block_n = INTERPRETER_BLOCKS
        kernel, settings = flash_attention_fwd_kernel, {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": 4}
    else:
        device = q.device.index or 0
        capability, shared_memory = device_capability(device), shared_memory_per_block(device)
        windowed = window is not None or softcap is not None
        kernel = _forward_autotuner(block_d, q.element_size(), capability, shared_memory, windowed)
        settings = {}

    def grid(meta):
        return (triton.cdiv(q_len, meta["BLOCK_M"]) * heads,)

    values, flags = _window_softcap(window, softcap)

    launch(kernel)[grid](
        q, k, v, o, lse, doc,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1),
        lse.stride(0), stride_doc_kind, stride_doc_row,
        q_len, k_len, head_dim, group, heads_per_row, triton.next_power_of_2(q_len), triton.next_power_of_2(k_len),
        scale * LOG2E.value, *values,
        CAUSAL=causal, DOCUMENTS=documents is not None, BOUNDED=documents is not None or window is not None,
        BLOCK_D=block_d, EVEN_D=head_dim == block_d, **flags, **settings,
    )  # fmt: skip
    return o, lse


def _bwd_fake(
    q, k, v, o, lse, do, causal: bool, scale: float, documents: Optional[torch.Tensor], window=None, softcap=None
):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@kernel_op("flash_attention_bwd", fake=_bwd_fake)
def flash_attention_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    do: torch.Tensor,
    causal: bool,
    scale: float,
    documents: Optional[torch.Tensor],
    window: Optional[int] = None,
    softcap: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv), contiguous, from the forward's inputs, o and logsumexp and the output gradient do.

    dk and dv have k's shape: each K/V head's gradient sums over the query heads that share it.
    """
    heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[:2]
    dq, dk, dv = q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)
    if heads == 0 or q_len == 0 or k_len == 0:  # no query or no key: nothing flows anywhere
        return dq.zero_(), dk.zero_(), dv.zero_()
    group = _group_size(heads, kv_heads)
    block_d = padded_head_dim(head_dim)
    if INTERPRETING:
        s = {"BLOCK_M": INTERPRETER_BLOCKS[0], "BLOCK_N": INTERPRETER_BLOCKS[1], "num_warps": 4, "num_stages": 1}
    else:
        device = q.device.index or 0
        s = backward_settings(block_d, q.element_size(), device_capability(device), shared_memory_per_block(device),
                              window is not None or softcap is not None)  # fmt: skip
    block_m, block_n = s["BLOCK_M"], s["BLOCK_N"]
    launch_options = {"num_warps": s["num_warps"], "num_stages": s["num_stages"]}
    delta = torch.empty_like(lse)
    doc, stride_doc_kind, stride_doc_row, heads_per_row = _documents_layout(documents, heads, lse)
    kv_heads_per_row = heads_per_row // group
    values, flags = _window_softcap(window, softcap)
    bounded = documents is not None or window is not None
    launch(flash_attention_bwd_preprocess_kernel)[(triton.cdiv(q_len, block_m) * heads,)](
        o, do, delta,
        o.stride(0), o.stride(1), do.stride(0), do.stride(1), delta.stride(0),
        q_len, head_dim,
        BLOCK_M=block_m, BLOCK_D=block_d, **launch_options,
    )  # fmt: skip
    launch(flash_attention_bwd_dkdv_kernel)[(triton.cdiv(k_len, block_n) * kv_heads,)](
        q, k, v, do, lse, delta, dk, dv, doc,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
        lse.stride(0), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), stride_doc_kind, stride_doc_row,
        q_len, k_len, head_dim, group, kv_heads_per_row, scale * LOG2E.value, scale, *values,
        CAUSAL=causal, DOCUMENTS=documents is not None, BOUNDED=bounded, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=block_d, EVEN_D=head_dim == block_d, **flags,
        **launch_options,
    )  # fmt: skip
    launch(flash_attention_bwd_dq_kernel)[(triton.cdiv(q_len, block_m) * heads,)](
        q, k, v, do, lse, delta, dq, doc,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
        lse.stride(0), dq.stride(0), dq.stride(1), stride_doc_kind, stride_doc_row,
        q_len, k_len, head_dim, group, heads_per_row, scale * LOG2E.value, scale, *values,
        CAUSAL=causal, DOCUMENTS=documents is not None, BOUNDED=bounded, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=block_d, EVEN_D=head_dim == block_d, **flags,
        **launch_options,
    )  # fmt: skip
    return dq, dk, dv


def _as_heads(x: torch.Tensor) -> torch.Tensor:
    """x (..., N, D) as (heads, N, D) with a unit last-dim stride; a view whenever the leading dims merge."""
    x = x.reshape(math.prod(x.shape[:-2]), x.shape[-2], x.shape[-1])
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


class FlashAttentionFunction(torch.autograd.Function):
    """(o, logsumexp); the logsumexp is an output for callers but carries no gradient."""

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, scale: float, documents: Optional[torch.Tensor], window=None, softcap=None):
        q3, k3, v3 = _as_heads(q), _as_heads(k), _as_heads(v)
        o, lse = flash_attention_fwd(q3, k3, v3, causal, scale, documents, window, softcap)
        lse = lse.view(q.shape[:-1])
        # Tensors only, never None, with the logsumexp the one of shape (..., Nq): callers that
        # inspect autograd (the CS336 assignment 2 tests) look for it by that shape.
        optional = () if documents is None else (documents,)
        ctx.save_for_backward(q3, k3, v3, o, *optional, lse)
        ctx.causal, ctx.scale, ctx.k_shape = causal, scale, k.shape
        ctx.window, ctx.softcap = window, softcap
        ctx.mark_non_differentiable(lse)
        return o.view(q.shape), lse

    @staticmethod
    def backward(ctx, do: torch.Tensor, _dlse: torch.Tensor):
        q3, k3, v3, o, *optional, lse = ctx.saved_tensors
        documents = optional[0] if optional else None
        lse = lse.view(q3.shape[:2])
        dq, dk, dv = flash_attention_bwd(
            q3, k3, v3, o, lse, _as_heads(do), ctx.causal, ctx.scale, documents, ctx.window, ctx.softcap
        )
        return dq.view(do.shape), dk.view(ctx.k_shape), dv.view(ctx.k_shape), None, None, None, None, None


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
    document_ids: torch.Tensor | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """softmax(scale * q k^T + mask) v, FlashAttention-2 in Triton, forward and backward.

    The arguments are ``flash_attention_with_lse``'s, which also returns the logsumexp.
    """
    return flash_attention_with_lse(q, k, v, causal, scale, document_ids, window, softcap)[0]


def flash_attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
    document_ids: torch.Tensor | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, logsumexp): o = softmax(scale * q k^T + mask) v, and per query row the float32 natural-log
    logsumexp of its scaled, masked scores, (..., Nq) (-inf for a row that sees no key). Gradients
    flow through o only.

    ``q``: (..., Nq, D); ``k``, ``v``: (..., Nk, D) with q's leading dims, D,
    device and dtype (float32, bfloat16 or float16), any layout. Grouped-query
    attention: with heads at dim -3, k and v may have Hkv heads where q has
    Hq, a multiple of Hkv; query head h then attends with K/V head
    h // (Hq // Hkv), read in place (never repeated), and dk, dv come back in
    k's shape, summed over the heads of each group. With
    ``causal`` query i attends key j iff j <= i + (Nk - Nq) (bottom-right
    aligned: the queries are the last Nq positions, as when decoding with a
    KV cache); a query that sees no key outputs 0. ``scale`` defaults to
    D ** -0.5. Computes in float32 and returns (..., Nq, D) in q's dtype,
    contiguous; only a float32 logsumexp per query row is kept for backward.

    ``document_ids``: packed documents, an integer tensor (..., Nk) for q
    (..., H, Nq, D), one id per key position, shared by all heads (see
    ``scratchlm.kernels.documents``): a query then sees only keys of its own
    document, a document being a run of equal consecutive ids (so ids are
    normally non-decreasing; a decrease starts a new document). Key tiles
    that share no document with a query tile are never visited, so many
    short documents cost less than one long one. Needs Nq <= Nk.

    ``window`` W, an int >= 1 (causal only, else ValueError): a sliding
    window, query i sees keys i + Nk - Nq - W + 1 .. i + Nk - Nq, its last W
    positions, itself included (Mistral, Gemma); key tiles outside every
    query's window are never visited, forward or backward, so the cost grows
    as N W, not N^2. ``softcap`` c > 0: each scaled score s becomes
    c tanh(s / c) before the mask and softmax (Gemma 2); the backward
    multiplies by its slope 1 - tanh^2. All of these combine.
    """
    check_float_tensor("q", q)
    check_float_tensor("k", k)
    check_float_tensor("v", v)
    check_same("k", k, "q", q)
    check_same("v", v, "q", q)
    if q.dim() < 2:
        raise ValueError(f"q has shape {tuple(q.shape)}; expected (..., seq, head_dim) with at least 2 dims")
    kv_group_size(q, k, v)  # the shape rules, shared with flash_attention_tiled
    head_dim = q.shape[-1]
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"q has head_dim {head_dim}; expected 1 to {MAX_HEAD_DIM}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal is {causal!r}; expected True or False")
    if scale is None:
        scale = head_dim**-0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale is {scale!r}; expected a finite number or None (head_dim ** -0.5)")
    check_window_softcap(window, softcap, causal)
    if q.device.type != "cuda" and not INTERPRETING:
        raise ValueError(f"q is on {q.device}; the Triton kernels need a CUDA device (or TRITON_INTERPRET=1)")
    documents = None
    if document_ids is not None:
        # (2, rows, Nk) int32: per key position where its document starts and ends.
        documents = torch.stack(document_spans(document_rows(document_ids, q, k))[1:])
    softcap = None if softcap is None else float(softcap)
    return FlashAttentionFunction.apply(q, k, v, causal, float(scale), documents, window, softcap)
