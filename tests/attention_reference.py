"""What every attention test compares against, and how it runs an implementation.

``attention_reference`` is softmax attention written from the formula, in
float64 by default, with the kernels' masks: causal (bottom-right aligned),
grouped-query heads and packed documents. ``torch_attention_same_dtype`` is
PyTorch's own SDPA in the inputs' dtype, the yardstick of the three-way rule
for 16-bit results. Results come as ``AttentionResults`` (o, lse, dq, dk, dv).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from helpers import assert_close, assert_within_torch_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The names of the output and its gradients, in AttentionResults.without_lse() order.
NAMES = ("o", "dq", "dk", "dv")


class AttentionResults(NamedTuple):
    """The output, the logsumexp of each query row, and the gradients of q, k and v."""

    o: torch.Tensor
    lse: torch.Tensor
    dq: torch.Tensor
    dk: torch.Tensor
    dv: torch.Tensor

    def without_lse(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(o, dq, dk, dv): what the three-way rule and PyTorch's SDPA speak of."""
        return self.o, self.dq, self.dk, self.dv


def attention_inputs(q_shape, k_len, dtype, kv_heads=None, device=DEVICE):
    """Random (q, k, v, do); k and v have ``k_len`` positions and, if given, ``kv_heads`` heads at dim -3."""
    heads = () if kv_heads is None else (kv_heads,)
    leading = q_shape[:-2] if kv_heads is None else q_shape[:-3]
    k_shape = (*leading, *heads, k_len, q_shape[-1])
    # q scaled up so that softmax rows are peaked and the running max moves.
    q = torch.randn(q_shape, device=device, dtype=torch.float32).mul(2).to(dtype)
    k = torch.randn(k_shape, device=device, dtype=dtype)
    v = torch.randn(k_shape, device=device, dtype=dtype)
    do = torch.randn(q_shape, device=device, dtype=dtype)
    return q, k, v, do


def causal_mask(q_len, k_len, device=DEVICE):
    """(Nq, Nk), True where query i may attend key j: j <= i + (Nk - Nq), aligned bottom-right."""
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)


def same_document_mask(document_ids, q_len):
    """(..., 1, Nq, Nk) from ids (..., Nk): True where query and key lie in the same run of equal ids.

    The queries are the last Nq positions; the mask broadcasts over the heads.
    """
    starts = torch.ones_like(document_ids, dtype=torch.long)
    starts[..., 1:] = (document_ids[..., 1:] != document_ids[..., :-1]).long()
    run = starts.cumsum(-1)  # one number per run of equal consecutive ids
    query_run = run[..., run.shape[-1] - q_len :]
    return (query_run[..., :, None] == run[..., None, :]).unsqueeze(-3)


def attention_mask(q_len, k_len, causal, document_ids=None, device=DEVICE, window=None):
    """The keys each query may see, (Nq, Nk) or (..., 1, Nq, Nk); None when it sees every key.

    ``window`` W (with causal): query i sees keys j with i + Nk - Nq - W < j, its last W positions.
    """
    mask = causal_mask(q_len, k_len, device) if causal else None
    if window is not None:
        mask = mask & ~causal_mask(q_len, k_len, device).tril(k_len - q_len - window)
    if document_ids is not None:
        documents = same_document_mask(document_ids.to(device), q_len)
        mask = documents if mask is None else documents & mask
    return mask


def _repeat_kv_heads(q, t):
    """t with each K/V head repeated for the query heads of its group: query head h uses K/V head h // G."""
    if q.dim() < 3 or t.shape[-3] == q.shape[-3]:
        return t
    return t.repeat_interleave(q.shape[-3] // t.shape[-3], dim=-3)


def attention_reference(
    q, k, v, do, causal=True, scale=None, document_ids=None, dtype=torch.float64, window=None, softcap=None
):
    """softmax(scale q k^T + mask) v and its gradients for output gradient ``do``, by autograd in ``dtype``.

    A query that sees no key outputs 0 with logsumexp -inf: its scores are
    replaced by zeros before the softmax and its weights by zeros after, so
    no NaN reaches the gradients either. dk and dv of a shared K/V head sum
    over its group, through autograd of the repeat.
    """
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ _repeat_kv_heads(q, k).transpose(-2, -1)) * scale  # (..., Nq, Nk)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    mask = attention_mask(q.shape[-2], k.shape[-2], causal, document_ids, q.device, window)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    sees_a_key = torch.isfinite(scores).any(dim=-1, keepdim=True)
    scores = torch.where(sees_a_key, scores, 0.0)
    lse = torch.logsumexp(scores, dim=-1).masked_fill(~sees_a_key.squeeze(-1), float("-inf"))
    o = (torch.softmax(scores, dim=-1) * sees_a_key) @ _repeat_kv_heads(q, v)
    o.backward(do.to(dtype))
    return AttentionResults(o.detach(), lse.detach(), q.grad, k.grad, v.grad)


