"""TransformerLM: float64 reference forward, backend switch, state dict, config and presets."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, assert_within_torch_error
from reference_model import reference_forward

from scratchlm.model import (
    OP_ALIASES,
    PRESETS,
    KernelsUnavailableError,
    ModelConfig,
    TransformerLM,
    get_op,
    resolve_kernels,
)

TINY = dict(vocab_size=97, context_length=32, d_model=32, num_layers=2, num_heads=4, d_ff=48)


def tiny_model(kernels="reference", **overrides) -> TransformerLM:
    return TransformerLM(**{**TINY, **overrides}, kernels=kernels, device="cpu")


def randomise_norm_weights(model: TransformerLM) -> None:
    """Norm weights start at 1, which would hide a missing multiply; make them differ."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("ln1.weight", "ln2.weight", "ln_final.weight")):
                param.copy_(1 + 0.5 * torch.randn_like(param))


# ---- forward against the float64 reference ---------------------------------------


@pytest.mark.parametrize("kernels", ["reference", "torch"])
def test_forward_matches_float64_reference(kernels):
    model = tiny_model(kernels)
    randomise_norm_weights(model)
    token_ids = torch.randint(0, TINY["vocab_size"], (3, 20))
    expected = reference_forward(model.state_dict(), model.config, token_ids)
    assert_close(model(token_ids), expected, atol=2e-5, rtol=1e-4, name=f"logits ({kernels})")


@pytest.mark.parametrize("kernels", ["reference", "torch"])
def test_float64_model_matches_reference_tightly(kernels):
    model = TransformerLM(**TINY, rope_theta=500000.0, kernels=kernels, dtype=torch.float64)
    randomise_norm_weights(model)
    token_ids = torch.randint(0, TINY["vocab_size"], (2, 32))
    expected = reference_forward(model.state_dict(), model.config, token_ids)
    assert_close(model(token_ids), expected, atol=1e-10, rtol=1e-10, name="float64 logits")


def test_forward_accepts_any_leading_dims():
    model = tiny_model()
    token_ids = torch.randint(0, TINY["vocab_size"], (2, 3, 7))
    logits = model(token_ids)
    assert logits.shape == (2, 3, 7, TINY["vocab_size"])
    assert_close(logits[1, 2], model(token_ids[1, 2]), atol=1e-5, rtol=1e-5, name="leading dims")


@pytest.mark.parametrize("kernels", ["reference", "torch", "triton"])
def test_kv_cache_forward_matches_full_forward(kernels):
    model = tiny_model(kernels)
    token_ids = torch.randint(0, TINY["vocab_size"], (2, 17))
    cache = model.new_kv_cache()
    pieces = [model(token_ids[:, :9], kv_cache=cache)]
    pieces += [model(token_ids[:, i : i + 1], kv_cache=cache) for i in range(9, 17)]
    assert cache.length == 17
    assert_close(torch.cat(pieces, dim=1), model(token_ids), atol=1e-5, rtol=1e-5, name="cached logits")
    with pytest.raises(ValueError, match="cached"):
        model(torch.zeros(2, 16, dtype=torch.long), kv_cache=cache)


# ---- the kernels= switch ------------------------------------------------------------


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_fast_backends_agree_with_reference_on_logits_and_gradients(kernels):
    reference = tiny_model("reference")
    randomise_norm_weights(reference)
    fused = tiny_model(kernels)
    fused.load_state_dict(reference.state_dict())
    token_ids = torch.randint(0, TINY["vocab_size"], (4, 24))
    targets = torch.randint(0, TINY["vocab_size"], (4, 24))

    losses = []
    for model in (reference, fused):
        logits = model(token_ids)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()
        losses.append((logits, loss))
    assert_close(losses[1][0], losses[0][0], atol=1e-5, rtol=1e-5, name="logits")
    for (name, p_ref), (_, p_fused) in zip(reference.named_parameters(), fused.named_parameters()):
        assert p_ref.grad is not None and p_ref.grad.abs().sum() > 0, name
        assert_close(p_fused.grad, p_ref.grad, atol=1e-6, rtol=1e-4, name=f"grad {name}")


