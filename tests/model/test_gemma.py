"""Gemma 2 and Gemma 3 (text) from Hugging Face folders: logits, greedy decoding, export and fine-tuning against transformers.

Each variant is a tiny random model built by transformers' own Gemma2ForCausalLM
/ Gemma3ForCausalLM. Their differences from Llama all show in the logits:
norms by (1 + w) before and after each sublayer, GeGLU, embeddings scaled by
sqrt(d_model), attention scaled by query_pre_attn_scalar ** -0.5, attention
and final soft-capping (Gemma 2), q/k norms and a second RoPE base for the
sliding layers with linear scaling on the full ones (Gemma 3). Sequences of 40
tokens run past the window of 8, and norm weights are random around 0, so a
missing offset, norm or cap changes the logits.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import assert_close
from llama_fixtures import TINY_LLAMA, hf_greedy, logits, token_ids

from scratchlm.model import PretrainedFormatError, export_hf, generate_ids, load_pretrained
from scratchlm.model.pretrained import read_pretrained_config
from scratchlm.train import AdamW

transformers = pytest.importorskip("transformers", reason="transformers builds the reference models")

ATOL, RTOL = 1e-4, 1e-4
WINDOW, SEQ = 8, 40
SHAPE = {key: TINY_LLAMA[key] for key in ("vocab_size", "hidden_size", "intermediate_size", "max_position_embeddings")}

# name -> (config class, model class, config keyword arguments, ModelConfig fields scratchlm must read)
VARIANTS = {
    "gemma2": (
        "Gemma2Config", "Gemma2ForCausalLM",
        dict(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=WINDOW,
             query_pre_attn_scalar=24, attn_logit_softcapping=3.0, final_logit_softcapping=2.0,
             rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
        dict(sliding_window=WINDOW, sliding_window_layers=(0, 2), attention_scale=24**-0.5, attention_softcap=3.0,
             final_softcap=2.0, norm_offset=1.0, post_norms=True, mlp_activation="gelu_tanh", tie_embeddings=True),
    ),
    "gemma3": (
        "Gemma3TextConfig", "Gemma3ForCausalLM",
        dict(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1, head_dim=32, sliding_window=WINDOW,
             query_pre_attn_scalar=32, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
             rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                              "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}}),
        dict(sliding_window=WINDOW, sliding_window_layers=(0, 2), qk_norm=True, head_dim=32, num_kv_heads=1,
             local_rope_theta=100.0, rope_theta=1e6, rope_scaling={"rope_type": "linear", "factor": 4.0},
             attention_softcap=None, final_softcap=None, norm_offset=1.0, post_norms=True),
    ),
}  # fmt: skip


def gemma_model(variant: str, seed: int = 0):
    config_name, model_name, kwargs, _ = VARIANTS[variant]
    config = getattr(transformers, config_name)(**SHAPE, **kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)._from_config(config, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):  # Gemma's norms start at 0 (scale 1 + w): make them matter
                param.copy_(0.5 * torch.randn_like(param))
    return model.eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{variant: (transformers model, saved HF folder)}, built once."""
    built = {}
    for index, name in enumerate(VARIANTS):
        model = gemma_model(name, seed=20 + index)
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        built[name] = (model, folder)
    return built


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(folders, variant, backend):
    hf, folder = folders[variant]
    model, _ = load_pretrained(folder, kernels=backend, device="cpu", tokenizer=False)
    for field, value in VARIANTS[variant][3].items():
        assert getattr(model.config, field) == value, field
    ids = token_ids(SEQ)
    assert_close(logits(model, ids), logits(hf, ids), atol=ATOL, rtol=RTOL, name=f"{variant} {backend}")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_triton_logits_and_loss(folders, variant):
    """Every op on Triton (the interpreter here): the offset norm, GeGLU, RoPE, the windowed and soft-capped
    attention and the capped loss; 20 tokens run past the window of 8."""
    hf, folder = folders[variant]
    model, _ = load_pretrained(folder, kernels="triton", device="cpu", tokenizer=False)
    assert set(model.backends.values()) == {"triton"}
    ids = token_ids(seq=20, batch=1)
    assert_close(logits(model, ids), logits(hf, ids), atol=ATOL, rtol=RTOL, name=f"{variant} triton")
    targets = token_ids(seq=20, batch=1).roll(1, dims=-1)
    theirs = torch.nn.functional.cross_entropy(logits(hf, ids)[0], targets[0])
    assert_close(model.loss(ids, targets), theirs, atol=1e-5, rtol=1e-5, name=f"{variant} triton loss")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_decoding_with_the_kv_cache_equals_transformers_generate(folders, variant):
    hf, folder = folders[variant]
    model, _ = load_pretrained(folder, kernels="torch", device="cpu", tokenizer=False)
    prompt = token_ids(seq=6, batch=1)[0].tolist()
    steps = SEQ - len(prompt)
    ours = [step[0] for step in generate_ids(model, [prompt], steps, temperature=0)]
    assert ours == hf_greedy(hf, prompt, steps)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_export_gives_transformers_the_same_model_in_its_own_family(folders, variant, tmp_path):
    hf, folder = folders[variant]
    model, _ = load_pretrained(folder, kernels="reference", device="cpu", tokenizer=False)
    exported = export_hf(model, None, tmp_path / "export")
    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == [hf.config.architectures[0]]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32,
                                                               attn_implementation="eager").eval()  # fmt: skip
    assert theirs.config.layer_types == hf.config.layer_types
    ids = token_ids(SEQ)
    assert_close(logits(theirs, ids), logits(hf, ids), atol=ATOL, rtol=RTOL, name=f"{variant} exported")
    assert read_pretrained_config(exported) == model.config


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fine_tuning_steps_match_transformers(folders, variant):
    """Three AdamW steps on the same batch: the same loss each step, the same weights after, the norm offset included."""
    hf, folder = folders[variant]
    hf = gemma_model(variant, seed=20 + list(VARIANTS).index(variant)).train()
    model, _ = load_pretrained(folder, kernels="torch", device="cpu", tokenizer=False)
    model.train()
    # Without the pad id 0: transformers' Gemma embedding (padding_idx=0) drops that row's input gradient.
    ids = token_ids(seq=SEQ + 1).clamp_min(1)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    # eps well above float32 noise: Adam divides by |gradient|, which turns a noise-level gradient into a full step.
    ours_opt = AdamW(model.parameters(), lr=1e-2, eps=1e-4, weight_decay=0.1)
    theirs_opt = AdamW(hf.parameters(), lr=1e-2, eps=1e-4, weight_decay=0.1)
    for _ in range(3):
        ours = model.loss(inputs, targets)
        logits_hf = hf(inputs).logits
        theirs = torch.nn.functional.cross_entropy(logits_hf.flatten(0, 1), targets.flatten())
        assert_close(ours, theirs, atol=1e-4, rtol=1e-4, name=f"{variant} loss")
        ours_opt.zero_grad(), theirs_opt.zero_grad()
        ours.backward(), theirs.backward()
        ours_opt.step(), theirs_opt.step()
    norm = "model.layers.0.post_feedforward_layernorm.weight"
    assert_close(model.layers[0].post_ffn_norm.weight, dict(hf.named_parameters())[norm], atol=1e-4, rtol=1e-4,
                 name=f"{variant} trained norm")  # fmt: skip


