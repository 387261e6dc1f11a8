"""FlashAttention-2, causal or not: o = softmax(scale * q k^T + mask) v, tile by tile.

Forward, for one block of queries (rows i) against key tiles j = 0, 1, ...,
with scores s = scale * q k^T kept in log2 units (scale * log2(e) is folded
in, so exp2 replaces exp), the online softmax keeps per row a running max m,
a running sum l and a float32 accumulator acc:

    m_new = max(m, rowmax(s_j))
    p_j   = exp2(s_j - m_new)
    l     = l * exp2(m - m_new) + rowsum(p_j)
    acc   = acc * exp2(m - m_new) + p_j v_j

and at the end o = acc / l and logsumexp = ln(2) * (m + log2(l)). Causal
masking is aligned bottom-right: query i sees key j iff j <= i + (Nk - Nq).
Key tiles entirely above the diagonal are never visited (the loop stops at
the last key the block's last query sees); tiles entirely below it run
without a mask; only the diagonal tiles (and a ragged last tile) mask.

Backward, with P = softmax(S), S = scale * Q K^T and dO the output gradient:

    dV = P^T dO
    dP = dO V^T
    dS = P * (dP - delta),   delta = rowsum(dP * P) = rowsum(dO * O)
    dQ = scale * dS K,       dK = scale * dS^T Q

A preprocessing kernel computes delta in float32. dK and dV come from one
kernel (a program per key block, looping over the query blocks at or after
the diagonal), dQ from another (a program per query block, looping over key
blocks), so every gradient element is written by exactly one program: no
atomics, bitwise-identical gradients from run to run.

Grouped-query attention (GQA; MQA when Hkv = 1): k and v may have fewer heads
than q, Hq = G * Hkv, and query head h reads K/V head h // G, so G consecutive
query heads share one K/V head (the Llama / Hugging Face layout). Flattened
to (batch * Hq, Nq, D) and (batch * Hkv, Nk, D), flattened query head i still
reads K/V row i // G, because batch b's heads start at b * Hq = b * G * Hkv.
The kernels index the shared head instead of repeating K and V: no copy. A
shared K/V head's gradient is the sum over its G query heads,

    dK = scale * sum over g of dS_g^T Q_g,   dV = sum over g of P_g^T dO_g,

so the dK/dV program of a (key block, K/V head) loops over the group's query
heads and their query blocks, accumulating in float32 registers in a fixed
order. Each dK/dV element still has a single writer: no atomics, and the
result is as deterministic as without groups. dQ is unchanged, one program
per (query block, query head) reading its shared K/V head.

Memory trick: the N x N score matrix is never stored. The forward saves O and
one float32 logsumexp per query row (O(N) extra memory); the backward
recomputes each tile of P as exp2(s - logsumexp * log2(e)), exact without a
running max because the logsumexp already normalises it. Rows that see no key
(only when Nq > Nk, causal) give o = 0, logsumexp = -inf and zero gradients.
"""

import triton
import triton.language as tl

from scratchlm.kernels._triton_utils import LN2, RANGE_TAKES_DISABLE_LICM, dot, round_to
from scratchlm.kernels.flash_attention_tiles import (
    head_dim_mask,
    key_bounds,
    key_tiles,
    load_key_tile,
    logsumexp_log2,
    query_range,
    scores,
    soft_cap,
    soft_cap_slope,
)


