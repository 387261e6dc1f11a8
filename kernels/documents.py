"""Document ids for packed sequences: which keys a query may see when documents share a row.

A training window packs several documents into one row of tokens. With
``document_ids`` (one integer per position) attention stays inside a
document: query i sees key j only if both lie in the same document (and,
causal, j <= i). A document is a run of equal consecutive ids, so ids are
expected to be non-decreasing along a row (0, 0, 0, 1, 1, 2, ...), which is
what counting end-of-text tokens gives. Ids that decrease are not an error:
every change of id starts a new document, so (0, 0, 1, 1, 0, 0) is three
documents, the same as (0, 0, 1, 1, 2, 2). Every backend (the explicit mask,
PyTorch's, the tiled twin and the Triton kernel) computes exactly that, and
checking would cost a device-to-host sync in every attention call.

Everything here is plain PyTorch without host syncs, so it runs inside
``torch.compile`` and imports without Triton.
"""

from __future__ import annotations

import torch
from torch import Tensor

_INTEGER_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def document_rows(document_ids: object, q: Tensor, k: Tensor) -> Tensor:
    """``document_ids`` checked against q (..., [heads,] Nq, D) and k (..., Nk, D), as (rows, Nk).

    Accepted: an integer tensor on q's device that broadcasts to the dims
    before the heads plus Nk, (..., Nk), with an optional heads dim of 1,
    (..., 1, Nk); for q of 2 dims (Nq, D), shape (Nk,). The ids of the keys
    are given, one per key position; the queries are the last Nq of them
    (Nq <= Nk), as for causal attention with a KV cache. ``rows`` is the
    product of the dims before the heads (1 for 2-dim q): the flattened
    batch whose row b serves every head of batch element b.
    """
    if not isinstance(document_ids, Tensor):
        raise TypeError(f"document_ids must be a torch.Tensor or None, got {type(document_ids).__name__}")
    if document_ids.dtype not in _INTEGER_DTYPES:
        raise TypeError(f"document_ids has dtype {document_ids.dtype}; expected an integer dtype")
    if document_ids.device != q.device:
        raise ValueError(f"document_ids is on {document_ids.device} but q is on {q.device}; expected one device")
    q_len, k_len = q.shape[-2], k.shape[-2]
    if q_len > k_len:
        raise ValueError(
            f"q has {q_len} positions but k has {k_len}; with document_ids the queries must be the last "
            "Nq <= Nk key positions"
        )
    lead = q.shape[:-3] if q.dim() >= 3 else torch.Size()
    ids = document_ids
    if q.dim() >= 3 and ids.dim() == q.dim() - 1 and ids.shape[-2] == 1:
        ids = ids.squeeze(-2)  # (..., 1, Nk): one row for all heads
    target = (*lead, k_len)
    try:
        ids = torch.broadcast_to(ids, target)
    except RuntimeError:
        heads = f"(..., 1, {k_len}) or " if q.dim() >= 3 else ""
        raise ValueError(
            f"document_ids has shape {tuple(document_ids.shape)}; expected {heads}a shape that broadcasts to "
            f"{tuple(target)}, one id per key position for each row of q (shape {tuple(q.shape)})"
        ) from None
    return ids.reshape(-1, k_len)


def document_spans(rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(run, start, end), each int32 of rows' shape (rows, N): per position its document's
    number in the row (0, 1, ... counting changes of id), first position and end (one past its last)."""
    n = rows.shape[-1]
    changed = rows[:, 1:] != rows[:, :-1]  # (rows, N - 1): a new document starts at j + 1
    first = torch.ones_like(rows[:, :1], dtype=torch.bool)
    starts_here = torch.cat((first, changed), dim=1)
    ends_here = torch.cat((changed, first), dim=1)  # the last position of a document
    run = torch.cumsum(starts_here.to(torch.int32), dim=1, dtype=torch.int32) - 1
    positions = torch.arange(n, device=rows.device, dtype=torch.int32).expand_as(rows)
    # A document's start is the latest start at or before a position; its end
    # the earliest last position at or after it, plus one.
    start = torch.cummax(torch.where(starts_here, positions, 0), dim=1).values
    last = torch.where(ends_here, positions, n - 1).flip(1)
    end = torch.cummin(last, dim=1).values.flip(1) + 1
    return run, start.to(torch.int32), end.to(torch.int32)


def document_mask(document_ids: Tensor, q_len: int) -> Tensor:
    """Boolean (..., Nq, Nk) from ids (..., Nk): True where query i and key j share a document.

    The queries are the last ``q_len`` key positions. Only the document
    condition: causal attention combines it with the causal mask.
    """
    shape = document_ids.shape
    run = document_spans(document_ids.reshape(-1, shape[-1]))[0].reshape(shape)
    q_run = run[..., shape[-1] - q_len :]
    return q_run[..., :, None] == run[..., None, :]
