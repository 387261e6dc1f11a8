"""The Llama-family fields of ModelConfig: grouped-query attention, tied embeddings, norm_eps, Llama 3.1 RoPE."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from helpers import assert_close
from reference_model import reference_forward, rope_frequency

from scratchlm.model import ModelConfig, TransformerLM, get_op
from scratchlm.model.layers import rope_frequencies

BASE = dict(vocab_size=97, context_length=40, d_model=64, num_layers=2, num_heads=4, d_ff=80)
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Small, so that the tiny head's 8 frequencies fall in all three bands.
    "original_max_position_embeddings": 64,
}
VARIANTS = {
    "gqa": dict(num_kv_heads=2),
    "mqa": dict(num_kv_heads=1),
    "tied": dict(tie_embeddings=True),
    "norm_eps": dict(norm_eps=1e-2),
    "llama3_rope": dict(rope_scaling=LLAMA3_SCALING, rope_theta=500000.0),
    "all": dict(num_kv_heads=2, tie_embeddings=True, norm_eps=1e-6, rope_scaling=LLAMA3_SCALING),
}


def build(kernels="reference", dtype=None, **fields) -> TransformerLM:
    model = TransformerLM(ModelConfig(**{**BASE, **fields}), kernels=kernels, device="cpu", dtype=dtype)
    with torch.no_grad():  # norm gains start at 1, which would hide a missing multiply
        for name, param in model.named_parameters():
            if "ln" in name:
                param.copy_(1 + 0.5 * torch.randn_like(param))
    return model


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kernels", ["reference", "torch"])
def test_forward_matches_float64_reference(variant, kernels):
    model = build(kernels, dtype=torch.float64, **VARIANTS[variant])
    token_ids = torch.randint(0, BASE["vocab_size"], (2, 33))
    expected = reference_forward(model.state_dict(), model.config, token_ids)
    assert_close(model(token_ids), expected, atol=1e-10, rtol=1e-10, name=f"logits {variant}/{kernels}")


@pytest.mark.parametrize("variant", ["gqa", "mqa", "all"])
def test_triton_backend_matches_reference_with_gradients(variant):
    reference = build("reference", **VARIANTS[variant])
    fused = build("triton", **VARIANTS[variant])
    fused.load_state_dict(reference.state_dict())
    token_ids = torch.randint(0, BASE["vocab_size"], (2, 19))
    for model in (reference, fused):
        model(token_ids).square().mean().backward()
    assert_close(fused(token_ids), reference(token_ids), atol=1e-5, rtol=1e-5, name="logits")
    for (name, p_ref), (_, p_fused) in zip(reference.named_parameters(), fused.named_parameters()):
        assert_close(p_fused.grad, p_ref.grad, atol=1e-6, rtol=1e-4, name=f"grad {name}")


@pytest.mark.parametrize("kernels", ["reference", "torch", "triton"])
def test_gqa_kv_cache_holds_kv_heads_only_and_matches_full_forward(kernels):
    model = build(kernels, **VARIANTS["gqa"])
    token_ids = torch.randint(0, BASE["vocab_size"], (2, 13))
    cache = model.new_kv_cache()
    pieces = [model(token_ids[:, :6], kv_cache=cache)]
    pieces += [model(token_ids[:, i : i + 1], kv_cache=cache) for i in range(6, 13)]
    head_dim = BASE["d_model"] // BASE["num_heads"]
    assert all(layer.keys.shape == (2, 2, 13, head_dim) for layer in cache.layers)
    assert all(layer.values.shape == (2, 2, 13, head_dim) for layer in cache.layers)
    assert_close(torch.cat(pieces, dim=1), model(token_ids), atol=1e-5, rtol=1e-5, name="cached logits")


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_attention_op_groups_heads_like_repeated_keys(backend, kv_heads):
    attention = get_op("attention", backend)
    q = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    k = torch.randn(2, kv_heads, 12, 8, dtype=torch.float64)
    v = torch.randn(2, kv_heads, 12, 8, dtype=torch.float64)
    group = 4 // kv_heads
    expected = get_op("attention", "reference")(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1))
    assert_close(attention(q, k, v), expected, atol=1e-12, rtol=1e-12, name=f"{backend} kv_heads={kv_heads}")


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_attention_op_refuses_head_counts_that_do_not_group(backend):
    attention = get_op("attention", backend)
    with pytest.raises(ValueError, match="head count"):
        attention(torch.randn(1, 4, 5, 8), torch.randn(1, 3, 5, 8), torch.randn(1, 3, 5, 8))


def test_gqa_projections_are_narrower():
    model = build(**VARIANTS["gqa"])
    attn = model.layers[0].attn
    assert attn.q_proj.weight.shape == (64, 64)
    assert attn.k_proj.weight.shape == attn.v_proj.weight.shape == (32, 64)
    assert attn.output_proj.weight.shape == (64, 64)


def test_flops_per_token_counts_the_smaller_kv_projections():
    full, grouped = build(), build(**VARIANTS["mqa"])
    head_dim = BASE["d_model"] // BASE["num_heads"]
    saved_weights = BASE["num_layers"] * 2 * (BASE["num_heads"] - 1) * head_dim * BASE["d_model"]
    assert full.flops_per_token() - grouped.flops_per_token() == 6 * saved_weights


def test_tied_embeddings_share_one_parameter():
    model = build(**VARIANTS["tied"])
    assert model.lm_head.weight is model.token_embeddings.weight
    assert len(list(model.parameters())) == len(build().state_dict()) - 1
    state = model.state_dict()
    assert torch.equal(state["lm_head.weight"], state["token_embeddings.weight"])
    # lm_head is a matmul even when tied, so its FLOPs stay counted.
    assert model.num_parameters(non_embedding=True) == model.num_parameters()
    untied = build()
    assert untied.num_parameters() - model.num_parameters() == BASE["vocab_size"] * BASE["d_model"]
    # A gradient step through both uses lands in the one matrix.
    token_ids = torch.randint(0, BASE["vocab_size"], (1, 5))
    model(token_ids).sum().backward()
    assert model.token_embeddings.weight.grad is model.lm_head.weight.grad


def test_norm_eps_reaches_every_rmsnorm():
    model = build(norm_eps=3e-3)
    eps = {module.eps for name, module in model.named_modules() if type(module).__name__ == "RMSNorm"}
    assert eps == {3e-3}


def test_llama3_frequencies_match_the_band_by_band_definition():
    config = ModelConfig(**{**BASE, "rope_theta": 500000.0, "rope_scaling": LLAMA3_SCALING})
    head_dim = config.head_dim
    got = rope_frequencies(config.rope_theta, head_dim, config.rope_scaling)
    expected = torch.tensor([rope_frequency(config, i) for i in range(head_dim // 2)], dtype=torch.float64)
    assert_close(got, expected, atol=0, rtol=1e-15, name="llama3 frequencies")
    plain = rope_frequencies(config.rope_theta, head_dim)
    # The fastest pair is kept, the slowest divided by the factor, and some pair is blended.
    assert got[0] == plain[0] and math.isclose(got[-1], plain[-1] / 8.0, rel_tol=1e-15)
    ratios = plain / got
    assert ((ratios > 1.0001) & (ratios < 7.999)).any()


def test_empty_model_has_tables_and_ties_and_loads_a_state_dict():
    source = build(**VARIANTS["all"])
    empty = TransformerLM.empty(source.config, kernels="reference", device="cpu")
    assert empty.lm_head.weight is empty.token_embeddings.weight
    assert all(p.device.type == "cpu" for p in empty.parameters())
    rope, source_rope = empty.layers[1].attn.rope, source.layers[1].attn.rope
    assert torch.equal(rope.cos, source_rope.cos) and torch.equal(rope.sin, source_rope.sin)
    empty.load_state_dict(source.state_dict())
    token_ids = torch.randint(0, BASE["vocab_size"], (2, 7))
    assert torch.equal(empty(token_ids), source(token_ids))


def test_empty_model_in_bfloat16():
    model = TransformerLM.empty(ModelConfig(**BASE, num_kv_heads=2), kernels="torch", device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_defaults_change_nothing():
    config = ModelConfig(**BASE)
    assert (config.num_kv_heads, config.tie_embeddings, config.norm_eps, config.rope_scaling) == (4, False, 1e-5, None)
    # A config dict stored before these fields existed still rebuilds the same model.
    old = {key: value for key, value in config.to_dict().items() if key in {f.name for f in dataclasses.fields(ModelConfig)[:7]}}
    assert ModelConfig.from_dict(old) == config
    assert ModelConfig(**BASE, num_kv_heads=None) == ModelConfig(**BASE, num_kv_heads=4)
    torch.manual_seed(0)
    before = TransformerLM(**BASE)
    torch.manual_seed(0)
    after = TransformerLM(ModelConfig(**BASE, num_kv_heads=4, tie_embeddings=False, norm_eps=1e-5))
    assert all(torch.equal(a, b) for a, b in zip(before.state_dict().values(), after.state_dict().values()))


def test_config_round_trips_through_a_dict():
    config = ModelConfig(**BASE, num_kv_heads=1, tie_embeddings=True, norm_eps=1e-6, rope_scaling=LLAMA3_SCALING)
    assert ModelConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(num_kv_heads=3), "num_kv_heads=3"),
        (dict(num_kv_heads=0), "num_kv_heads=0"),
        (dict(num_kv_heads=True), "num_kv_heads=True"),
        (dict(tie_embeddings="yes"), "tie_embeddings='yes'"),
        (dict(norm_eps=0.0), "norm_eps=0.0"),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_type='yarn'"),
        (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "rope_type='dynamic'"),
        (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "lacks"),
        (dict(rope_scaling={**LLAMA3_SCALING, "factor": -1.0}), "factor"),
        (dict(rope_scaling="llama3"), "rope_scaling='llama3'"),
    ],
)
def test_bad_llama_fields_are_refused_by_name(fields, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**BASE, **fields)


def test_hugging_face_spellings_of_rope_scaling():
    hf_style = {"type": "llama3", **{k: v for k, v in LLAMA3_SCALING.items() if k != "rope_type"}}
    assert ModelConfig(**BASE, rope_scaling=hf_style).rope_scaling == LLAMA3_SCALING
    assert ModelConfig(**BASE, rope_scaling={"rope_type": "default"}).rope_scaling is None