def _logits_and_grads(model, token_ids, targets):
    logits = model(token_ids)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten()).backward()
    return logits.detach(), {name: p.grad for name, p in model.named_parameters()}


def test_bf16_backends_agree_with_float32_model():
    # The three-way rule for logits and every gradient: each backend in bf16 is at most twice as far
    # from the float32 model as the reference backend in bf16 (PyTorch's own ops in that dtype) is.
    model32 = tiny_model("reference")
    token_ids = torch.randint(0, TINY["vocab_size"], (2, 16))
    targets = torch.randint(0, TINY["vocab_size"], (2, 16))
    want_logits, want_grads = _logits_and_grads(model32, token_ids, targets)
    results = {}
    for kernels in ("reference", "torch", "triton"):
        model16 = tiny_model(kernels, dtype=torch.bfloat16)
        model16.load_state_dict(model32.state_dict())
        results[kernels] = _logits_and_grads(model16, token_ids, targets)
        assert results[kernels][0].dtype == torch.bfloat16
    same_logits, same_grads = results["reference"]
    for kernels in ("torch", "triton"):
        logits, grads = results[kernels]
        assert_within_torch_error(logits, same_logits, want_logits, name=f"bf16 logits ({kernels})")
        for name, grad in grads.items():
            assert grad is not None and grad.dtype == torch.bfloat16, name
            assert_within_torch_error(grad, same_grads[name], want_grads[name], name=f"bf16 grad {name} ({kernels})")


def test_resolve_kernels_strings_and_auto():
    ops = ("rmsnorm", "swiglu", "geglu", "rope", "attention", "linear_cross_entropy")
    assert resolve_kernels("torch") == dict.fromkeys(ops, "torch")
    assert set(resolve_kernels("auto", device="cpu").values()) == {"reference"}
    assert set(resolve_kernels("auto", device="cuda").values()) == {"triton"}
    resolved = resolve_kernels({"rmsnorm": "torch", "attention": "reference"}, device="cpu")
    assert resolved == {
        "rmsnorm": "torch", "swiglu": "reference", "geglu": "reference", "rope": "reference",
        "attention": "reference", "linear_cross_entropy": "reference",
    }  # fmt: skip


# "loss": the old name of linear_cross_entropy, still accepted.
@pytest.mark.parametrize("op", ["rmsnorm", "swiglu", "rope", "attention", "linear_cross_entropy", "loss"])
def test_dict_kernels_choose_the_implementation_per_op(op):
    model = tiny_model({op: "torch"})
    chosen = OP_ALIASES.get(op, op)
    assert model.backends == {name: "torch" if name == chosen else "reference" for name in model.backends}
    block = model.layers[1]
    used = {
        "rmsnorm": [block.ln1._rmsnorm, block.ln2._rmsnorm, model.ln_final._rmsnorm],
        "swiglu": [block.ffn._gate],
        "rope": [block.attn.rope._rope],
        "attention": [block.attn._attention],
        "linear_cross_entropy": [model._loss],
    }
    for name, implementations in used.items():
        expected = get_op(name, "torch" if name == chosen else "reference")
        assert all(impl is expected for impl in implementations), name


@pytest.mark.parametrize(
    "kernels, named, listed",
    [
        ("Torch", "'Torch'", "'reference', 'torch', 'triton', 'auto'"),
        ("cuda", "'cuda'", "'reference', 'torch', 'triton', 'auto'"),
        (None, "None", "'reference', 'torch', 'triton', 'auto'"),
        ({"softmax": "torch"}, "'softmax'", "'rmsnorm', 'swiglu', 'geglu', 'rope', 'attention', 'linear_cross_entropy'"),
        ({"rmsnorm": "fast"}, "'fast'", "'reference', 'torch', 'triton', 'auto'"),
    ],
)
def test_unknown_kernels_raise_value_error_listing_choices(kernels, named, listed):
    with pytest.raises(ValueError) as error:
        tiny_model(kernels)
    assert named in str(error.value) and listed in str(error.value)


