"""load_pretrained on Hugging Face folders: parity with transformers' LlamaForCausalLM, and every refusal."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import assert_close
from llama_fixtures import (
    LLAMA3_SCALING,
    SAMPLE_TEXT,
    TOKENIZER,
    VOCAB_SIZE,
    edit_config,
    hf_greedy,
    hf_llama,
    save_hf_folder,
)

import scratchlm.model.hf_checkpoint as hf_checkpoint
from scratchlm.model import PretrainedFormatError, generate_ids, load_pretrained
from scratchlm.model.pretrained import read_pretrained_config

transformers = pytest.importorskip("transformers", reason="transformers builds the reference models")

# Logits are O(10); float32 sums over 64-96 terms agree to ~1e-5.
ATOL, RTOL = 1e-4, 1e-4

# (name, hf_llama keyword arguments): grouped-query, multi-query and plain attention,
# tied and untied embeddings, a rope_theta other than 10000, and Llama 3.1 scaling.
VARIANTS = {
    "gqa-untied": dict(num_key_value_heads=2),
    "mqa-tied": dict(num_key_value_heads=1, tie_word_embeddings=True),
    "mha-theta5e5": dict(num_key_value_heads=4, rope_theta=500000.0),
    "llama3-scaling": dict(num_key_value_heads=2, rope_scaling=LLAMA3_SCALING, rope_theta=50000.0),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{variant: (transformers model, saved folder)}, built once for the module."""
    built = {}
    for index, (name, kwargs) in enumerate(VARIANTS.items()):
        model = hf_llama(seed=index, **kwargs)
        built[name] = (model, save_hf_folder(model, tmp_path_factory.mktemp(name)))
    return built


def token_ids(seq: int = 24, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB_SIZE, (batch, seq), generator=torch.Generator().manual_seed(seed))


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def our_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


# ---- parity --------------------------------------------------------------------


@pytest.mark.parametrize("kernels", ["reference", "torch"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(folders, variant, kernels):
    hf_model, folder = folders[variant]
    model, _ = load_pretrained(folder, kernels=kernels, device="cpu")
    assert model.config.num_kv_heads == hf_model.config.num_key_value_heads
    assert model.config.tie_embeddings == hf_model.config.tie_word_embeddings
    assert not model.training
    ids = token_ids()
    assert_close(our_logits(model, ids), hf_logits(hf_model, ids), atol=ATOL, rtol=RTOL, name=f"{variant} logits")


def test_logits_match_transformers_on_triton_kernels(folders):
    hf_model, folder = folders["gqa-untied"]
    model, _ = load_pretrained(folder, kernels="triton", device="cpu")
    assert set(model.backends.values()) == {"triton"}
    ids = token_ids(seq=8, batch=1)
    assert_close(our_logits(model, ids), hf_logits(hf_model, ids), atol=ATOL, rtol=RTOL, name="triton logits")


def test_llama3_scaling_is_applied_not_ignored(folders):
    """The scaled variant's logits must differ from the same weights with plain RoPE."""
    hf_model, folder = folders["llama3-scaling"]
    model, _ = load_pretrained(folder, kernels="reference", device="cpu")
    assert model.config.rope_scaling == LLAMA3_SCALING
    plain = hf_llama(seed=list(VARIANTS).index("llama3-scaling"), num_key_value_heads=2, rope_theta=50000.0)
    ids = token_ids(seq=48)
    assert (hf_logits(plain, ids) - our_logits(model, ids)).abs().max() > 1e-2


@pytest.mark.parametrize("variant", ["gqa-untied", "mqa-tied"])
def test_greedy_generation_matches_transformers_with_and_without_cache(folders, variant):
    hf_model, folder = folders[variant]
    model, _ = load_pretrained(folder, kernels="reference", device="cpu")
    prompts = [TOKENIZER.encode(SAMPLE_TEXT)[:7]]
    steps = 12
    ours = {
        cached: [step[0] for step in generate_ids(model, prompts, steps, temperature=0, use_kv_cache=cached)]
        for cached in (True, False)
    }
    assert ours[True] == ours[False]
    assert ours[True] == hf_greedy(hf_model, prompts[0], steps)


def test_transformers_4_config_spelling_reads_the_same(folders, tmp_path):
    """Hub configs of Llama 3.x put rope_theta and rope_scaling (with "type" in older ones) at the top level."""
    _, folder = folders["llama3-scaling"]
    legacy = tmp_path / "legacy"
    shutil.copytree(folder, legacy)
    values = json.loads((legacy / "config.json").read_text())
    parameters = values.pop("rope_parameters")
    values["rope_theta"] = parameters.pop("rope_theta")
    values["rope_scaling"] = {"type": parameters.pop("rope_type"), **parameters}
    (legacy / "config.json").write_text(json.dumps(values))
    assert read_pretrained_config(legacy) == read_pretrained_config(folder)
    assert read_pretrained_config(legacy).rope_scaling == LLAMA3_SCALING


def test_sharded_checkpoint_loads_the_same_weights(folders, tmp_path):
    hf_model, _ = folders["gqa-untied"]
    folder = save_hf_folder(hf_model, tmp_path / "sharded", max_shard_size="60KB")
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("model-*.safetensors"))) > 2
    model, _ = load_pretrained(folder, kernels="reference", device="cpu")
    ids = token_ids()
    assert_close(our_logits(model, ids), hf_logits(hf_model, ids), atol=ATOL, rtol=RTOL, name="sharded logits")


