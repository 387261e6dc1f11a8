"""The reference math, written out with plain tensor ops.

These functions define what every faster path (PyTorch's fused ops, the Triton
kernels) must compute. They favour clarity over speed, but still take care
with the two numerical traps of a transformer: ``exp`` overflowing in softmax,
and the sum of squares losing precision in 16-bit RMSNorm.

The six swappable ops (``scratchlm.model.backends``) are named as the op is
named there: ``rmsnorm``, ``swiglu``, ``geglu``, ``rope``, ``attention`` and
``linear_cross_entropy``. Their older names stay as aliases of the same
functions: ``rms_norm``, ``swiglu_gate``, ``apply_rope``, ``causal_attention``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from scratchlm.kernels.documents import document_mask, document_rows


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for 16-bit inputs, the input dtype otherwise (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def softmax(x: Tensor, dim: int) -> Tensor:
    """exp(x) / sum(exp(x)) along ``dim``, stable for any finite input.

    Subtracting the maximum first leaves the result unchanged (the factor
    exp(-max) cancels) but keeps every exponent <= 0, so exp never overflows:
    exp(89) is already inf in float32.
    """
    x_compute = x.to(compute_dtype(x.dtype))
    shifted = x_compute - x_compute.amax(dim=dim, keepdim=True)
    exp = torch.exp(shifted)
    return (exp / exp.sum(dim=dim, keepdim=True)).to(x.dtype)


def silu(x: Tensor) -> Tensor:
    """x * sigmoid(x), the gate of SwiGLU."""
    return x * torch.sigmoid(x)


def scaled_dot_product_attention(
    Q: Tensor,
    K: Tensor,
    V: Tensor,
    mask: Tensor | None = None,
    *,
    scale: float | None = None,
    softcap: float | None = None,
) -> Tensor:
    """softmax(Q K^T * scale) V, with ``mask`` True where a query may attend a key.

    Shapes: Q (..., queries, d_k), K (..., keys, d_k), V (..., keys, d_v),
    mask broadcastable to (..., queries, keys); returns (..., queries, d_v).
    ``scale`` None is 1 / sqrt(d_k). ``softcap`` c squashes each score s into
    (-c, c) as c * tanh(s / c) before the softmax (Gemma 2's attention).
    """
    d_k = Q.shape[-1]
    if scale is None:
        scores = Q @ K.transpose(-2, -1) / math.sqrt(d_k)  # (..., queries, keys)
    else:
        scores = (Q @ K.transpose(-2, -1)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if mask is not None:
        if mask.dtype != torch.bool:
            raise ValueError(f"mask has dtype {mask.dtype}; expected torch.bool (True = may attend)")
        # -inf makes exp() exactly 0, so a masked key gets no weight at all.
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = softmax(scores, dim=-1)
    return weights @ V


def causal_mask(
    num_queries: int, num_keys: int, device: torch.device | None = None, *, window: int | None = None
) -> Tensor:
    """Boolean (num_queries, num_keys) mask, True where a query may attend a key.

    The queries are the *last* ``num_queries`` positions of the key sequence
    (they equal it, except when earlier keys come from a KV cache), so query i
    sees keys 0 .. num_keys - num_queries + i. With a sliding ``window`` W it
    sees only the last W of those (itself and W - 1 before it).

    >>> causal_mask(3, 3, window=2).int().tolist()
    [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
    """
    ones = torch.ones(num_queries, num_keys, dtype=torch.bool, device=device)
    mask = torch.tril(ones, diagonal=num_keys - num_queries)
    if window is not None:
        mask &= ~torch.tril(ones, diagonal=num_keys - num_queries - window)
    return mask


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    document_ids: Tensor | None = None,
    *,
    scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> Tensor:
    """Causal attention through ``scaled_dot_product_attention``; (..., seq, d) in and out.

    The "attention" op's reference; its Triton kernel is
    ``scratchlm.kernels.flash_attention`` (named after its algorithm).

    Grouped-query attention: q (..., heads, q_seq, d) with k and v (...,
    kv_heads, k_seq, d), heads a multiple of kv_heads. Query head h attends
    with key/value head h // group: the query heads are viewed as (kv_heads,
    group) and each key/value head broadcasts over its group, so nothing is copied.

    ``document_ids`` (..., k_seq), the dims before the heads, one integer per
    key position: attention also stays inside a document (see
    ``causal_document_mask``), which is what training on packed rows needs.

    ``scale`` multiplies q.k (None: d ** -0.5); ``window`` W, when given,
    lets each query see only itself and the W - 1 keys before it (a sliding
    window layer, as in Mistral and Qwen2); ``softcap`` c turns each score s
    into c * tanh(s / c) before the softmax (Gemma 2).
    """
    if document_ids is None:
        mask = causal_mask(q.shape[-2], k.shape[-2], device=q.device, window=window)
    else:
        mask = causal_document_mask(q, k, document_ids, window=window)  # (..., 1, q_seq, k_seq): one for all heads
    heads, kv_heads = group_heads(q, k)
    if heads == kv_heads:
        return scaled_dot_product_attention(q, k, v, mask, scale=scale, softcap=softcap)
    grouped_q = q.unflatten(-3, (kv_heads, heads // kv_heads))  # (..., kv_heads, group, q_seq, d)
    if document_ids is not None:
        mask = mask.unsqueeze(-3)  # (..., 1, 1, q_seq, k_seq): broadcast over kv_heads and group
    out = scaled_dot_product_attention(grouped_q, k.unsqueeze(-3), v.unsqueeze(-3), mask, scale=scale, softcap=softcap)
    return out.flatten(-4, -3)  # (..., heads, q_seq, d)


causal_attention = attention  # the op's former name, kept for code that uses it


def causal_document_mask(q: Tensor, k: Tensor, document_ids: Tensor, *, window: int | None = None) -> Tensor:
    """Boolean mask, True where a query may attend a key: causal and in the same document.

    q (..., heads, q_seq, d), k (..., kv_heads, k_seq, d) and ``document_ids``
    (..., k_seq): the dims before the heads (they broadcast; (..., 1, k_seq)
    is accepted too), one id per key position, the queries being the last
    q_seq keys. A document is a run of equal consecutive ids, so ids that go
    down start a new document like ids that go up: (0, 0, 1, 1, 0) is three
    documents. Returns (..., 1, q_seq, k_seq) (a heads dim of 1; (q_seq,
    k_seq) for 2-dim q). No query is left without a key: each sees itself.
    """
    rows = document_rows(document_ids, q, k)  # (rows, k_seq): checked dtype, device and shape
    q_len, k_len = q.shape[-2], k.shape[-2]
    lead = q.shape[:-3] if q.dim() >= 3 else torch.Size()
    same_document = document_mask(rows, q_len).reshape(*lead, q_len, k_len)
    mask = causal_mask(q_len, k_len, device=q.device, window=window) & same_document
    return mask.unsqueeze(-3) if q.dim() >= 3 else mask


def document_ids_from_eos(token_ids: Tensor, eos_token_id: int) -> Tensor:
    """Document ids of packed rows: id i counts the end-of-text tokens strictly before position i.

    An end-of-text token closes its document and belongs to it, and the next
    token starts a new one; ids are non-decreasing along the last dim, as
    attention's ``document_ids`` expects. ``token_ids`` (..., seq) integer;
    returns int32 (..., seq) on the same device (a cumulative sum, no host sync).

    >>> document_ids_from_eos(torch.tensor([5, 7, 0, 3, 0, 0, 9]), eos_token_id=0).tolist()
    [0, 0, 0, 1, 1, 2, 3]
    """
    if not isinstance(token_ids, Tensor) or token_ids.dtype.is_floating_point or token_ids.dtype.is_complex:
        raise ValueError(f"token_ids must be an integer tensor, got {getattr(token_ids, 'dtype', type(token_ids))}")
    if token_ids.dim() == 0:
        raise ValueError("token_ids has shape (); expected (..., seq)")
    if isinstance(eos_token_id, bool) or not isinstance(eos_token_id, int):
        raise ValueError(f"eos_token_id must be an int, got {eos_token_id!r}")
    is_eos = (token_ids == eos_token_id).to(torch.int32)
    # The inclusive count minus the token itself: an eos token still belongs to the document it ends.
    return torch.cumsum(is_eos, dim=-1, dtype=torch.int32) - is_eos


def group_heads(q: Tensor, k: Tensor) -> tuple[int, int]:
    """(heads, kv_heads) of q and k (..., heads, seq, d); refuses head counts that do not group."""
    if q.dim() < 3 or k.dim() != q.dim():
        if k.shape[:-2] != q.shape[:-2]:
            raise ValueError(f"k has shape {tuple(k.shape)} but q has {tuple(q.shape)}; expected the same leading dims")
        return 1, 1
    heads, kv_heads = q.shape[-3], k.shape[-3]
    if k.shape[:-3] != q.shape[:-3] or heads % kv_heads != 0:
        raise ValueError(
            f"k has shape {tuple(k.shape)} but q has {tuple(q.shape)}; expected q's leading dims and a head count "
            f"(dim -3) that divides q's {heads}"
        )
    return heads, kv_heads


def rmsnorm(x: Tensor, weight: Tensor, eps: float = 1e-5, offset: float = 0.0) -> Tensor:
    """x / sqrt(mean(x^2) + eps) * (offset + weight) over the last dim, in float32, cast back.

    Computing in float32 matters for bf16 inputs: squaring and averaging a few
    thousand values with 8 mantissa bits would lose most of the digits.
    ``offset`` 1.0 is Gemma's norm, whose stored weight is the scale minus 1.
    """
    dtype = compute_dtype(x.dtype)
    x_compute = x.to(dtype)
    inverse_rms = torch.rsqrt(x_compute.pow(2).mean(dim=-1, keepdim=True) + eps)  # (..., 1)
    return (x_compute * inverse_rms * (offset + weight.to(dtype))).to(x.dtype)


rms_norm = rmsnorm  # the op's former name (PyTorch spells it F.rms_norm), kept for code that uses it


def swiglu(a: Tensor, b: Tensor) -> Tensor:
    """silu(a) * b: the elementwise middle of SwiGLU, between w1/w3 and w2."""
    return silu(a) * b


swiglu_gate = swiglu  # the op's former name, kept for code that uses it


def gelu_tanh(x: Tensor) -> Tensor:
    """GeLU with the tanh approximation: x/2 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3))), the gate of GeGLU."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def geglu(a: Tensor, b: Tensor) -> Tensor:
    """gelu_tanh(a) * b: GeGLU's elementwise middle (Gemma's MLP), between w1/w3 and w2."""
    return gelu_tanh(a) * b


