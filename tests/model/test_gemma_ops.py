"""The ops Gemma adds, on the reference and torch backends, against written-out float64 math and transformers' modules.

rmsnorm with ``offset`` (Gemma's 1 + w), geglu (gelu_tanh(a) * b), attention
``softcap`` (with windows, documents and GQA; the FlexAttention path too, run
unfused on the CPU) and the loss's final ``softcap`` (the chunked twin
included, outputs and gradients, across chunk edges).
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_close

from scratchlm.kernels import linear_cross_entropy_chunked
from scratchlm.model import get_op
from scratchlm.model.backends import _flex_attention, _flex_document_attention

BACKENDS = ["reference", "torch"]
ALL_BACKENDS = [*BACKENDS, "triton"]  # the Triton kernels under the interpreter here


def randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_offset_equals_transformers_gemma_norm(backend, dtype):
    transformers = pytest.importorskip("transformers", reason="transformers' Gemma norm is the reference")
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm

    x, weight = randn(3, 5, 40, dtype=dtype), randn(40, seed=1, dtype=dtype) * 0.5
    theirs = Gemma2RMSNorm(40, eps=1e-6).to(dtype)
    with torch.no_grad():
        theirs.weight.copy_(weight)
    ours = get_op("rmsnorm", backend)(x, weight, 1e-6, offset=1.0)
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    assert_close(ours, theirs(x), atol=tolerance, rtol=tolerance, name=f"{backend} offset rmsnorm")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_rmsnorm_offset_gradients(backend):
    dtype = torch.float32 if backend == "triton" else torch.float64  # the kernels take 32 bits at most
    tolerance = 1e-5 if backend == "triton" else 1e-12
    x = randn(4, 33, dtype=dtype).requires_grad_()
    weight = (randn(33, seed=1, dtype=dtype) * 0.3).requires_grad_()
    out = get_op("rmsnorm", backend)(x, weight, 1e-5, offset=1.0)
    x2, w2 = x.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    expected = x2 / torch.sqrt(x2.pow(2).mean(-1, keepdim=True) + 1e-5) * (1 + w2)
    grad = randn(4, 33, seed=2)
    assert_close(out, expected, atol=tolerance, rtol=tolerance, name="out")
    dx, dw = torch.autograd.grad(out, (x, weight), grad.to(dtype))
    ex, ew = torch.autograd.grad(expected, (x2, w2), grad)
    assert_close(dx, ex, atol=tolerance, rtol=tolerance, name="dx")
    assert_close(dw, ew, atol=tolerance, rtol=tolerance, name="dweight")


@pytest.mark.parametrize("backend", BACKENDS)
def test_geglu_is_the_tanh_gelu_gate(backend):
    a, b = (randn(7, 31) * 3).requires_grad_(), randn(7, 31, seed=1).requires_grad_()
    out = get_op("geglu", backend)(a, b)
    expected = 0.5 * a * (1 + torch.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a**3))) * b
    assert_close(out, expected, atol=1e-12, rtol=1e-12, name=f"{backend} geglu")
    assert_close(out, torch.nn.functional.gelu(a, approximate="tanh") * b, atol=1e-12, rtol=1e-12, name="F.gelu")
    grads = torch.autograd.grad(out.sum(), (a, b))
    expected_grads = torch.autograd.grad(expected.sum(), (a, b))
    for got, want, name in zip(grads, expected_grads, ("da", "db")):
        assert_close(got, want, atol=1e-12, rtol=1e-12, name=name)


def looped_attention(q, k, v, *, scale, window, softcap, documents=None):
    """One query at a time: its visible keys, capped scores, softmax; the obviously right thing."""
    heads, kv_heads, nq, nk = q.shape[-3], k.shape[-3], q.shape[-2], k.shape[-2]
    out = torch.zeros_like(q)
    for batch in range(q.shape[0]):
        for head in range(heads):
            kv = head // (heads // kv_heads)
            for i in range(nq):
                position = nk - nq + i
                keys = [j for j in range(nk) if j <= position and (window is None or j > position - window)]
                if documents is not None:
                    keys = [j for j in keys if documents[batch, j] == documents[batch, position]]
                scores = (k[batch, kv, keys] @ q[batch, head, i]) * scale
                if softcap is not None:
                    scores = softcap * torch.tanh(scores / softcap)
                out[batch, head, i] = torch.softmax(scores, -1) @ v[batch, kv, keys]
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("with_documents", [False, True])
@pytest.mark.parametrize("q_len", [9, 4])  # 4: the last queries of 9 keys, as under a KV cache
def test_softcapped_attention_against_a_loop(backend, window, with_documents, q_len):
    q, k, v = randn(2, 4, q_len, 8) * 3, randn(2, 2, 9, 8, seed=1) * 3, randn(2, 2, 9, 8, seed=2)
    documents = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2], [0, 0, 0, 0, 0, 1, 1, 1, 1]])
    ids = documents if with_documents else None
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = get_op("attention", backend)(q, k, v, ids, scale=0.3, window=window, softcap=2.0)
    expected = looped_attention(q, k, v, scale=0.3, window=window, softcap=2.0, documents=ids)
    assert_close(out, expected, atol=1e-10, rtol=1e-10, name=f"{backend} softcapped attention")
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    expected_grads = torch.autograd.grad(expected.sum(), (q, k, v))
    for got, want, name in zip(grads, expected_grads, ("dq", "dk", "dv")):
        assert_close(got, want, atol=1e-10, rtol=1e-10, name=name)


@pytest.mark.skipif(_flex_attention() is None, reason="this PyTorch has no FlexAttention")
@pytest.mark.filterwarnings("ignore:.*flex_attention.*")
@pytest.mark.parametrize("window, softcap", [(3, None), (None, 2.0), (4, 2.0)])
def test_flex_attention_path_with_window_and_softcap(window, softcap):
    """The CUDA path of the torch backend, run through FlexAttention's unfused reference on the CPU."""
    q, k, v = randn(2, 4, 16, 16, dtype=torch.float32), randn(2, 2, 16, 16, seed=1, dtype=torch.float32), randn(
        2, 2, 16, 16, seed=2, dtype=torch.float32
    )
    documents = (torch.arange(16) >= 6).long().expand(2, 16)
    for ids in (None, documents):
        out = _flex_document_attention(q, k, v, ids, compiled=False, scale=0.3, window=window, softcap=softcap)
        expected = looped_attention(q, k, v, scale=0.3, window=window, softcap=softcap, documents=ids)
        assert_close(out, expected, atol=1e-5, rtol=1e-5, name=f"flex window={window} softcap={softcap}")


