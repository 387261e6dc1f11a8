"""FlashAttention-2, tile by tile, in plain PyTorch: the readable twin of the Triton kernel.

Nothing here is fast. Each iteration of the outer loops below is what one Triton
program does in ``flash_attention.py``; reading this file first makes that
kernel's index arithmetic easy to follow, and the tests use it as a second
reference whose memory behaviour is that of the kernel.

The function. Per (batch, head), with Q (Nq, D), K and V (Nk, D) and a scale
c (default D^-1/2):

    S = c Q K^T                 (Nq, Nk)  scores
    P = softmax(S) by rows      (Nq, Nk)
    O = P V                     (Nq, D)

The explicit version (``scratchlm.model.functional.attention``) stores S and P:
Nq x Nk numbers per head, 2 GiB in float32 for 32 heads of a 4096-token
sequence. FlashAttention never forms them. It walks over tiles of Bm queries
by Bn keys and keeps only state the size of O, so memory grows as N D, not N^2,
and on a GPU the tile lives in on-chip SRAM instead of a round trip to HBM.

Forward: the online softmax. A query tile Q_i (Bm, D) visits the key tiles
K_j, V_j (Bn, D) one after another and keeps, per query row, the largest score
seen so far m, the sum l of exp(score - m) over the keys seen so far, and an
unnormalised float32 accumulator A = sum over keys of exp(score - m) v (Bm, D).
For the next tile, S_ij = c Q_i K_j^T (Bm, Bn), and

    m_new = max(m, rowmax(S_ij))
    alpha = exp(m - m_new)            what was summed against the old max, rescaled
    P~    = exp(S_ij - m_new)         every exponent <= 0: exp never overflows
    l     = alpha l + rowsum(P~)
    A     = alpha A + P~ V_j
    m     = m_new

After the last tile every term of l and A has been shifted by the same final
m, so O_i = A / l is exactly softmax(S) V, and the row's logsumexp is
L_i = m + log l. Two FlashAttention-2 choices show: the division by l waits
until the end (one division per row instead of one per tile), and the query
tile is the outer loop, so on a GPU one program owns one Q_i, its m, l, A and
its output rows, with no communication between programs.

Causal masking, aligned bottom-right: query i may attend key j iff
j <= i + (Nk - Nq), since the queries are the last Nq positions of the key
sequence (the same as the lower triangle when Nq = Nk). A tile whose first key
lies beyond what its last query may see is entirely masked: it is skipped,
never computed, which is half the work when Nq = Nk. A tile whose last key is
visible to its first query needs no mask at all; only the tiles the diagonal
crosses get -inf written into the masked scores. When Nq > Nk the first
Nq - Nk queries see no key: their l is 0, their output is defined as 0 and
their logsumexp as -inf, and every exp is guarded so that -inf - (-inf) never
makes a NaN.

Backward. Saved: Q, K, V, O and L, which is Nq numbers per head (float32;
float64 for float64 inputs) instead of the Nq x Nk matrix P. Given dO:

    dV = P^T dO
    dP = dO V^T
    dS = P * (dP - delta)             delta_i = sum_j P_ij dP_ij
    dQ = c dS K
    dK = c dS^T Q

dS is the softmax Jacobian applied row by row: dS_ij = P_ij (dP_ij -
sum_k P_ik dP_ik). The sum needs no P: sum_k P_ik (dO_i . V_k) = dO_i . O_i, so
delta = rowsum(dO * O) is one dot product per row, computed once before the
loops. P itself is recomputed tile by tile as exp(S_ij - L_i), exact in one
step because L is the logsumexp of the whole row (no running max needed).
The loop order flips: key tiles outer, so a program owns dK_j and dV_j and
accumulates them over the query tiles that see its keys; dQ_i then receives a
contribution from every key tile (on a GPU: atomic adds or a separate pass;
here a += into a float32 buffer). The causal skip is mirrored: a key tile
starts at the first query tile that sees its first key.

Grouped-query attention (GQA). Llama-style models give K and V fewer heads
than Q: Hq = G Hkv query heads, Hkv K/V heads, and query head h attends with
K/V head h // G, so each run of G consecutive query heads (a group) shares
one K and one V (G = Hq is multi-query attention, MQA). The K/V cache and the
K/V projections shrink by G; the attention arithmetic does not. Here the
group is a dimension of its own: q is viewed as (B, G, Nq, D) against k and
v of (B, Nk, D), B counting K/V heads, and each K/V tile is broadcast to the
G query heads, never copied G times. The forward is otherwise unchanged,
per query head. In the backward a K/V head is an input of G heads' outputs,
so its gradient is the sum of their contributions:

    dK = c sum over g of dS_g^T Q_g,      dV = sum over g of P_g^T dO_g

The key-tile loop owns dK_j and dV_j for all G heads at once and adds the G
terms in; on a GPU the program of a (key tile, K/V head) loops over the G
query heads itself, so dK and dV still have one writer each and need no
atomic adds. dQ is per query head, as before.

Memory: beyond inputs and outputs, L, delta and the float32 gradient
buffers (all O(N D)); the largest temporaries are tiles for a whole group,
(batch, G, Bm, Bn) scores and the (batch, G, Bn, D) terms of dK and dV.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from scratchlm.kernels._registration import compute_dtype, kv_group_size
from scratchlm.kernels.documents import document_rows, document_spans

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
NEG_INF = float("-inf")


def _visible(
    q_start: int,
    q_end: int,
    k_start: int,
    k_end: int,
    offset: int,
    causal: bool,
    runs: Tensor | None,
    device: torch.device,
    window: int | None = None,
) -> Tensor | None:
    """(Bm, Bn) mask, True where query row may attend key column; None when the whole tile is visible.

    Causal: query i sees key j iff j <= i + offset, offset = Nk - Nq. The
    least any row of the tile sees is q_start + offset; if the tile's last key
    is within that, no entry is masked. Documents: ``runs`` holds each key
    position's document number, non-decreasing (queries sit at positions
    i + offset); when the first and last query and key share one number the
    whole tile is one document and needs no mask. A ``window`` W (causal only)
    also hides key j from query i when j <= i + offset - W; the tile needs no
    such mask when its first key is within the window of its last query.
    """
    mask = None
    rows = torch.arange(q_start, q_end, device=device)[:, None]  # (Bm, 1)
    cols = torch.arange(k_start, k_end, device=device)[None, :]  # (1, Bn)
    if causal and k_end - 1 > q_start + offset:
        mask = cols <= rows + offset
    if window is not None and k_start <= q_end - 1 + offset - window:
        inside = cols > rows + offset - window
        mask = inside if mask is None else mask & inside
    if runs is not None:
        q_runs, k_runs = runs[q_start + offset : q_end + offset], runs[k_start:k_end]
        if not q_runs[0] == q_runs[-1] == k_runs[0] == k_runs[-1]:
            same = q_runs[:, None] == k_runs[None, :]
            mask = same if mask is None else mask & same
    return mask


def _one_row_at_a_time(function, documents, *tensors):
    """Run ``function`` per K/V row: tile ranges differ from row to row when documents do."""
    parts = [function(*(t[b : b + 1] for t in tensors), tuple(d[b : b + 1] for d in documents)) for b in range(len(tensors[0]))]
    return tuple(torch.cat(outputs) for outputs in zip(*parts))


def tiled_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool,
    scale: float,
    block_m: int,
    block_n: int,
    documents: tuple[Tensor, Tensor, Tensor] | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> tuple[Tensor, Tensor]:
    """(o, lse) for q (B, G, Nq, D), k and v (B, Nk, D), all in the compute dtype; lse is (B, G, Nq).

    B counts K/V heads and G the query heads sharing each one; a 3-D q
    (B, Nq, D) is one query head per K/V head, with o (B, Nq, D), lse (B, Nq).
    ``documents``: per K/V row and key position, its document's number,
    first position and end, (B, Nk) each (``documents.document_spans``).
    """
    if q.dim() == 3:
        o, lse = tiled_forward(q[:, None], k, v, causal, scale, block_m, block_n, documents, window, softcap)
        return o[:, 0], lse[:, 0]
    if documents is not None and len(q) > 1:
        return _one_row_at_a_time(
            lambda *args: tiled_forward(*args[:3], causal, scale, block_m, block_n, args[3], window, softcap),
            documents, q, k, v,
        )
    batch, group, num_queries, head_dim = q.shape
    num_keys = k.shape[1]
    offset = num_keys - num_queries
    runs, starts, ends = (None, None, None) if documents is None else (d[0] for d in documents)
    o = torch.empty_like(q)
    lse = torch.empty(batch, group, num_queries, dtype=q.dtype, device=q.device)
    for q_start in range(0, num_queries, block_m):  # one GPU program per (batch x head, query tile)
        q_end = min(q_start + block_m, num_queries)
        rows = q_end - q_start
        q_tile = q[:, :, q_start:q_end]  # (B, G, Bm, D)
        row_max = torch.full((batch, group, rows), NEG_INF, dtype=q.dtype, device=q.device)  # m
        row_sum = torch.zeros(batch, group, rows, dtype=q.dtype, device=q.device)  # l
        acc = torch.zeros(batch, group, rows, head_dim, dtype=q.dtype, device=q.device)  # A
        # Causal: the tile's last query sees keys < q_end + offset; later tiles are skipped.
        k_first, k_stop = 0, (max(0, min(num_keys, q_end + offset)) if causal else num_keys)
        if documents is not None:
            # Keys before the first query's document are skipped, and (not causal) after the last's.
            k_first = int(starts[q_start + offset]) // block_n * block_n
            k_stop = k_stop if causal else int(ends[q_end - 1 + offset])
        if window is not None:
            # Window: the tile's first query sees no key before q_start + offset - W + 1.
            k_first = max(k_first, max(0, q_start + offset - window + 1) // block_n * block_n)
        for k_start in range(k_first, k_stop, block_n):
            k_end = min(k_start + block_n, num_keys)
            # (B, 1, Bn, D): one K/V tile, broadcast to the G query heads of its group.
            k_tile, v_tile = k[:, None, k_start:k_end], v[:, None, k_start:k_end]
            scores = _capped((q_tile @ k_tile.transpose(-2, -1)) * scale, softcap)  # (B, G, Bm, Bn)
            mask = _visible(q_start, q_end, k_start, k_end, offset, causal, runs, q.device, window)
            if mask is not None:
                scores = scores.masked_fill(~mask, NEG_INF)
            new_max = torch.maximum(row_max, scores.amax(dim=-1))  # (B, G, Bm)
            # A row that has met only masked keys keeps max -inf; shifting it by 0
            # instead gives exp(-inf) = 0 where exp(-inf - (-inf)) would be NaN.
            shift = torch.where(torch.isneginf(new_max), 0.0, new_max)
            p = torch.exp(scores - shift[..., None])  # (B, G, Bm, Bn), P~
            alpha = torch.exp(row_max - shift)  # (B, G, Bm); 0 while nothing was summed
            row_sum = alpha * row_sum + p.sum(dim=-1)
            acc = alpha[..., None] * acc + p @ v_tile  # (B, G, Bm, D)
            row_max = new_max
        # A row that saw a key has l >= 1 (its largest term is exp(0)); l = 0 means no key.
        has_keys = row_sum > 0
        o[:, :, q_start:q_end] = acc / torch.where(has_keys, row_sum, 1.0)[..., None]  # acc is 0 there
        lse[:, :, q_start:q_end] = torch.where(has_keys, row_max + torch.log(row_sum), NEG_INF)
    return o, lse


def tiled_backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    lse: Tensor,
    do: Tensor,
    causal: bool,
    scale: float,
    block_m: int,
    block_n: int,
    documents: tuple[Tensor, Tensor, Tensor] | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) from the saved o (B, G, Nq, D) and lse (B, G, Nq), all in the compute dtype.

    Shapes as in ``tiled_forward`` (a 3-D q, o and do with a 2-D lse: G = 1);
    dk and dv have k's shape, each K/V head's gradient summed over its G query heads.
    """
    if q.dim() == 3:
        dq, dk, dv = tiled_backward(
            q[:, None], k, v, o[:, None], lse[:, None], do[:, None], causal, scale, block_m, block_n, documents,
            window, softcap,
        )  # fmt: skip
        return dq[:, 0], dk, dv
    if documents is not None and len(q) > 1:
        return _one_row_at_a_time(
            lambda *args: tiled_backward(*args[:6], causal, scale, block_m, block_n, args[6], window, softcap),
            documents, q, k, v, o, lse, do,
        )  # fmt: skip
    num_queries, num_keys = q.shape[2], k.shape[1]
    offset = num_keys - num_queries
    runs, starts, ends = (None, None, None) if documents is None else (d[0] for d in documents)
    delta = (do * o).sum(dim=-1)  # (B, G, Nq): rowsum(dO * O) = rowsum(P * dP)
    # Rows without keys have lse -inf and only -inf scores: shift them by 0 (exp(-inf) = 0).
    lse_shift = torch.where(torch.isneginf(lse), 0.0, lse)
    dq = torch.zeros_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    for k_start in range(0, num_keys, block_n):  # one GPU program per (batch x K/V head, key tile)
        k_end = min(k_start + block_n, num_keys)
        k_tile, v_tile = k[:, None, k_start:k_end], v[:, None, k_start:k_end]  # (B, 1, Bn, D)
        dk_acc = torch.zeros_like(k[:, k_start:k_end])  # (B, Bn, D): one per K/V head, not per query head
        dv_acc = torch.zeros_like(v[:, k_start:k_end])
        # Causal: query i sees key k_start iff i >= k_start - offset; earlier query tiles are skipped.
        first_query, q_stop = (max(0, k_start - offset) if causal else 0), num_queries
        if documents is not None:
            # Queries after the last key's document are skipped, and (not causal) before the first's.
            first_query = first_query if causal else max(0, int(starts[k_start]) - offset)
            q_stop = max(0, min(num_queries, int(ends[k_end - 1]) - offset))
        if window is not None:
            # Window: no query after k_end - 1 - offset + W - 1 sees the tile's last key.
            q_stop = max(0, min(q_stop, k_end - 1 - offset + window))
        for q_start in range(first_query // block_m * block_m, q_stop, block_m):
            q_end = min(q_start + block_m, num_queries)
            q_tile, do_tile = q[:, :, q_start:q_end], do[:, :, q_start:q_end]  # (B, G, Bm, D)
            scores = _capped((q_tile @ k_tile.transpose(-2, -1)) * scale, softcap)  # (B, G, Bm, Bn), as in the forward
            mask = _visible(q_start, q_end, k_start, k_end, offset, causal, runs, q.device, window)
            if mask is not None:
                scores = scores.masked_fill(~mask, NEG_INF)
            p = torch.exp(scores - lse_shift[:, :, q_start:q_end, None])  # P recomputed, exact
            dp = do_tile @ v_tile.transpose(-2, -1)  # (B, G, Bm, Bn)
            ds = p * (dp - delta[:, :, q_start:q_end, None])  # (B, G, Bm, Bn), gradient of the capped scores
            if softcap is not None:
                # d/ds c tanh(s / c) = 1 - tanh^2, from the capped score itself (masked ones have p = 0).
                ds = ds * (1 - torch.square(torch.where(torch.isneginf(scores), 0.0, scores) / softcap))
            dq[:, :, q_start:q_end] += scale * (ds @ k_tile)  # (B, G, Bm, D)
            # The G query heads all read this K/V tile: their gradients add up (dim 1 is the group).
            dv_acc += (p.transpose(-2, -1) @ do_tile).sum(dim=1)  # (B, Bn, D)
            dk_acc += scale * (ds.transpose(-2, -1) @ q_tile).sum(dim=1)  # (B, Bn, D)
        dk[:, k_start:k_end] = dk_acc
        dv[:, k_start:k_end] = dv_acc
    return dq, dk, dv


def _capped(scores: Tensor, softcap: float | None) -> Tensor:
    """Gemma 2's soft-capping c tanh(s / c), before the mask; the scores unchanged without a cap."""
    return scores if softcap is None else softcap * torch.tanh(scores / softcap)


def check_window_softcap(window: object, softcap: object, causal: bool) -> None:
    """Refuse, by name, a window that is not an int >= 1 (or comes without causal) and a cap that is not > 0."""
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window is {window!r}; expected None or an int >= 1 (the keys a query sees, itself included)")
        if not causal:
            raise ValueError(f"window={window} with causal=False; a sliding window is defined for causal attention only")
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not math.isfinite(softcap) or softcap <= 0:
            raise ValueError(f"softcap is {softcap!r}; expected None or a finite float > 0")


class TiledAttentionFunction(torch.autograd.Function):
    """Views the inputs as (B, G, Nq, D) queries against (B, Nk, D) keys and values, B counting
    K/V heads (the leading dims times Hkv) and G the query heads of each; computes in float32
    (or float64) and casts back."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale, block_m, block_n, documents, window=None, softcap=None):
        compute = compute_dtype(q.dtype)
        kv_batch, group = math.prod(k.shape[:-2]), kv_group_size(q, k, v)
        num_queries, num_keys, head_dim = q.shape[-2], k.shape[-2], q.shape[-1]
        # Hq = Hkv * G, consecutive query heads forming a group: the heads dim splits into (Hkv, G).
        q4 = q.reshape(kv_batch, group, num_queries, head_dim).to(compute)  # (B, G, Nq, D)
        k3 = k.reshape(kv_batch, num_keys, head_dim).to(compute)  # (B, Nk, D)
        v3 = v.reshape(kv_batch, num_keys, head_dim).to(compute)
        o, lse = tiled_forward(
            q4, k3, v3, causal, scale, block_m, block_n, _per_kv_row(documents, kv_batch), window, softcap
        )
        o = o.to(q.dtype).reshape(q.shape)
        lse = lse.reshape(q.shape[:-1])
        # Like the kernel: O is kept in the output dtype, only the logsumexp in float32.
        # Tensors only, never None, the logsumexp (..., Nq) last, as the kernel's Function saves them.
        optional = () if documents is None else (documents,)
        ctx.save_for_backward(q, k, v, o, *optional, lse)
        ctx.settings = (causal, scale, block_m, block_n)
        ctx.window_softcap = (window, softcap)
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k, v, o, *optional, lse = ctx.saved_tensors
        documents = optional[0] if optional else None
        compute = compute_dtype(q.dtype)
        kv_batch, group = math.prod(k.shape[:-2]), kv_group_size(q, k, v)
        num_queries, num_keys, head_dim = q.shape[-2], k.shape[-2], q.shape[-1]

        def queries(tensor: Tensor) -> Tensor:  # q, o, do as (B, G, Nq, D)
            return tensor.reshape(kv_batch, group, num_queries, head_dim).to(compute)

        def keys(tensor: Tensor) -> Tensor:  # k, v as (B, Nk, D)
            return tensor.reshape(kv_batch, num_keys, head_dim).to(compute)

        dq, dk, dv = tiled_backward(
            queries(q),
            keys(k),
            keys(v),
            queries(o),
            lse.reshape(kv_batch, group, num_queries),
            queries(do),
            *ctx.settings,
            _per_kv_row(documents, kv_batch),
            *ctx.window_softcap,
        )
        return (
            dq.to(q.dtype).reshape(q.shape),
            dk.to(k.dtype).reshape(k.shape),
            dv.to(v.dtype).reshape(v.shape),
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        )


def _per_kv_row(documents: Tensor | None, kv_batch: int) -> tuple[Tensor, Tensor, Tensor] | None:
    """The (3, rows, Nk) document table as (number, start, end), each (B, Nk) for the B K/V rows:
    batch row r's ids serve its Hkv = B / rows consecutive K/V rows."""
    if documents is None:
        return None
    return tuple(documents.repeat_interleave(kv_batch // documents.shape[1], dim=1))


def _check_inputs(q: object, k: object, v: object, block_m: object, block_n: object) -> None:
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {tensor.dtype}; expected one of float32, bfloat16, float16, float64")
        if tensor.dim() < 2:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}; expected (..., seq, head_dim)")
    for name, tensor in (("k", k), ("v", v)):
        if tensor.device != q.device:
            raise ValueError(f"{name} is on {tensor.device} but q is on {q.device}; expected one device")
        if tensor.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {tensor.dtype} but q has {q.dtype}; expected the same dtype")
    kv_group_size(q, k, v)
    for name, block in (("block_m", block_m), ("block_n", block_n)):
        if isinstance(block, bool) or not isinstance(block, int) or block < 1:
            raise ValueError(f"{name} is {block!r}; expected a positive int")


def flash_attention_tiled_with_lse(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool = True,
    scale: float | None = None,
    block_m: int = 64,
    block_n: int = 64,
    document_ids: Tensor | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> tuple[Tensor, Tensor]:
    """(o, lse): attention and the logsumexp of each query's scores, shape (..., Nq).

    lse is float32 (float64 for float64 inputs), -inf for a query with no key
    to attend; it carries no gradient.
    """
    _check_inputs(q, k, v, block_m, block_n)
    check_window_softcap(window, softcap, causal)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    documents = None
    if document_ids is not None:
        documents = torch.stack(document_spans(document_rows(document_ids, q, k)))  # (3, rows, Nk)
    softcap = None if softcap is None else float(softcap)
    return TiledAttentionFunction.apply(q, k, v, bool(causal), scale, block_m, block_n, documents, window, softcap)


def flash_attention_tiled(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool = True,
    scale: float | None = None,
    block_m: int = 64,
    block_n: int = 64,
    document_ids: Tensor | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> Tensor:
    """softmax(scale q k^T) v by FlashAttention-2's tiles, never forming the Nq x Nk matrix.

    q (..., Nq, D); k and v (..., Nk, D) with the same leading dims, D, device
    and dtype (float32, bfloat16, float16, or float64); or, grouped-query
    attention, k and v (..., Hkv, Nk, D) for q (..., Hq, Nq, D) with Hq a
    multiple of Hkv, query head h using K/V head h // (Hq // Hkv) (see
    ``kv_group_size``; dk and dv keep k's shape). ``scale`` defaults to
    D^-1/2; ``causal`` masks bottom-right (query i sees key j iff
    j <= i + Nk - Nq); a query with no key gets output 0. Computes in float32
    (float64 for float64 inputs), returns q's dtype. ``block_m`` x ``block_n``
    is the tile, queries x keys; any sizes, dividing the lengths or not.
    ``document_ids`` (..., Nk), one id per key position shared by the heads:
    attention stays within each document (a run of equal consecutive ids,
    see ``scratchlm.kernels.documents``), and tiles that share no document
    with a query tile are skipped, as in the Triton kernel. ``window`` W
    (causal only): query i sees keys i + Nk - Nq - W + 1 .. i + Nk - Nq, its
    last W positions, itself included; key tiles wholly outside every query's
    window are skipped, so the cost grows as N W, not N^2. ``softcap`` c:
    each score s becomes c tanh(s / c) before the softmax (Gemma 2).
    """
    return flash_attention_tiled_with_lse(
        q, k, v, causal, scale, block_m, block_n, document_ids, window, softcap
    )[0]