def rope(x: Tensor, cos: Tensor, sin: Tensor, *, layout: str = "pairs") -> Tensor:
    """Rotate feature pairs of x by the angle whose cos/sin are given.

    Shapes: x (..., seq, d); cos and sin broadcastable to (..., seq, d/2).
    ``layout`` "pairs" rotates adjacent pairs (x0, x1) = (x[2i], x[2i+1]);
    "halves" rotates (x0, x1) = (x[i], x[i+d/2]), Hugging Face's
    ``rotate_half``. Either way pair i becomes (x0 cos - x1 sin, x0 sin + x1 cos),
    a 2-D rotation.
    """
    if layout not in ("pairs", "halves"):
        raise ValueError(f"layout={layout!r} is not a RoPE layout; expected one of ('pairs', 'halves')")
    dtype = compute_dtype(x.dtype)
    cos = cos.to(dtype)
    sin = sin.to(dtype)
    if layout == "halves":
        half = x.shape[-1] // 2
        x_first = x[..., :half].to(dtype)  # (..., seq, d/2)
        x_second = x[..., half:].to(dtype)
        return torch.cat((x_first * cos - x_second * sin, x_first * sin + x_second * cos), dim=-1).to(x.dtype)
    x_even = x[..., 0::2].to(dtype)  # (..., seq, d/2)
    x_odd = x[..., 1::2].to(dtype)
    rotated_even = x_even * cos - x_odd * sin
    rotated_odd = x_even * sin + x_odd * cos
    # Interleave back: stacking on a new last dim then flattening puts pair i at 2i, 2i+1.
    return torch.stack((rotated_even, rotated_odd), dim=-1).flatten(-2).to(x.dtype)


