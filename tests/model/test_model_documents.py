"""Document-masked attention: every backend's ``attention(q, k, v, document_ids=...)`` and the model.

The check that matters most: a row packing several documents gives each
document exactly what it gets when run alone, in float64. RoPE only sees the
distance between positions, so a document at offset 7 attends like at 0.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import assert_close

from scratchlm.model import ModelConfig, TransformerLM, document_ids_from_eos, get_op
from scratchlm.model.backends import _flex_document_attention, _torch_attention
from scratchlm.model.functional import causal_attention

TINY = dict(vocab_size=61, context_length=24, d_model=32, num_layers=2, num_heads=4, d_ff=48)
# Documents of lengths 5, 1, 8 and 4 packed into one row of 18.
LENGTHS = (5, 1, 8, 4)


def packed_ids(lengths=LENGTHS) -> torch.Tensor:
    return torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])


def qkv(batch=2, heads=4, kv_heads=4, q_len=18, k_len=18, d=8, dtype=torch.float64, requires_grad=False):
    q = torch.randn(batch, heads, q_len, d, dtype=dtype, requires_grad=requires_grad)
    k = torch.randn(batch, kv_heads, k_len, d, dtype=dtype, requires_grad=requires_grad)
    v = torch.randn(batch, kv_heads, k_len, d, dtype=dtype, requires_grad=requires_grad)
    return q, k, v


def attention_per_document(q, k, v, lengths) -> torch.Tensor:
    """Each document's slice run through plain causal attention on its own, concatenated back."""
    outs, start = [], 0
    for n in lengths:
        part = slice(start, start + n)
        outs.append(causal_attention(q[..., part, :], k[..., part, :], v[..., part, :]))
        start += n
    return torch.cat(outs, dim=-2)


# ---------------------------------------------------------------- the attention op


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_reference_with_ids_equals_each_document_alone(kv_heads):
    q, k, v = qkv(kv_heads=kv_heads)
    ids = packed_ids().expand(2, -1)
    expected = attention_per_document(q, k, v, LENGTHS)
    assert_close(causal_attention(q, k, v, ids), expected, atol=1e-12, rtol=1e-12, name="packed attention")


def test_reference_rows_have_their_own_documents_and_ids_may_carry_a_heads_dim():
    q, k, v = qkv(batch=2)
    ids = torch.stack((packed_ids(), packed_ids((9, 9))))  # (2, 18): row 1 has two documents
    out = causal_attention(q, k, v, ids)
    assert_close(out[0], attention_per_document(q[0], k[0], v[0], LENGTHS), atol=1e-12, rtol=1e-12, name="row 0")
    assert_close(out[1], attention_per_document(q[1], k[1], v[1], (9, 9)), atol=1e-12, rtol=1e-12, name="row 1")
    assert torch.equal(causal_attention(q, k, v, ids.unsqueeze(1)), out)  # (batch, 1, k_seq)


def test_one_document_per_row_is_plain_causal_attention():
    q, k, v = qkv(kv_heads=2)
    ids = torch.full((2, 18), 7, dtype=torch.int32)
    expected = causal_attention(q, k, v)
    assert_close(causal_attention(q, k, v, ids), expected, atol=1e-12, rtol=1e-12, name="reference")
    assert_close(_torch_attention(q, k, v, ids), expected, atol=1e-12, rtol=1e-12, name="torch")


def test_every_token_its_own_document_attends_only_to_itself():
    q, k, v = qkv(kv_heads=2)
    out = causal_attention(q, k, v, torch.arange(18).expand(2, -1))
    expected = v.repeat_interleave(2, dim=1)  # query head h reads value head h // 2
    assert_close(out, expected, atol=1e-12, rtol=1e-12, name="self-only attention")
    assert_close(_torch_attention(q, k, v, torch.arange(18)), expected, atol=1e-12, rtol=1e-12, name="torch")


def test_decreasing_ids_start_a_new_document():
    # (0, 0, 1, 1, 0, 0) is three documents, the same as (0, 0, 1, 1, 2, 2).
    q, k, v = qkv(q_len=6, k_len=6)
    down = torch.tensor([0, 0, 1, 1, 0, 0])
    up = torch.tensor([0, 0, 1, 1, 2, 2])
    expected = attention_per_document(q, k, v, (2, 2, 2))
    for attention in (causal_attention, _torch_attention):
        assert_close(attention(q, k, v, down), expected, atol=1e-12, rtol=1e-12, name=attention.__name__)
        assert_close(attention(q, k, v, up), expected, atol=1e-12, rtol=1e-12, name=attention.__name__)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_torch_backend_cpu_path_equals_reference_outputs_and_gradients(kv_heads):
    q, k, v = qkv(kv_heads=kv_heads, requires_grad=True)
    ids = torch.stack((packed_ids(), packed_ids((3, 15))))
    grad_out = torch.randn(2, 4, 18, 8, dtype=torch.float64)
    torch_op = get_op("attention", "torch")
    results = []
    for attention in (causal_attention, torch_op):
        out = attention(q, k, v, document_ids=ids)
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
        results.append((out, *grads))
    for name, ours, theirs in zip(("out", "dq", "dk", "dv"), results[1], results[0]):
        assert_close(ours, theirs, atol=1e-12, rtol=1e-10, name=name)