@pytest.mark.parametrize("kernels", ["triton", {"attention": "triton"}])
def test_triton_on_a_cpu_without_the_interpreter_is_a_clear_error(kernels, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(KernelsUnavailableError, match="'triton' backend, but Triton kernels need a CUDA device") as error:
        resolve_kernels(kernels, device="cpu")
    assert isinstance(error.value, ValueError) and isinstance(error.value, NotImplementedError)
    assert resolve_kernels(kernels, device="cuda")["attention"] == "triton"


def test_triton_uses_the_kernels():
    from scratchlm.kernels.flash_attention import flash_attention
    from scratchlm.kernels.rmsnorm import rmsnorm
    from scratchlm.kernels.rope import rope
    from scratchlm.kernels.swiglu import swiglu

    model = tiny_model("triton")
    assert set(model.backends.values()) == {"triton"}
    block = model.layers[0]
    assert block.ln1._rmsnorm is rmsnorm and model.ln_final._rmsnorm is rmsnorm
    assert block.ffn._gate is swiglu
    assert block.attn.rope._rope is rope
    assert block.attn._attention is flash_attention


# ---- state dict, parameters, FLOPs -------------------------------------------------


def test_state_dict_keys_are_exactly_the_design_names():
    model = tiny_model()
    layer_keys = [
        "ln1.weight",
        "attn.q_proj.weight",
        "attn.k_proj.weight",
        "attn.v_proj.weight",
        "attn.output_proj.weight",
        "ln2.weight",
        "ffn.w1.weight",
        "ffn.w2.weight",
        "ffn.w3.weight",
    ]
    expected = {"token_embeddings.weight", "ln_final.weight", "lm_head.weight"}
    expected |= {f"layers.{i}.{key}" for i in range(2) for key in layer_keys}
    state = model.state_dict()
    assert set(state) == expected
    assert state["layers.0.ffn.w1.weight"].shape == (48, 32)
    assert state["lm_head.weight"].shape == (97, 32)
    # RoPE tables are buffers that travel with the model but not in checkpoints.
    assert any(name.endswith("rope.cos") for name, _ in model.named_buffers())
    TransformerLM(**TINY).load_state_dict(state, strict=True)


def test_num_parameters_and_flops_per_token():
    model = tiny_model()
    d, v, f, layers = 32, 97, 48, 2
    per_layer = 4 * d * d + 3 * d * f + 2 * d
    assert model.num_parameters() == 2 * v * d + layers * per_layer + d
    assert model.num_parameters(non_embedding=True) == v * d + layers * per_layer + d
    assert model.flops_per_token() == 6 * model.num_parameters(non_embedding=True) + 12 * layers * d * 32


# ---- config and presets --------------------------------------------------------------


def test_model_accepts_a_config_and_keeps_it():
    config = ModelConfig(**TINY)
    model = TransformerLM(config, kernels="reference")
    assert model.config == config
    assert TransformerLM(config=config).config == config
    assert config.to_dict() == {**TINY, "rope_theta": 10000.0}
    assert ModelConfig.from_dict(config.to_dict()) == config


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="unknown keys \\['n_layers'\\]"):
        ModelConfig.from_dict({**TINY, "n_layers": 3})
    with pytest.raises(ValueError, match="missing keys \\['d_ff'\\]"):
        ModelConfig.from_dict({k: v for k, v in TINY.items() if k != "d_ff"})
    with pytest.raises(ValueError, match="d_model=30 with num_heads=4"):
        ModelConfig(**{**TINY, "d_model": 30})
    with pytest.raises(ValueError, match="even head dimension"):
        ModelConfig(**{**TINY, "d_model": 36, "num_heads": 4})
    with pytest.raises(ValueError, match="num_layers=0"):
        ModelConfig(**{**TINY, "num_layers": 0})
    with pytest.raises(ValueError, match="also \\['d_model'\\]"):
        TransformerLM(ModelConfig(**TINY), d_model=64)
    with pytest.raises(ValueError, match="missing \\['d_ff'"):
        TransformerLM(**{k: v for k, v in TINY.items() if k != "d_ff"})


