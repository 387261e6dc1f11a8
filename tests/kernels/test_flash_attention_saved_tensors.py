"""What callers that inspect autograd read: the attention Functions' saved tensors.

The Stanford CS336 assignment 2 tests (and any code that looks into
``out.grad_fn``) take ``[t for t in out.grad_fn.saved_tensors if t.shape ==
(batch, n_queries)]`` and expect exactly one: the float32 logsumexp. So every
saved entry must be a tensor (a None has no ``.shape``), and the logsumexp the
only one shaped like q without its last dim.
"""

from __future__ import annotations

import pytest
import torch

from attention_reference import attention_reference
from scratchlm.kernels import flash_attention, flash_attention_tiled

IMPLEMENTATIONS = {"triton": flash_attention, "tiled": flash_attention_tiled}
# 3-D (batch, seq, d) as the assignment passes them, and 4-D (batch, heads, seq, d).
SHAPES = [(4, 17, 16), (2, 3, 17, 16), (2, 16, 16)]


def _inputs(q_shape, dtype=torch.float32):
    q, k, v = (torch.randn(q_shape, dtype=dtype, requires_grad=True) for _ in range(3))
    return q, k, v


@pytest.mark.parametrize("name", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("q_shape", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
def test_saved_tensors_hold_one_logsumexp_as_cs336_reads_them(name, q_shape, causal):
    q, k, v = _inputs(q_shape)
    o = IMPLEMENTATIONS[name](q, k, v, causal=causal)
    saved = o.grad_fn.saved_tensors
    assert all(isinstance(t, torch.Tensor) for t in saved), [type(t).__name__ for t in saved]
    # The assignment's own filter, on (batch, n_queries) for 3-D inputs; (..., n_queries) in general.
    found = [t for t in saved if t.shape == q.shape[:-1]]
    assert len(found) == 1 and found[0].dtype == torch.float32
    lse = found[0]
    want = attention_reference(q, k, v, torch.ones_like(q), causal)  # the gradients of o.sum()
    torch.testing.assert_close(lse.double(), want.lse, atol=1e-4, rtol=1e-4)
    # Reading them changes nothing: backward still gives the reference gradients.
    o.sum().backward()
    for got, want_grad in zip((q.grad, k.grad, v.grad), (want.dq, want.dk, want.dv)):
        torch.testing.assert_close(got, want_grad.to(got.dtype), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", list(IMPLEMENTATIONS))
def test_document_ids_add_their_table_and_still_only_tensors(name):
    q, k, v = _inputs((2, 2, 20, 16))
    ids = torch.tensor([[0] * 7 + [1] * 13, [0] * 20])
    o = IMPLEMENTATIONS[name](q, k, v, document_ids=ids)
    saved = o.grad_fn.saved_tensors
    assert all(isinstance(t, torch.Tensor) for t in saved)
    assert [t for t in saved if t.shape == q.shape[:-1] and t.dtype == torch.float32] == [saved[-1]]
    o.sum().backward()
    assert torch.isfinite(q.grad).all()