apply_rope = rope  # the op's former name, kept for code that uses it


def cross_entropy(logits: Tensor, targets: Tensor, ignore_index: int | None = None) -> Tensor:
    """Mean of -log softmax(logits)[target] over positions, computed stably.

    For one position with logits ``o`` and target ``y``::

        loss = logsumexp(o) - o[y],   logsumexp(o) = max(o) + log(sum(exp(o - max(o))))

    Subtracting the max first keeps every ``exp`` in (0, 1], so logits of 1e4
    give the exact loss instead of inf/nan; the softmax itself is never formed.
    ``logits`` (..., vocab) float, ``targets`` (...) integer ids. Returns a
    float32 scalar (float64 for float64 logits): 16-bit logits are upcast
    first, since their rounding would swamp small losses. With
    ``ignore_index``, positions whose target equals it count for nothing: the
    mean is over the others (0, with zero gradients, when there are none).
    """
    if logits.dim() < 1 or tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"targets must have the shape of logits without its last (vocab) dim: "
            f"logits {tuple(logits.shape)} expects targets {tuple(logits.shape[:-1])}, got {tuple(targets.shape)}"
        )
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor of token ids, got dtype {targets.dtype}")
    if logits.dtype != torch.float64:
        logits = logits.float()
    row_max = logits.amax(dim=-1, keepdim=True).detach()
    shifted = logits - row_max
    log_sum_exp = shifted.exp().sum(dim=-1).log()
    targets = targets.long()
    if ignore_index is None:
        target_logit = shifted.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        return (log_sum_exp - target_logit).mean()
    valid = targets != ignore_index
    # Ignored positions gather column 0 (any valid column would do); their loss is zeroed below.
    safe_targets = torch.where(valid, targets, 0)
    target_logit = shifted.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    losses = torch.where(valid, log_sum_exp - target_logit, 0.0)
    # sum / count equals .mean() bit for bit when nothing is ignored (both sum, then divide once).
    return losses.sum() / valid.sum().clamp_min(1)


def linear_cross_entropy(
    hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = -100, softcap: float | None = None
) -> Tensor:
    """The lm_head and the loss the plain way: ``cross_entropy(hidden @ weight.T, targets, ignore_index)``.

    hidden (..., d), weight (vocab, d), targets (...). The full (..., vocab)
    logits are formed, as ``Linear`` forms them, so this gives exactly the loss
    of the model's logits; the "torch" and "triton" backends of the op avoid them.
    ``softcap`` c first turns each logit z into c * tanh(z / c) (Gemma 2's final soft-capping).
    """
    if weight.dim() != 2 or hidden.dim() < 1 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight has shape {tuple(weight.shape)} and hidden {tuple(hidden.shape)}; "
            f"expected weight (vocab, d) with d = hidden's last dim"
        )
    logits = hidden @ weight.T
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return cross_entropy(logits, targets, ignore_index)