@pytest.mark.parametrize("attention", [causal_attention, _torch_attention], ids=["reference", "torch"])
def test_queries_after_a_cache_see_the_cached_keys_of_their_document(attention):
    # The queries are the last 4 of 18 key positions; ids cover all 18.
    q, k, v = qkv(kv_heads=2)
    ids = packed_ids()
    full = causal_attention(q, k, v, ids)
    assert_close(attention(q[..., -4:, :], k, v, ids), full[..., -4:, :], atol=1e-12, rtol=1e-12, name="last 4")


def test_flex_attention_mask_equals_reference_unfused_on_cpu():
    # The CUDA path's mask_mod, checked through flex_attention's unfused reference (no compile).
    q, k, v = qkv(kv_heads=2, d=16)
    ids = torch.stack((torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 0, 0, 0, 5, 5, 5, 5, 5]), packed_ids()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()"
        out = _flex_document_attention(q, k, v, ids, compiled=False)
        last = _flex_document_attention(q[..., -5:, :], k, v, ids, compiled=False)
    expected = causal_attention(q, k, v, ids)
    assert_close(out, expected, atol=1e-12, rtol=1e-12, name="flex")
    assert_close(last, expected[..., -5:, :], atol=1e-12, rtol=1e-12, name="flex after a cache")


