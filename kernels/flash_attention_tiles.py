"""FlashAttention's tile geometry: which key (or query) tiles a block visits, and how each is masked.

Shared by the kernels in ``flash_attention_kernels.py``. A mask is two
numbers per row, the first and last key a query may see (``query_bounds``;
``key_bounds`` is its transpose for the dK/dV kernel), so a masked tile
costs two comparisons per score and no loads. ``key_tiles`` gives the forward
and dQ kernels the same walk over key tiles: unmasked tiles in the middle,
masked ones where the causal diagonal or a document boundary crosses;
``query_range`` is its mirror for the dK/dV kernel. A new mask (a sliding
window) is one more bound in these functions.
"""

import triton
import triton.language as tl

from scratchlm.kernels._triton_utils import LOG2E, dot


@triton.jit
def head_dim_mask(offs_d, head_dim, EVEN_D: tl.constexpr):
    """offs_d < head_dim; a constant all-true mask when head_dim fills BLOCK_D (EVEN_D), which the
    compiler folds away, so the tile loads and stores are whole rows, vectorised."""
    if EVEN_D:
        return tl.full(offs_d.shape, True, tl.int1)
    return offs_d < head_dim


@triton.jit
def load_key_tile(k_head, v_head, stride_kn, stride_vn, offs_n, offs_d, d_mask, k_len):
    """Rows ``offs_n`` of k and v, (BLOCK_N, BLOCK_D) each; zeros past k_len and past the head dim.

    The row check stays even on tiles wholly before k_len: where strides keep
    loads from being vectorised, it spills less without it (kernels/NOTES.md).
    """
    kv_mask = (offs_n < k_len)[:, None] & d_mask[None, :]
    k = tl.load(k_head + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_head + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
    return k, v


@triton.jit
def query_bounds(
    doc_ptr, stride_doc_kind, offs_m, q_len, k_len, causal_offset, window,
    CAUSAL: tl.constexpr, DOCUMENTS: tl.constexpr, WINDOW: tl.constexpr,
):  # fmt: skip
    """Per query row, the first and last key it may see, (lo, hi): a masked tile keeps keys lo..hi.

    Causal, query i sits at key position i + causal_offset and sees no key
    after it; with documents it sees none before its document's start nor
    after its end. Keys past k_len are always outside. Rows past q_len get
    lo > hi and see nothing. Two numbers per row stand for the whole mask, so
    a masked tile costs two comparisons per score and no loads.
    """
    positions = offs_m + causal_offset
    if DOCUMENTS:
        valid = offs_m < q_len
        lo = tl.load(doc_ptr + positions, mask=valid, other=k_len)
        hi = tl.load(doc_ptr + stride_doc_kind + positions, mask=valid, other=0) - 1
        if CAUSAL:
            hi = tl.minimum(hi, positions)
    else:
        lo = tl.zeros_like(offs_m)
        if CAUSAL:
            hi = tl.minimum(positions, k_len - 1)
        else:
            hi = tl.zeros_like(offs_m) + (k_len - 1)
    if WINDOW:  # causal only: the last ``window`` positions up to the query's own
        lo = tl.maximum(lo, positions - window + 1)
    return lo, hi


@triton.jit
def key_bounds(
    doc_ptr, stride_doc_kind, offs_n, q_len, k_len, causal_offset, window,
    CAUSAL: tl.constexpr, DOCUMENTS: tl.constexpr, WINDOW: tl.constexpr,
):  # fmt: skip
    """Per key row, the first and last query (index) that may see it, (lo, hi): the transpose of
    ``query_bounds``, for the dK/dV kernel. Rows past k_len are never stored."""
    if DOCUMENTS:
        valid = offs_n < k_len
        hi = tl.load(doc_ptr + stride_doc_kind + offs_n, mask=valid, other=0) - 1 - causal_offset
        if CAUSAL:
            lo = offs_n - causal_offset
        else:
            lo = tl.load(doc_ptr + offs_n, mask=valid, other=0) - causal_offset
    else:
        lo = offs_n - causal_offset if CAUSAL else tl.zeros_like(offs_n)
        hi = tl.zeros_like(offs_n) + (q_len - 1)
    if WINDOW:  # no query later than window - 1 positions after the key sees it
        hi = tl.minimum(hi, offs_n - causal_offset + window - 1)
    return lo, hi


@triton.jit
def document_key_range(
    doc_ptr, stride_doc_kind, start_m, q_len, causal_offset, full_end, end,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """The key tiles of query block ``start_m`` under documents, as (start, full_start, full_end, end).

    Keys before the first query's document and (not causal) after the last
    query's are never visited. When the whole block lies in one document,
    the key tiles inside it (and, causal, before the diagonal: ``full_end``
    as without documents) need no mask: [full_start, full_end); the masked
    tiles are [start, full_start) and [full_end, end). When the block
    straddles a boundary every tile it visits is masked.
    """
    first = start_m + causal_offset
    last = tl.minimum(start_m + BLOCK_M, q_len) - 1 + causal_offset
    doc_start = tl.load(doc_ptr + first)  # where the first query's document starts
    one_document = tl.load(doc_ptr + last) == doc_start
    doc_end = tl.load(doc_ptr + stride_doc_kind + last)  # one past the last query's document
    if not CAUSAL:
        end = doc_end
    start = doc_start // BLOCK_N * BLOCK_N
    full_start = tl.where(one_document, tl.minimum((doc_start + BLOCK_N - 1) // BLOCK_N * BLOCK_N, end), end)
    full_end = tl.where(one_document, tl.minimum(full_end, doc_end // BLOCK_N * BLOCK_N), end)
    return start, full_start, tl.maximum(full_end, full_start), end


@triton.jit
def key_tiles(
    doc_ptr, stride_doc_kind, stride_doc_row, head, heads_per_row, start_m, offs_m, q_len, k_len, window,
    CAUSAL: tl.constexpr, DOCUMENTS: tl.constexpr, WINDOW: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    """The key tiles query block ``start_m`` visits and how each is masked, for the forward and dQ kernels:
    (start, full_start, full_end, end, q_lo, q_hi).

    Tiles in [full_start, full_end) are visible to every row of the block and
    run unmasked; those in [start, full_start) (documents only) and
    [full_end, end) are masked to keys q_lo..q_hi per row (``query_bounds``).
    Causal, tiles past the diagonal are never visited; with documents, nor
    tiles of other documents (``document_key_range``). A new mask is one
    more bound here.
    """
    causal_offset = k_len - q_len  # query i sees key j iff j <= i + causal_offset
    if CAUSAL:
        # Keys j <= start_m + causal_offset are visible to every row of the block.
        full_end = tl.maximum(tl.minimum(start_m + causal_offset + 1, k_len), 0) // BLOCK_N * BLOCK_N
        end = tl.maximum(tl.minimum(start_m + BLOCK_M + causal_offset, k_len), 0)
    else:
        full_end = k_len // BLOCK_N * BLOCK_N
        end = k_len
    doc_ptr += (head // heads_per_row) * stride_doc_row  # every head of a batch row shares its documents
    q_lo, q_hi = query_bounds(
        doc_ptr, stride_doc_kind, offs_m, q_len, k_len, causal_offset, window, CAUSAL, DOCUMENTS, WINDOW
    )
    if DOCUMENTS:
        start, full_start, full_end, end = document_key_range(
            doc_ptr, stride_doc_kind, start_m, q_len, causal_offset, full_end, end, CAUSAL, BLOCK_M, BLOCK_N
        )
    else:
        start = 0
        full_start = 0
    if WINDOW:
        # Key tiles before the block's first query's window are never visited; those
        # before its last query's window start are masked (the window's lower edge).
        start = tl.maximum(start, tl.maximum(start_m + causal_offset - window + 1, 0) // BLOCK_N * BLOCK_N)
        all_see = tl.maximum(start_m + BLOCK_M + causal_offset - window, 0)
        full_start = tl.minimum(tl.maximum(full_start, (all_see + BLOCK_N - 1) // BLOCK_N * BLOCK_N), end)
        full_end = tl.maximum(full_end, full_start)
    return start, full_start, full_end, end, q_lo, q_hi


@triton.jit
def soft_cap(s, softcap_log2):
    """Gemma 2's c tanh(s / c) with s and c both in log2 units (the ratio is unchanged);
    tanh(x) = 1 - 2 / (e^2x + 1), which saturates to +-1 instead of overflowing."""
    return softcap_log2 * (1.0 - 2.0 / (tl.exp2(s * (2.0 * LOG2E) / softcap_log2) + 1.0))


@triton.jit
def soft_cap_slope(s, softcap_log2):
    """d(c tanh(x / c))/dx = 1 - tanh^2, from the capped score s; 0 where s is masked (-inf)."""
    t = tl.where(s == float("-inf"), 0.0, s / softcap_log2)
    return 1.0 - t * t


@triton.jit
def scores(
    q, k, offs_n, qk_scale_log2, q_lo, q_hi, softcap_log2,
    MASKED: tl.constexpr, DOCUMENTS: tl.constexpr, SOFTCAP: tl.constexpr,
):  # fmt: skip
    """scale * q k^T in log2 units, (BLOCK_M, BLOCK_N), soft-capped with SOFTCAP; with MASKED,
    keys outside each query's [q_lo, q_hi] (see ``query_bounds``) are -inf; DOCUMENTS (documents
    or a window) checks q_lo too."""
    s = dot(q, tl.trans(k), None) * qk_scale_log2
    if SOFTCAP:
        s = soft_cap(s, softcap_log2)
    if MASKED:
        allowed = offs_n[None, :] <= q_hi[:, None]
        if DOCUMENTS:
            allowed = allowed & (offs_n[None, :] >= q_lo[:, None])
        s = tl.where(allowed, s, float("-inf"))
    return s


@triton.jit
def logsumexp_log2(lse):
    """The logsumexp in log2 units, with rows that see no key (-inf) set to +inf so their p = exp2(s - inf) = 0."""
    return tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)


@triton.jit
def query_range(
    doc_ptr, stride_doc_kind, start_n, k_len, q_len, causal_offset, window,
    CAUSAL: tl.constexpr, DOCUMENTS: tl.constexpr, WINDOW: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    """The query tiles of key block ``start_n``, as (start, full_start, full_stop, stop): the
    tiles in [start, stop) see some of its keys, those in [full_start, full_stop) all of them.

    Causal, query i sees key j iff i >= j - causal_offset: tiles before the
    first such query are skipped, and queries from start_n + BLOCK_N - 1 -
    causal_offset on see the whole block. With documents, the mirror of
    ``document_key_range``: queries after the last key's document (and, not
    causal, before the first key's) are never visited, and only a block lying
    in one document has unmasked tiles, those inside it. A ragged last query
    tile is masked. full_start <= full_stop <= stop, all but stop multiples of BLOCK_M.
    """
    if CAUSAL:
        start = tl.maximum(start_n - causal_offset, 0)
        full_start = tl.maximum(start_n + BLOCK_N - 1 - causal_offset, 0)
    else:
        start = 0
        full_start = 0
    stop = q_len
    full_stop = q_len
    if DOCUMENTS:
        last = tl.minimum(start_n + BLOCK_N, k_len) - 1
        doc_start = tl.load(doc_ptr + start_n)
        one_document = tl.load(doc_ptr + last) == doc_start
        doc_end = tl.load(doc_ptr + stride_doc_kind + last) - causal_offset  # as a query index
        if not CAUSAL:
            start = tl.maximum(doc_start - causal_offset, 0)
            full_start = start
        stop = tl.maximum(tl.minimum(doc_end, q_len), 0)
        full_stop = tl.where(one_document, stop, start)  # straddling a boundary: every tile masked
    start = start // BLOCK_M * BLOCK_M
    if DOCUMENTS:
        full_stop = full_stop // BLOCK_M * BLOCK_M
    if WINDOW:
        # No query after start_n + BLOCK_N - 2 - causal_offset + window sees the block's last key;
        # queries up to start_n - 1 - causal_offset + window see its first (and so all of it).
        stop = tl.maximum(tl.minimum(stop, start_n + BLOCK_N - 1 - causal_offset + window), 0)
        all_see = tl.maximum(start_n - causal_offset + window, 0) // BLOCK_M * BLOCK_M
        full_stop = tl.maximum(tl.minimum(full_stop, all_see), start)
    full_start = tl.minimum((full_start + BLOCK_M - 1) // BLOCK_M * BLOCK_M, full_stop)
    return start, full_start, full_stop, stop