@triton.jit
def _fwd_key_tile(
    acc, l_i, m_i, q, start_n,
    k_head, v_head, stride_kn, stride_vn, offs_d, d_mask,
    k_len, qk_scale_log2, q_lo, q_hi, softcap_log2,
    MASKED: tl.constexpr, DOCUMENTS: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """The online-softmax update of one query block by the key tile at ``start_n``."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k, v = load_key_tile(k_head, v_head, stride_kn, stride_vn, offs_n, offs_d, d_mask, k_len)
    s = scores(q, k, offs_n, qk_scale_log2, q_lo, q_hi, softcap_log2, MASKED, DOCUMENTS, SOFTCAP)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if MASKED:
        # A row with no visible key so far keeps m = -inf; subtracting 0
        # instead makes its p and its rescale factor exp2(-inf) = 0, not NaN.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_ref = m_new
    p = tl.exp2(s - m_ref[:, None])
    alpha = tl.exp2(m_i - m_ref)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = dot(round_to(p, v.dtype), v, acc * alpha[:, None])
    return acc, l_i, m_new


@triton.jit
def _fwd_key_tiles(
    acc, l_i, m_i, q,
    k_head, v_head, stride_kn, stride_vn, offs_d, d_mask,
    start, end, k_len, qk_scale_log2, q_lo, q_hi, softcap_log2,
    MASKED: tl.constexpr, DOCUMENTS: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """The online-softmax update of one query block over key tiles [start, end)."""
    for start_n in range(start, end, BLOCK_N):
        acc, l_i, m_i = _fwd_key_tile(
            acc, l_i, m_i, q, start_n, k_head, v_head, stride_kn, stride_vn, offs_d, d_mask,
            k_len, qk_scale_log2, q_lo, q_hi, softcap_log2, MASKED, DOCUMENTS, SOFTCAP, BLOCK_N,
        )  # fmt: skip
    return acc, l_i, m_i


# `group` stays a runtime value even when it is 1 (by default Triton compiles
# an int equal to 1 as a constant), so plain attention runs the same binaries
# as grouped-query attention: folding group = 1 away spills more (kernels/NOTES.md).
@triton.jit(do_not_specialize=["group"])
def flash_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, doc_ptr,
    stride_qh, stride_qm, stride_kh, stride_kn, stride_vh, stride_vn, stride_oh, stride_om, stride_lse_h,
    stride_doc_kind, stride_doc_row,
    q_len, k_len, head_dim, group, heads_per_row, q_len_bucket, k_len_bucket, qk_scale_log2, window, softcap_log2,
    CAUSAL: tl.constexpr, DOCUMENTS: tl.constexpr, WINDOW: tl.constexpr, BOUNDED: tl.constexpr,
    SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
):  # fmt: skip
    # One program per (query block, batch*head); int64 so head offsets never wrap.
    pid = tl.program_id(0).to(tl.int64)
    n_m_blocks = tl.cdiv(q_len, BLOCK_M)
    head = pid // n_m_blocks
    kv_head = head // group  # the K/V head shared by this query head's group
    # Every base pointer moves to this program's heads once, up front: it spills less than offsetting at each use.
    q_ptr += head * stride_qh
    o_ptr += head * stride_oh
    lse_ptr += head * stride_lse_h
    k_ptr += kv_head * stride_kh
    v_ptr += kv_head * stride_vh
    # The last query blocks see the most keys under a causal mask: start them first.
    start_m = (n_m_blocks - 1 - pid % n_m_blocks).to(tl.int32) * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = head_dim_mask(offs_d, head_dim, EVEN_D)
    q_mask = (offs_m < q_len)[:, None] & d_mask[None, :]
    q = tl.load(q_ptr + offs_m[:, None] * stride_qm + offs_d[None, :], mask=q_mask, other=0.0)

    start, full_start, full_end, end, q_lo, q_hi = key_tiles(
        doc_ptr, stride_doc_kind, stride_doc_row, head, heads_per_row, start_m, offs_m, q_len, k_len, window,
        CAUSAL, DOCUMENTS, WINDOW, BLOCK_M, BLOCK_N,
    )  # fmt: skip
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # BOUNDED (documents or a window): each row's keys have a lower bound too, and the
    # tiles below the block's unmasked ones are masked.
    if BOUNDED:
        acc, l_i, m_i = _fwd_key_tiles(
            acc, l_i, m_i, q, k_ptr, v_ptr, stride_kn, stride_vn, offs_d, d_mask,
            start, full_start, k_len, qk_scale_log2, q_lo, q_hi, softcap_log2,
            MASKED=True, DOCUMENTS=True, SOFTCAP=SOFTCAP, BLOCK_N=BLOCK_N,
        )  # fmt: skip
    acc, l_i, m_i = _fwd_key_tiles(
        acc, l_i, m_i, q, k_ptr, v_ptr, stride_kn, stride_vn, offs_d, d_mask,
        full_start, full_end, k_len, qk_scale_log2, q_lo, q_hi, softcap_log2,
        MASKED=False, DOCUMENTS=BOUNDED, SOFTCAP=SOFTCAP, BLOCK_N=BLOCK_N,
    )  # fmt: skip
    acc, l_i, m_i = _fwd_key_tiles(
        acc, l_i, m_i, q, k_ptr, v_ptr, stride_kn, stride_vn, offs_d, d_mask,
        full_end, end, k_len, qk_scale_log2, q_lo, q_hi, softcap_log2,
        MASKED=True, DOCUMENTS=BOUNDED, SOFTCAP=SOFTCAP, BLOCK_N=BLOCK_N,
    )  # fmt: skip

    # Rows that saw no key have l = 0 and m = -inf: output 0, logsumexp -inf.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    lse = (m_i + tl.log2(l_safe)) * LN2  # back to natural log
    o_ptrs = o_ptr + offs_m[:, None] * stride_om + offs_d[None, :]
    tl.store(o_ptrs, round_to(o, o_ptr.dtype.element_ty), mask=q_mask)
    tl.store(lse_ptr + offs_m, lse, mask=offs_m < q_len)


@triton.jit
def flash_attention_bwd_preprocess_kernel(
    o_ptr, do_ptr, delta_ptr,
    stride_oh, stride_om, stride_doh, stride_dom, stride_delta_h,
    q_len, head_dim,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """delta = rowsum(dO * O) in float32, the softmax backward's row correction."""
    pid = tl.program_id(0).to(tl.int64)
    n_m_blocks = tl.cdiv(q_len, BLOCK_M)
    head = pid // n_m_blocks
    offs_m = (pid % n_m_blocks).to(tl.int32) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < q_len)[:, None] & (offs_d < head_dim)[None, :]
    o = tl.load(o_ptr + head * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(do_ptr + head * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(delta_ptr + head * stride_delta_h + offs_m, delta, mask=offs_m < q_len)


@triton.jit
def _dkdv_query_tiles(
    dk, dv, k, v,
    q_head, do_head, lse_head, delta_head,
    stride_qm, stride_dom,
    offs_d, d_mask,
    start, end, q_len, qk_scale_log2, k_lo, k_hi, softcap_log2,
    CAUSAL: tl.constexpr, MASKED: tl.constexpr, DOCUMENTS: tl.constexpr, SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr,
):  # fmt: skip
    """Accumulate one key block's dK (unscaled) and dV over query tiles [start, end), transposed: (keys, queries)."""
    for start_m in range(start, end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_valid = offs_m < q_len
        q_mask = m_valid[:, None] & d_mask[None, :]
        q = tl.load(q_head + offs_m[:, None] * stride_qm + offs_d[None, :], mask=q_mask, other=0.0)
        do = tl.load(do_head + offs_m[:, None] * stride_dom + offs_d[None, :], mask=q_mask, other=0.0)
        # Rows past q_len load q = dO = 0 with logsumexp = delta = 0: their p is 1, their contributions exactly 0.
        lse_log2 = logsumexp_log2(tl.load(lse_head + offs_m, mask=m_valid, other=0.0))
        s_t = dot(k, tl.trans(q), None) * qk_scale_log2
        if SOFTCAP:
            s_t = soft_cap(s_t, softcap_log2)
        if MASKED and (CAUSAL or DOCUMENTS):
            allowed = offs_m[None, :] >= k_lo[:, None]
            if DOCUMENTS:
                allowed = allowed & (offs_m[None, :] <= k_hi[:, None])
            s_t = tl.where(allowed, s_t, float("-inf"))
        p_t = tl.exp2(s_t - lse_log2[None, :])
        dv = dot(round_to(p_t, do.dtype), do, dv)
        dp_t = dot(v, tl.trans(do), None)
        # Loaded where it is used, after q and dO: the order that holds the fewest registers.
        delta = tl.load(delta_head + offs_m, mask=m_valid, other=0.0)
        ds_t = p_t * (dp_t - delta[None, :])
        if SOFTCAP:
            ds_t = ds_t * soft_cap_slope(s_t, softcap_log2)
        dk = dot(round_to(ds_t, q.dtype), q, dk)
    return dk, dv


@triton.jit
def _dkdv_one_query_head(
    dk, dv, k, v, head,
    q_ptr, do_ptr, lse_ptr, delta_ptr,
    stride_qh, stride_qm, stride_doh, stride_dom, stride_lse_h,
    offs_d, d_mask,
    start, full_start, full_stop, stop, q_len, qk_scale_log2, k_lo, k_hi, softcap_log2,
    CAUSAL: tl.constexpr, DOCUMENTS: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """Add query head ``head``'s share to one key block's dK (unscaled) and dV over query
    tiles [start, stop): those in [full_start, full_stop) without a mask, the others
    (crossed by the causal diagonal or a document boundary, or ragged) with one."""
    q_head = q_ptr + head * stride_qh
    do_head = do_ptr + head * stride_doh
    lse_head = lse_ptr + head * stride_lse_h  # lse and delta share a layout
    delta_head = delta_ptr + head * stride_lse_h
    dk, dv = _dkdv_query_tiles(
        dk, dv, k, v, q_head, do_head, lse_head, delta_head, stride_qm, stride_dom, offs_d, d_mask,
        start, full_start, q_len, qk_scale_log2, k_lo, k_hi, softcap_log2,
        CAUSAL=CAUSAL, MASKED=True, DOCUMENTS=DOCUMENTS, SOFTCAP=SOFTCAP, BLOCK_M=BLOCK_M,
    )  # fmt: skip
    dk, dv = _dkdv_query_tiles(
        dk, dv, k, v, q_head, do_head, lse_head, delta_head, stride_qm, stride_dom, offs_d, d_mask,
        full_start, full_stop, q_len, qk_scale_log2, k_lo, k_hi, softcap_log2,
        CAUSAL=CAUSAL, MASKED=False, DOCUMENTS=DOCUMENTS, SOFTCAP=SOFTCAP, BLOCK_M=BLOCK_M,
    )  # fmt: skip
    if DOCUMENTS:
        dk, dv = _dkdv_query_tiles(
            dk, dv, k, v, q_head, do_head, lse_head, delta_head, stride_qm, stride_dom, offs_d, d_mask,
            full_stop, stop, q_len, qk_scale_log2, k_lo, k_hi, softcap_log2,
            CAUSAL=CAUSAL, MASKED=True, DOCUMENTS=DOCUMENTS, SOFTCAP=SOFTCAP, BLOCK_M=BLOCK_M,
        )  # fmt: skip
    return dk, dv


@triton.jit(do_not_specialize=["group"])  # see the forward kernel
def flash_attention_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, doc_ptr,
    stride_qh, stride_qm, stride_kh, stride_kn, stride_vh, stride_vn, stride_doh, stride_dom,
    stride_lse_h, stride_dkh, stride_dkn, stride_dvh, stride_dvn, stride_doc_kind, stride_doc_row,
    q_len, k_len, head_dim, group, kv_heads_per_row, qk_scale_log2, scale, window, softcap_log2,
    CAUSAL: tl.constexpr, DOCUMENTS: tl.constexpr, WINDOW: tl.constexpr, BOUNDED: tl.constexpr,
    SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
):  # fmt: skip
    # One program per (key block, batch*K/V head); it owns those dK and dV rows
    # and sums them over the `group` query heads that share the K/V head.
    pid = tl.program_id(0).to(tl.int64)
    n_n_blocks = tl.cdiv(k_len, BLOCK_N)
    kv_head = pid // n_n_blocks
    start_n = (pid % n_n_blocks).to(tl.int32) * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = head_dim_mask(offs_d, head_dim, EVEN_D)
    kv_mask = (offs_n < k_len)[:, None] & d_mask[None, :]
    k = tl.load(k_ptr + kv_head * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + kv_head * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
    # Keys past k_len load as 0; their dK and dV rows are computed but never stored.

    causal_offset = k_len - q_len
    doc_ptr += (kv_head // kv_heads_per_row) * stride_doc_row  # every head of a batch row shares its documents
    k_lo, k_hi = key_bounds(
        doc_ptr, stride_doc_kind, offs_n, q_len, k_len, causal_offset, window, CAUSAL, DOCUMENTS, WINDOW
    )
    start, full_start, full_stop, stop = query_range(
        doc_ptr, stride_doc_kind, start_n, k_len, q_len, causal_offset, window,
        CAUSAL, DOCUMENTS, WINDOW, BLOCK_M, BLOCK_N,
    )  # fmt: skip
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # The group's query heads are kv_head * group + 0, 1, ..., group - 1, always
    # summed in that order, so the float32 sums round alike on every run.
    first_head = kv_head * group
    if RANGE_TAKES_DISABLE_LICM:
        # Without loop-invariant code motion the masks' broadcast key bounds
        # stay inside this loop instead of living (and spilling) through the whole kernel.
        for member in tl.range(0, group, disable_licm=True):
            dk, dv = _dkdv_one_query_head(
                dk, dv, k, v, first_head + member, q_ptr, do_ptr, lse_ptr, delta_ptr,
                stride_qh, stride_qm, stride_doh, stride_dom, stride_lse_h, offs_d, d_mask,
                start, full_start, full_stop, stop, q_len, qk_scale_log2, k_lo, k_hi, softcap_log2,
                CAUSAL=CAUSAL, DOCUMENTS=BOUNDED, SOFTCAP=SOFTCAP, BLOCK_M=BLOCK_M,
            )  # fmt: skip
    else:
        for member in range(0, group):
            dk, dv = _dkdv_one_query_head(
                dk, dv, k, v, first_head + member, q_ptr, do_ptr, lse_ptr, delta_ptr,
                stride_qh, stride_qm, stride_doh, stride_dom, stride_lse_h, offs_d, d_mask,
                start, full_start, full_stop, stop, q_len, qk_scale_log2, k_lo, k_hi, softcap_log2,
                CAUSAL=CAUSAL, DOCUMENTS=BOUNDED, SOFTCAP=SOFTCAP, BLOCK_M=BLOCK_M,
            )  # fmt: skip
    tl.store(dk_ptr + kv_head * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :],
             round_to(dk * scale, dk_ptr.dtype.element_ty), mask=kv_mask)  # fmt: skip
    tl.store(dv_ptr + kv_head * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :],
             round_to(dv, dv_ptr.dtype.element_ty), mask=kv_mask)  # fmt: skip


@triton.jit
def _dq_key_tiles(
    dq, q, do, lse_log2, delta,
    k_head, v_head, stride_kn, stride_vn, offs_d, d_mask,
    start, end, k_len, qk_scale_log2, q_lo, q_hi, softcap_log2,
    MASKED: tl.constexpr, DOCUMENTS: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Accumulate one query block's dQ (unscaled) over key tiles [start, end)."""
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k, v = load_key_tile(k_head, v_head, stride_kn, stride_vn, offs_n, offs_d, d_mask, k_len)
        # Keys past k_len are masked too: their p = exp2(0 - lse) is not 0 and may overflow.
        s = scores(q, k, offs_n, qk_scale_log2, q_lo, q_hi, softcap_log2, MASKED, DOCUMENTS, SOFTCAP)
        p = tl.exp2(s - lse_log2[:, None])
        dp = dot(do, tl.trans(v), None)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * soft_cap_slope(s, softcap_log2)
        dq = dot(round_to(ds, k.dtype), k, dq)
    return dq


@triton.jit(do_not_specialize=["group"])  # see the forward kernel
def flash_attention_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, doc_ptr,
    stride_qh, stride_qm, stride_kh, stride_kn, stride_vh, stride_vn, stride_doh, stride_dom,
    stride_lse_h, stride_dqh, stride_dqm, stride_doc_kind, stride_doc_row,
    q_len, k_len, head_dim, group, heads_per_row, qk_scale_log2, scale, window, softcap_log2,
    CAUSAL: tl.constexpr, DOCUMENTS: tl.constexpr, WINDOW: tl.constexpr, BOUNDED: tl.constexpr,
    SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
):  # fmt: skip
    # One program per (query block, batch*head), reading the group's shared K/V head.
    pid = tl.program_id(0).to(tl.int64)
    n_m_blocks = tl.cdiv(q_len, BLOCK_M)
    head = pid // n_m_blocks
    kv_head = head // group
    start_m = (n_m_blocks - 1 - pid % n_m_blocks).to(tl.int32) * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = head_dim_mask(offs_d, head_dim, EVEN_D)
    m_valid = offs_m < q_len
    q_mask = m_valid[:, None] & d_mask[None, :]
    q = tl.load(q_ptr + head * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(do_ptr + head * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :], mask=q_mask, other=0.0)
    lse_log2 = logsumexp_log2(tl.load(lse_ptr + head * stride_lse_h + offs_m, mask=m_valid, other=0.0))
    delta = tl.load(delta_ptr + head * stride_lse_h + offs_m, mask=m_valid, other=0.0)

    # The same key tiles as the forward's.
    start, full_start, full_end, end, q_lo, q_hi = key_tiles(
        doc_ptr, stride_doc_kind, stride_doc_row, head, heads_per_row, start_m, offs_m, q_len, k_len, window,
        CAUSAL, DOCUMENTS, WINDOW, BLOCK_M, BLOCK_N,
    )  # fmt: skip
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_head = k_ptr + kv_head * stride_kh
    v_head = v_ptr + kv_head * stride_vh
    if BOUNDED:
        dq = _dq_key_tiles(
            dq, q, do, lse_log2, delta, k_head, v_head, stride_kn, stride_vn, offs_d, d_mask,
            start, full_start, k_len, qk_scale_log2, q_lo, q_hi, softcap_log2,
            MASKED=True, DOCUMENTS=True, SOFTCAP=SOFTCAP, BLOCK_N=BLOCK_N,
        )  # fmt: skip
    dq = _dq_key_tiles(
        dq, q, do, lse_log2, delta, k_head, v_head, stride_kn, stride_vn, offs_d, d_mask,
        full_start, full_end, k_len, qk_scale_log2, q_lo, q_hi, softcap_log2,
        MASKED=False, DOCUMENTS=BOUNDED, SOFTCAP=SOFTCAP, BLOCK_N=BLOCK_N,
    )  # fmt: skip
    dq = _dq_key_tiles(
        dq, q, do, lse_log2, delta, k_head, v_head, stride_kn, stride_vn, offs_d, d_mask,
        full_end, end, k_len, qk_scale_log2, q_lo, q_hi, softcap_log2,
        MASKED=True, DOCUMENTS=BOUNDED, SOFTCAP=SOFTCAP, BLOCK_N=BLOCK_N,
    )  # fmt: skip
    tl.store(dq_ptr + head * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :],
             round_to(dq * scale, dq_ptr.dtype.element_ty), mask=q_mask)  # fmt: skip