@pytest.mark.parametrize("attention", [causal_attention, _torch_attention], ids=["reference", "torch"])
def test_bad_document_ids_are_clear_errors(attention):
    q, k, v = qkv(dtype=torch.float32)
    with pytest.raises(TypeError, match="document_ids has dtype torch.float32; expected an integer dtype"):
        attention(q, k, v, torch.zeros(2, 18))
    with pytest.raises(TypeError, match="document_ids must be a torch.Tensor"):
        attention(q, k, v, [0] * 18)
    with pytest.raises(ValueError, match=r"document_ids has shape \(2, 17\).*\(2, 18\)"):
        attention(q, k, v, torch.zeros(2, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="document_ids is on meta but q is on cpu"):
        attention(q, k, v, torch.zeros(2, 18, dtype=torch.long, device="meta"))


# ---------------------------------------------------------------- ids from end-of-text tokens


def test_document_ids_from_eos():
    eos = 3
    tokens = torch.tensor([[5, 3, 7, 7, 3, 3, 1], [3, 1, 1, 1, 1, 1, 3], [1, 1, 1, 1, 1, 1, 1]])
    expected = [[0, 0, 1, 1, 1, 2, 3], [0, 1, 1, 1, 1, 1, 1], [0] * 7]
    ids = document_ids_from_eos(tokens, eos)
    assert ids.dtype == torch.int32 and ids.tolist() == expected
    assert document_ids_from_eos(tokens[0], eos).tolist() == expected[0]  # any leading dims, (seq,) too
    assert document_ids_from_eos(tokens.to(torch.int32), eos).tolist() == expected
    with pytest.raises(ValueError, match="token_ids must be an integer tensor"):
        document_ids_from_eos(tokens.float(), eos)
    with pytest.raises(ValueError, match="eos_token_id must be an int"):
        document_ids_from_eos(tokens, 3.0)


# ---------------------------------------------------------------- the model


def float64_model(kernels="reference", **overrides) -> TransformerLM:
    return TransformerLM(ModelConfig(**TINY, **overrides), kernels=kernels, device="cpu", dtype=torch.float64)


@pytest.mark.parametrize("num_kv_heads", [None, 2])
def test_packed_row_logits_equal_each_document_run_alone(num_kv_heads):
    model = float64_model(num_kv_heads=num_kv_heads)
    eos = 0
    docs = [torch.tensor(doc) for doc in ([4, 9, 17, 0], [0], [22, 8, 8, 30, 41, 2, 0], [5, 6, 7])]
    row = torch.cat(docs).unsqueeze(0)  # (1, 15): documents at offsets 0, 4, 5 and 12
    ids = document_ids_from_eos(row, eos)
    assert ids.tolist() == [[0, 0, 0, 0, 1, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3]]
    with torch.no_grad():
        packed = model(row, document_ids=ids)[0]
        alone = torch.cat([model(doc.unsqueeze(0))[0] for doc in docs])
        unmasked = model(row)[0]
    assert_close(packed, alone, atol=1e-10, rtol=1e-10, name="packed logits")
    assert not torch.allclose(unmasked[4:], alone[4:])  # without ids, later documents see earlier ones


def test_model_loss_with_ids_on_torch_backend_equals_reference_with_gradients():
    reference = float64_model()
    fast = float64_model("torch")
    fast.load_state_dict(reference.state_dict())
    tokens = torch.randint(1, TINY["vocab_size"], (3, 17))
    tokens[:, [3, 4, 11]] = 0
    tokens[1, 9] = 0
    ids = document_ids_from_eos(tokens, 0)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    losses = []
    for model in (reference, fast):
        loss = model.loss(inputs, targets, document_ids=ids[:, :-1])
        loss.backward()
        losses.append(loss)
    assert_close(losses[1], losses[0], atol=1e-12, rtol=1e-12, name="loss")
    for (name, p), q in zip(reference.named_parameters(), fast.parameters()):
        assert_close(q.grad, p.grad, atol=1e-12, rtol=1e-9, name=name)
    # Activation checkpointing recomputes the blocks with the same ids.
    reference.zero_grad()
    reference.activation_checkpointing = True
    again = reference.loss(inputs, targets, document_ids=ids[:, :-1])
    assert_close(again, losses[0], atol=0, rtol=0, name="checkpointed loss")


def test_model_with_a_kv_cache_takes_ids_for_every_key():
    model = float64_model()
    tokens = torch.randint(1, TINY["vocab_size"], (2, 12))
    tokens[:, 5] = 0
    ids = document_ids_from_eos(tokens, 0)
    with torch.no_grad():
        full = model(tokens, document_ids=ids)
        cache = model.new_kv_cache()
        first = model(tokens[:, :7], cache, document_ids=ids[:, :7])
        rest = model(tokens[:, 7:], cache, document_ids=ids)  # 7 cached + 5 new keys
    assert_close(torch.cat((first, rest), dim=1), full, atol=1e-10, rtol=1e-10, name="cached logits")
    with pytest.raises(ValueError, match=r"document_ids has shape \(2, 5\); expected \(2, 12\) \(7 cached \+ 5 new"):
        model(tokens[:, 7:], cache_of(model, tokens[:, :7]), document_ids=ids[:, 7:])


def cache_of(model: TransformerLM, tokens: torch.Tensor):
    cache = model.new_kv_cache()
    with torch.no_grad():
        model(tokens, cache)
    return cache


def test_model_refuses_ids_of_the_wrong_shape_or_type():
    model = float64_model()
    tokens = torch.randint(0, TINY["vocab_size"], (2, 6))
    with pytest.raises(ValueError, match=r"document_ids has shape \(2, 5\); expected \(2, 6\)"):
        model(tokens, document_ids=torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="document_ids must be a torch.Tensor"):
        model(tokens, document_ids=[0] * 6)
    with pytest.raises(TypeError, match="expected an integer dtype"):
        model(tokens, document_ids=torch.zeros(2, 6))
    # Leading dims may broadcast: one row of ids for the whole batch.
    with torch.no_grad():
        assert torch.equal(model(tokens, document_ids=torch.zeros(6, dtype=torch.long)), model(tokens))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("num_kv_heads", [None, 2])
def test_cuda_torch_backend_flex_attention_matches_reference(num_kv_heads, monkeypatch):
    # head_dim 16 takes the FlexAttention path (compiled) on CUDA.
    from scratchlm.model import backends

    calls = []
    flex = backends._flex_document_attention
    monkeypatch.setattr(backends, "_flex_document_attention", lambda *args, **kw: calls.append(1) or flex(*args, **kw))
    config = ModelConfig(**dict(TINY, d_model=64, context_length=160), num_kv_heads=num_kv_heads)
    reference = TransformerLM(config, kernels="reference", device="cpu")
    model = TransformerLM(config, kernels="torch", device="cuda")
    model.load_state_dict(reference.state_dict())
    tokens = torch.randint(1, TINY["vocab_size"], (3, 150))
    tokens[:, [10, 70, 71, 149]] = 0
    tokens[2, 100] = 0
    ids = document_ids_from_eos(tokens, 0)
    expected = reference(tokens, document_ids=ids)
    got = model(tokens.cuda(), document_ids=ids.cuda())
    assert_close(got.cpu(), expected, atol=2e-4, rtol=2e-4, name="flex logits")
    assert len(calls) == config.num_layers
    reference.loss(tokens[:, :-1], tokens[:, 1:], document_ids=ids[:, :-1]).backward()
    model.loss(tokens[:, :-1].cuda(), tokens[:, 1:].cuda(), document_ids=ids[:, :-1].cuda()).backward()
    for (name, p), q in zip(reference.named_parameters(), model.parameters()):
        assert_close(q.grad.cpu(), p.grad, atol=1e-4, rtol=1e-3, name=name)