def torch_attention_same_dtype(q, k, v, do, causal=True, document_ids=None, window=None, softcap=None):
    """PyTorch's own scaled_dot_product_attention in the inputs' dtype: (o, dq, dk, dv).

    K/V with fewer heads than q go through SDPA's grouped-query support.
    Some backends give NaN where a row sees no key; the kernels' answer there is 0.
    SDPA cannot soft-cap: with ``softcap`` the written-out formula runs in the inputs' dtype instead.
    """
    if softcap is not None:
        return attention_reference(q, k, v, do, causal, None, document_ids, q.dtype, window, softcap).without_lse()
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    q_len, k_len = q.shape[-2], k.shape[-2]
    gqa = {"enable_gqa": True} if q.dim() >= 3 and k.shape[-3] != q.shape[-3] else {}
    if document_ids is None and window is None and (not causal or q_len == k_len):
        o = F.scaled_dot_product_attention(q, k, v, is_causal=causal, **gqa)
    else:
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attention_mask(q_len, k_len, causal, document_ids, q.device, window), **gqa
        )
    o.backward(do)
    return tuple(t.detach().nan_to_num(0.0) for t in (o, q.grad, k.grad, v.grad))


def run_attention(attention_with_lse: Callable, q, k, v, do, **options) -> AttentionResults:
    """An implementation's (o, lse, dq, dk, dv) on fresh leaf copies of q, k, v, backward from ``do``."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o, lse = attention_with_lse(q, k, v, **options)
    o.backward(do)
    return AttentionResults(o.detach(), lse, q.grad, k.grad, v.grad)


def assert_attention_close(got, want, *, atol, rtol, grad_atol=None, grad_rtol=None, label=""):
    """o and lse within (atol, rtol) of ``want``; dq, dk, dv within (grad_atol, grad_rtol), by default the same."""
    grad_atol = atol if grad_atol is None else grad_atol
    grad_rtol = rtol if grad_rtol is None else grad_rtol
    assert_close(got[0], want[0], atol=atol, rtol=rtol, name=f"o{label}")
    assert_close(got[1], want[1], atol=atol, rtol=rtol, name=f"logsumexp{label}")
    for g, w, name in zip(got[2:], want[2:], NAMES[1:]):
        assert_close(g, w, atol=grad_atol, rtol=grad_rtol, name=f"{name}{label}")


def assert_each_within_torch_error(got, torch_same_dtype, want, label=""):
    """The three-way rule on each of o, dq, dk, dv, all three given in that order."""
    for g, t, w, name in zip(got, torch_same_dtype, want, NAMES):
        assert_within_torch_error(g, t, w, name=f"{name}{label}")


def assert_kernel_matches_reference(got, q, k, v, do, causal, float32_tolerance):
    """The Triton kernels' results ``got`` for (q, k, v, do): no NaN; in float32 close to the float64
    reference by ``float32_tolerance`` (assert_attention_close's arguments); in 16 bits the logsumexp
    still within 1e-5 and o, dq, dk, dv by the three-way rule against SDPA in their dtype."""
    want = attention_reference(q, k, v, do, causal)
    assert not any(t.isnan().any() for t in got)
    dtype = got.o.dtype
    if dtype == torch.float32:
        assert_attention_close(got, want, **float32_tolerance)
    else:
        # logsumexp is float32 math on the same (rounded) inputs, so it stays tight.
        assert_close(got.lse, want.lse, atol=1e-5, rtol=1e-5, name=f"logsumexp {dtype}")
        same = torch_attention_same_dtype(q, k, v, do, causal)
        assert_each_within_torch_error(got.without_lse(), same, want.without_lse(), f" {dtype}")


def assert_compiled_matches_eager(attention_with_lse: Callable, q, k, v, *inputs):
    """``2 * attention(q, k, v, *inputs).sum()`` traced whole by torch.compile matches eager, and so do its
    gradients; returns the compiled run's (dq, dk, dv). ``inputs`` are passed as traced graph inputs."""
    backend = "inductor" if torch.cuda.is_available() else "aot_eager"

    def doubled_sum(q, k, v, *inputs):
        return (attention_with_lse(q, k, v, *inputs)[0] * 2).sum()

    compiled = torch.compile(doubled_sum, fullgraph=True, backend=backend)
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = compiled(q, k, v, *inputs)
    out.backward()
    eager = run_attention(lambda q, k, v: attention_with_lse(q, k, v, *inputs), q, k, v, torch.full_like(q, 2.0))
    assert_close(out, eager.o.sum() * 2, atol=1e-4, rtol=1e-6, name="output under compile")
    for got, want, name in zip((q.grad, k.grad, v.grad), eager[2:], NAMES[1:]):
        assert_close(got, want, atol=1e-6, rtol=1e-6, name=f"{name} under compile")
    return q.grad, k.grad, v.grad