def test_refusals_name_the_field(folders, tmp_path):
    _, folder = folders["gemma2"]
    values = json.loads((folder / "config.json").read_text())
    for field, value in [("hidden_activation", "gelu"), ("use_bidirectional_attention", True)]:
        broken = tmp_path / field
        broken.mkdir()
        for path in folder.iterdir():
            (broken / path.name).write_bytes(path.read_bytes())
        (broken / "config.json").write_text(json.dumps({**values, field: value}))
        with pytest.raises(PretrainedFormatError, match=field):
            load_pretrained(broken, device="cpu", tokenizer=False)
    # A Gemma 2 config relabelled gemma3: its architectures no longer match (test_gemma3_multimodal loads real ones).
    relabelled = tmp_path / "relabelled"
    relabelled.mkdir()
    (relabelled / "config.json").write_text(json.dumps({**values, "model_type": "gemma3"}))
    with pytest.raises(PretrainedFormatError, match=r"architectures=\['Gemma2ForCausalLM'\]; model_type 'gemma3'"):
        load_pretrained(relabelled, device="cpu", tokenizer=False)


def test_linear_rope_scaling_on_a_llama_matches_transformers(tmp_path):
    """Linear RoPE scaling (position interpolation) is read for every family, not only Gemma 3's full layers."""
    from llama_fixtures import hf_model, save_hf_folder

    hf = hf_model("llama", seed=5, rope_scaling={"rope_type": "linear", "factor": 2.5})
    model, _ = load_pretrained(save_hf_folder(hf, tmp_path / "llama"), kernels="reference", device="cpu",
                               tokenizer=False)  # fmt: skip
    assert model.config.rope_scaling == {"rope_type": "linear", "factor": 2.5}
    ids = token_ids(SEQ)
    assert_close(logits(model, ids), logits(hf, ids), atol=ATOL, rtol=RTOL, name="llama linear rope")