@pytest.mark.parametrize(
    "backend, reduction",
    [("reference", "mean"), ("torch", "mean"), ("torch", "none"), ("triton", "mean"), ("triton", "none")],
)
def test_softcapped_loss_against_the_full_logits(backend, reduction):
    # The Triton kernel takes 32 bits at most; vocabulary 50 and d 40 cross its 32-wide and 16-deep tiles.
    dtype = torch.float32 if backend == "triton" else torch.float64
    tolerance = 2e-5 if backend == "triton" else 1e-10
    hidden = randn(3, 7, 40, dtype=dtype).requires_grad_()
    weight = (randn(50, 40, seed=1, dtype=dtype) * 0.7).requires_grad_()
    targets = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(3))
    targets[0, :3] = -100
    logits = hidden.double() @ weight.double().T
    capped = 5.0 * torch.tanh(logits / 5.0)
    losses = torch.nn.functional.cross_entropy(capped.flatten(0, 1), targets.flatten(), reduction="none").view(3, 7)
    if backend == "reference":
        out = get_op("linear_cross_entropy", "reference")(hidden, weight, targets, -100, softcap=5.0)
    elif backend == "torch":  # the chunked twin; chunks of 4 rows cross its chunk edges
        out = linear_cross_entropy_chunked(hidden, weight, targets, reduction=reduction, chunk_rows=4, softcap=5.0)
    else:
        from scratchlm.kernels import linear_cross_entropy

        out = linear_cross_entropy(hidden, weight, targets, reduction=reduction, softcap=5.0)
    expected = losses.sum() / (targets != -100).sum() if reduction == "mean" else losses
    assert_close(out, expected, atol=tolerance, rtol=tolerance, name=f"{backend} capped loss")
    grad = randn(*out.shape, seed=4) if out.dim() else torch.tensor(1.7, dtype=torch.float64)
    got = torch.autograd.grad(out, (hidden, weight), grad.to(out.dtype))
    want = torch.autograd.grad(expected, (hidden, weight), grad)
    for a, b, name in zip(got, want, ("dhidden", "dweight")):
        assert_close(a, b, atol=tolerance, rtol=tolerance, name=name)


@pytest.mark.parametrize("softcap", [0.0, -1.0, float("nan"), float("inf"), True, "5"])
def test_loss_softcap_bad_values_are_refused_by_name(softcap):
    hidden, weight, targets = randn(2, 4), randn(5, 4), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="softcap="):
        linear_cross_entropy_chunked(hidden, weight, targets, softcap=softcap)


@pytest.mark.parametrize("offset", [float("nan"), float("inf"), True, "1"])
def test_rmsnorm_kernel_refuses_a_bad_offset_by_name(offset):
    from scratchlm.kernels import rmsnorm

    with pytest.raises(ValueError, match="offset is"):
        rmsnorm(torch.ones(2, 4), torch.ones(4), 1e-5, offset=offset)