def test_dtype_none_keeps_bfloat16_and_dtype_converts(folders, tmp_path):
    hf_model, _ = folders["mqa-tied"]
    bf16 = hf_llama(seed=1, num_key_value_heads=1, tie_word_embeddings=True).to(torch.bfloat16)
    folder = save_hf_folder(bf16, tmp_path / "bf16")
    model, _ = load_pretrained(folder, kernels="reference", device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    # Bitwise the file's values: v_proj rows are never permuted.
    assert torch.equal(model.layers[0].attn.v_proj.weight, bf16.model.layers[0].self_attn.v_proj.weight)
    assert model.lm_head.weight is model.token_embeddings.weight
    as_f32, _ = load_pretrained(folder, kernels="reference", device="cpu", dtype=torch.float32)
    assert {p.dtype for p in as_f32.parameters()} == {torch.float32}
    assert torch.equal(as_f32.token_embeddings.weight, bf16.model.embed_tokens.weight.float())


def test_returns_the_folder_tokenizer_or_none(folders, tmp_path):
    _, folder = folders["gqa-untied"]
    _, tokenizer = load_pretrained(folder, kernels="reference", device="cpu")
    assert tokenizer.encode(SAMPLE_TEXT) == TOKENIZER.encode(SAMPLE_TEXT)
    assert (tokenizer.bos_id, tokenizer.eos_id) == (TOKENIZER.bos_id, TOKENIZER.eos_id)
    bare = tmp_path / "no-tokenizer"
    shutil.copytree(folder, bare)
    (bare / "tokenizer.json").unlink()
    assert load_pretrained(bare, kernels="reference", device="cpu")[1] is None


# ---- refusals ------------------------------------------------------------------


@pytest.fixture
def folder_copy(folders, tmp_path):
    """A writable copy of the GQA folder, and a guard that fails if any model gets allocated."""
    target = tmp_path / "copy"
    shutil.copytree(folders["gqa-untied"][1], target)
    return target


@pytest.fixture
def no_weights_read(monkeypatch):
    """Refusals must come before any weight is read, hence before the model is allocated."""

    def fail(*args, **kwargs):
        raise AssertionError("the model was allocated before the refusal")

    monkeypatch.setattr(hf_checkpoint, "allocate", fail)


@pytest.mark.parametrize(
    "changes, field, value",
    [
        (dict(model_type="qwen3_moe"), "model_type", "'qwen3_moe'"),
        (dict(model_type="gemma"), "model_type", "'gemma'"),
        (dict(model_type="falcon"), "model_type", "'falcon'"),
        (dict(architectures=["MistralForCausalLM"]), "architectures", "['MistralForCausalLM']"),
        (dict(attention_bias=True), "attention_bias", "True"),
        (dict(mlp_bias=True), "mlp_bias", "True"),
        (dict(sliding_window=4096), "sliding_window", "4096"),
        (dict(hidden_act="gelu"), "hidden_act", "'gelu'"),
        (
            dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}),
            "rope_scaling.rope_type",
            "'yarn'",
        ),
        (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "rope_scaling.rope_type", "'dynamic'"),
        (
            dict(quantization_config={"quant_method": "bitsandbytes"}),
            "quantization_config.quant_method",
            "'bitsandbytes'",
        ),
        (dict(partial_rotary_factor=0.5), "partial_rotary_factor", "0.5"),
    ],
)
def test_unsupported_config_is_refused_naming_field_and_value(folder_copy, no_weights_read, changes, field, value):
    edit_config(folder_copy, **changes)
    with pytest.raises(PretrainedFormatError, match=f"{field}={value}".replace("[", r"\[").replace("]", r"\]")):
        load_pretrained(folder_copy, device="cpu")