@pytest.mark.parametrize(
    "name, d_model, num_layers, num_heads, d_ff",
    [("small", 768, 12, 12, 3072), ("medium", 1024, 24, 16, 4096), ("large", 1280, 36, 20, 5120)],
)
def test_gpt2_shaped_presets(name, d_model, num_layers, num_heads, d_ff):
    config = ModelConfig.preset(name)
    assert (config.d_model, config.num_layers, config.num_heads, config.d_ff) == (d_model, num_layers, num_heads, d_ff)
    assert (config.vocab_size, config.context_length) == (50257, 1024)
    # Built on the meta device: shapes and counts without allocating the weights.
    model = TransformerLM(config, device="meta")
    per_layer = 4 * d_model**2 + 3 * d_model * d_ff + 2 * d_model
    assert model.num_parameters() == 2 * 50257 * d_model + num_layers * per_layer + d_model


def test_preset_aliases_overrides_and_errors():
    assert ModelConfig.preset("gpt2-small") == ModelConfig.preset("small")
    assert ModelConfig.preset("gpt2-medium") == ModelConfig.preset("medium")
    assert ModelConfig.preset("debug", vocab_size=300).vocab_size == 300
    assert {"debug", "small", "gpt2-small", "gpt2-medium"} <= set(PRESETS)
    with pytest.raises(ValueError, match="'huge'"):
        ModelConfig.preset("huge")
    with pytest.raises(ValueError, match="unknown keys \\['layers'\\]"):
        ModelConfig.preset("debug", layers=3)


def test_debug_preset_is_small_enough_for_cpu():
    model = TransformerLM(ModelConfig.preset("debug"), kernels="reference")
    assert model.num_parameters() < 1_000_000
    logits = model(torch.randint(0, model.config.vocab_size, (2, model.config.context_length)))
    assert logits.shape == (2, 128, model.config.vocab_size)


# ---- bad input ------------------------------------------------------------------------


def test_bad_token_ids_raise_value_errors_naming_the_problem():
    model = tiny_model()
    with pytest.raises(ValueError, match="sequence length 33.*context_length=32"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="id 97.*vocab_size=97"):
        model(torch.tensor([[1, 97]]))
    with pytest.raises(ValueError, match="id -1"):
        model(torch.tensor([[-1, 5]]))
    with pytest.raises(ValueError, match="integer"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="seq >= 1"):
        model(torch.zeros(1, 0, dtype=torch.long))


# ---- compilation and CUDA ---------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_model_compiles_as_one_graph(kernels):
    # aot_eager traces forward and backward like inductor would, without a C compiler.
    model = tiny_model(kernels)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    token_ids = torch.randint(0, TINY["vocab_size"], (2, 16))
    logits = compiled(token_ids)
    assert_close(logits, model(token_ids), atol=1e-6, rtol=1e-6, name="compiled logits")
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_auto_uses_triton_kernels_and_matches_reference():
    reference = tiny_model("reference")
    model = TransformerLM(**TINY, kernels="auto", device="cuda")
    model.load_state_dict(reference.state_dict())
    assert set(model.backends.values()) == {"triton"}
    token_ids = torch.randint(0, TINY["vocab_size"], (3, 32))
    expected = reference(token_ids)
    assert_close(model(token_ids.cuda()).cpu(), expected, atol=1e-4, rtol=1e-4, name="cuda float32 logits")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(token_ids.cuda()).float().cpu()
    assert_close(logits, expected, atol=0.1, rtol=0.1, name="cuda bf16 autocast logits")