def test_a_sentencepiece_style_tokenizer_is_refused_before_the_weights(folder_copy, monkeypatch):
    """Llama 2 / TinyLlama tokenizer.json: BPE over characters with byte fallback, not byte-level BPE."""
    path = folder_copy / "tokenizer.json"
    document = json.loads(path.read_text())
    document["model"]["byte_fallback"] = True
    path.write_text(json.dumps(document))
    with monkeypatch.context() as patch:
        patch.setattr(hf_checkpoint, "allocate", lambda *args: pytest.fail("weights were read"))
        with pytest.raises(ValueError, match="byte_fallback"):
            load_pretrained(folder_copy, device="cpu")
    model, tokenizer = load_pretrained(folder_copy, kernels="reference", device="cpu", tokenizer=False)
    assert tokenizer is None and model.config.num_kv_heads == 2


def test_read_pretrained_config_reads_only_config_json(folders, folder_copy):
    for _, folder in folders.values():
        assert read_pretrained_config(folder) == load_pretrained(folder, kernels="reference", device="cpu")[0].config
    (folder_copy / "model.safetensors").write_bytes(b"")  # never looked at
    assert read_pretrained_config(folder_copy).num_kv_heads == 2
    edit_config(folder_copy, hidden_act="relu")
    with pytest.raises(PretrainedFormatError, match="hidden_act='relu'"):
        read_pretrained_config(folder_copy)


def test_config_that_is_not_json_names_the_path(folder_copy, no_weights_read):
    (folder_copy / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(PretrainedFormatError, match="config.json.* is not valid JSON"):
        load_pretrained(folder_copy, device="cpu")


def test_truncated_safetensors_names_the_file(folder_copy, no_weights_read):
    weights = folder_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000])
    with pytest.raises(PretrainedFormatError, match="model.safetensors.* truncated or corrupt"):
        load_pretrained(folder_copy, device="cpu")


def rewrite_weights(folder, edit):
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_is_named(folder_copy, no_weights_read):
    rewrite_weights(folder_copy, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(PretrainedFormatError, match=r"lacks the tensor for 'layers\.1\.ffn\.w3\.weight'"):
        load_pretrained(folder_copy, device="cpu")


def test_extra_tensor_is_named(folder_copy, no_weights_read):
    rewrite_weights(folder_copy, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}))
    with pytest.raises(PretrainedFormatError, match=r"'model\.layers\.0\.self_attn\.q_proj\.bias'"):
        load_pretrained(folder_copy, device="cpu")


def test_tensor_of_wrong_shape_is_named(folder_copy, no_weights_read):
    rewrite_weights(folder_copy, lambda t: t.update({"model.norm.weight": torch.ones(65)}))
    with pytest.raises(PretrainedFormatError, match=r"'model\.norm\.weight' of shape \(65,\); expected \(64,\)"):
        load_pretrained(folder_copy, device="cpu")


def test_pickle_weights_are_never_opened(folder_copy):
    (folder_copy / "model.safetensors").unlink()
    (folder_copy / "pytorch_model.bin").write_bytes(b"not even opened")
    with pytest.raises(PretrainedFormatError, match="pytorch_model.bin .*only safetensors"):
        load_pretrained(folder_copy, device="cpu")
    with pytest.raises(PretrainedFormatError, match="single weights file"):
        load_pretrained(folder_copy / "pytorch_model.bin", device="cpu")


def test_missing_path_and_missing_shard(folder_copy, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(tmp_path / "nowhere", device="cpu")
    index = {"metadata": {}, "weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    (folder_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        load_pretrained(folder_copy, device="cpu")
