"""Qwen2/2.5, Qwen3 and Mistral: logits, greedy decoding, GGUF, export and fine-tuning against transformers.

Each family is a tiny random model built by transformers' own classes
(tests/llama_fixtures.py): Qwen2 with q/k/v biases and sliding windows on
its upper layers (use_sliding_window / max_window_layers), Qwen3 with q/k
norms and a head_dim other than hidden_size / heads (windows from an explicit
layer_types too), Mistral with a window on every layer. Sequences of 40
tokens run past the window of 8, so a wrong window changes the logits.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import assert_close
from llama_fixtures import (
    SAMPLE_TEXT,
    TOKENIZER,
    VOCAB_SIZE,
    edit_config,
    hf_greedy,
    hf_model,
    logits,
    save_hf_folder,
    token_ids,
    write_gguf,
)

from scratchlm.model import ModelConfig, PretrainedFormatError, TransformerLM, export_hf, generate_ids, load_pretrained
from scratchlm.model.pretrained import read_pretrained_config
from scratchlm.train import AdamW

transformers = pytest.importorskip("transformers", reason="transformers builds the reference models")

ATOL, RTOL = 1e-4, 1e-4
WINDOW, SEQ = 8, 40

# name -> (model_type, hf_model keyword arguments, ModelConfig fields scratchlm must read from it)
VARIANTS = {
    "qwen2-window": (
        "qwen2",
        dict(num_hidden_layers=3, num_key_value_heads=2, use_sliding_window=True, sliding_window=WINDOW,
             max_window_layers=1, tie_word_embeddings=True),
        dict(qkv_bias=True, sliding_window=WINDOW, sliding_window_layers=(1, 2), tie_embeddings=True),
    ),
    "qwen2-full-mqa": (
        "qwen2",
        dict(num_key_value_heads=1, use_sliding_window=False, sliding_window=WINDOW),
        dict(qkv_bias=True, sliding_window=None, num_kv_heads=1),
    ),
    "qwen3-headdim": (
        "qwen3",
        dict(num_key_value_heads=2, head_dim=32, tie_word_embeddings=True),
        dict(qk_norm=True, head_dim=32, sliding_window=None),
    ),
    "qwen3-layer-types": (
        "qwen3",
        dict(num_hidden_layers=3, num_key_value_heads=1, head_dim=32, use_sliding_window=True,
             sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
        dict(qk_norm=True, head_dim=32, sliding_window=WINDOW, sliding_window_layers=(0, 2)),
    ),
    "mistral-window-mqa": (
        "mistral",
        dict(num_key_value_heads=1, sliding_window=WINDOW),
        dict(sliding_window=WINDOW, sliding_window_layers=None, num_kv_heads=1),
    ),
}  # fmt: skip
WITHOUT_WINDOW = [name for name, (_, _, fields) in VARIANTS.items() if fields["sliding_window"] is None]
WITH_WINDOW = [name for name in VARIANTS if name not in WITHOUT_WINDOW]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{variant: (transformers model, saved HF folder)}, built once."""
    built = {}
    for index, (name, (model_type, kwargs, _)) in enumerate(VARIANTS.items()):
        model = hf_model(model_type, seed=10 + index, **kwargs)
        built[name] = (model, save_hf_folder(model, tmp_path_factory.mktemp(name)))
    return built


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(folders, variant, backend):
    hf, folder = folders[variant]
    model, tokenizer = load_pretrained(folder, kernels=backend, device="cpu")
    assert tokenizer is not None and tokenizer.encode(SAMPLE_TEXT) == TOKENIZER.encode(SAMPLE_TEXT)
    for field, value in VARIANTS[variant][2].items():
        assert getattr(model.config, field) == value, field
    ids = token_ids(SEQ)
    assert_close(logits(model, ids), logits(hf, ids), atol=ATOL, rtol=RTOL, name=f"{variant} {backend}")


@pytest.mark.parametrize("variant", WITHOUT_WINDOW)
def test_triton_logits_without_a_window(folders, variant):
    hf, folder = folders[variant]
    model, _ = load_pretrained(folder, kernels="triton", device="cpu", tokenizer=False)
    ids = token_ids(seq=12, batch=1)
    assert_close(logits(model, ids), logits(hf, ids), atol=ATOL, rtol=RTOL, name=f"{variant} triton")


@pytest.mark.parametrize("variant", WITH_WINDOW)
def test_triton_logits_with_a_window(folders, variant):
    """Every op on Triton (the interpreter here), the window included: 20 tokens run past the window of 8."""
    hf, folder = folders[variant]
    model, _ = load_pretrained(folder, kernels="triton", device="cpu", tokenizer=False)
    assert model.backends["attention"] == "triton"
    ids = token_ids(seq=20, batch=1)
    assert_close(logits(model, ids), logits(hf, ids), atol=ATOL, rtol=RTOL, name=f"{variant} triton window")


def test_a_window_no_shorter_than_the_context_never_binds():
    config = ModelConfig(vocab_size=32, context_length=16, d_model=32, num_layers=2, num_heads=2, d_ff=32,
                         sliding_window=16)  # fmt: skip
    model = TransformerLM(config, kernels="triton", device="cpu")  # accepted: no sequence outgrows the window
    assert model.layer_windows() == [None, None]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_decoding_with_the_kv_cache_equals_transformers_generate(folders, variant):
    hf, folder = folders[variant]
    model, _ = load_pretrained(folder, kernels="torch", device="cpu", tokenizer=False)
    prompt = TOKENIZER.encode(SAMPLE_TEXT)[:6]
    steps = SEQ - len(prompt)
    ours = [step[0] for step in generate_ids(model, [prompt], steps, temperature=0)]
    assert ours == hf_greedy(hf, prompt, steps)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_cached_logits_equal_the_uncached_forward_and_sliding_layers_keep_window_minus_one_keys(folders, backend):
    model, _ = load_pretrained(folders["qwen2-window"][1], kernels=backend, device="cpu", tokenizer=False)
    ids = token_ids(SEQ)
    cache = model.new_kv_cache()
    with torch.no_grad():
        pieces = [model(ids[:, :5], kv_cache=cache)]
        pieces += [model(ids[:, i : i + 3], kv_cache=cache) for i in range(5, SEQ, 3)]
    assert_close(torch.cat(pieces, dim=1), logits(model, ids), atol=ATOL, rtol=RTOL, name="cached")
    assert cache.length == SEQ
    kept = [layer.keys.shape[-2] for layer in cache.layers]
    assert kept == [SEQ, WINDOW - 1, WINDOW - 1]  # layer 0 is full; 1 and 2 slide


def test_document_ids_with_a_window_and_a_cache(folders):
    """Packed documents under a window: the cache drops old keys, and their ids with them."""
    model, _ = load_pretrained(folders["mistral-window-mqa"][1], kernels="reference", device="cpu", tokenizer=False)
    ids = token_ids(SEQ, batch=1)
    documents = (torch.arange(SEQ) >= 13).long()[None]  # two documents: 0..12, 13..39
    with torch.no_grad():
        whole = model(ids, document_ids=documents)
        cache = model.new_kv_cache()
        pieces = [model(ids[:, :20], kv_cache=cache, document_ids=documents[:, :20])]
        pieces += [model(ids[:, i : i + 1], kv_cache=cache, document_ids=documents[:, : i + 1]) for i in range(20, SEQ)]
        second_alone = model(ids[:, 13:])
    assert_close(torch.cat(pieces, dim=1), whole, atol=ATOL, rtol=RTOL, name="cached documents")
    assert_close(whole[:, 13:], second_alone, atol=ATOL, rtol=RTOL, name="second document alone")


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_windowed_attention_op_against_a_loop(backend):
    """q shorter than k (a KV cache), GQA, a scale: query i (at key position k_seq - q_seq + i) sees its last W keys."""
    from scratchlm.model import get_op

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 8, generator=gen)  # (batch, heads, q_seq, d)
    k, v = torch.randn(2, 2, 11, 8, generator=gen), torch.randn(2, 2, 11, 8, generator=gen)  # 2 kv heads, 11 keys
    window, scale = 3, 0.7
    out = get_op("attention", backend)(q, k, v, scale=scale, window=window)
    expected = torch.empty_like(q)
    for head in range(4):
        for i in range(5):
            position = 11 - 5 + i
            keys = slice(max(0, position - window + 1), position + 1)
            scores = torch.einsum("bd,bkd->bk", q[:, head, i], k[:, head // 2, keys]) * scale
            expected[:, head, i] = torch.einsum("bk,bkd->bd", torch.softmax(scores, dim=-1), v[:, head // 2, keys])
    assert_close(out, expected, atol=1e-5, rtol=1e-5, name=f"{backend} windowed attention")


# ------------------------------------------------------------------ GGUF


GGUF_VARIANTS = {
    # transformers' GGUF reader takes Qwen3's head_dim from Qwen3Config's default (128), not from key_length.
    "qwen2-bias-tied": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3-headdim128": ("qwen3", dict(num_key_value_heads=1, head_dim=128)),
    # llama.cpp writes no window for Mistral (architecture "llama"): the file attends fully, so the
    # HF model it is compared with has a window no shorter than the sequence.
    "mistral": ("mistral", dict(num_key_value_heads=2, sliding_window=4096)),
    # Mistral Nemo's shape: head_dim apart from hidden_size / heads, stated by key_length and rope.dimension_count.
    "mistral-headdim32": ("mistral", dict(num_key_value_heads=2, head_dim=32, sliding_window=4096)),
}


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
@pytest.mark.parametrize("variant", list(GGUF_VARIANTS))
def test_gguf_as_llama_cpp_writes_it_matches_transformers_reading_it(variant, qtype, tmp_path):
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate", reason="transformers reads GGUF weights only with accelerate installed")
    model_type, kwargs = GGUF_VARIANTS[variant]
    hf = hf_model(model_type, seed=3, **kwargs)
    path = write_gguf(hf, tmp_path / f"{variant}.gguf", qtype)
    ours, tokenizer = load_pretrained(path, kernels="reference", device="cpu", dtype=torch.float32)
    assert tokenizer.encode(SAMPLE_TEXT) == TOKENIZER.encode(SAMPLE_TEXT)
    assert ours.config.head_dim == kwargs.get("head_dim", 16)
    assert (ours.config.qkv_bias, ours.config.qk_norm) == (model_type == "qwen2", model_type == "qwen3")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    # A Mistral file is a "llama" file, which transformers reads as Llama (its Mistral GGUF path needs a
    # general.name of exactly "mistral", and then an architecture gguf 0.19 lacks): both attend fully, as llama.cpp does.
    assert theirs.config.model_type == {"mistral": "llama"}.get(model_type, model_type)
    ids = token_ids(SEQ)
    assert_close(logits(ours, ids), logits(theirs, ids), atol=ATOL, rtol=RTOL, name=f"{variant} {qtype}")
    if qtype == "F32":
        assert_close(logits(ours, ids), logits(hf, ids), atol=ATOL, rtol=RTOL, name=f"{variant} vs the HF model")


def test_gguf_refusals_name_the_key(tmp_path):
    hf = hf_model("qwen2", seed=3, num_key_value_heads=2)
    path = write_gguf(hf, tmp_path / "window.gguf", "F32", extra_metadata={"qwen2.attention.sliding_window": 8})
    with pytest.raises(PretrainedFormatError, match=r"qwen2\.attention\.sliding_window=8"):
        load_pretrained(path, device="cpu")
    path = write_gguf(hf, tmp_path / "moe.gguf", "F32", extra_metadata={"qwen2.expert_count": 4})
    with pytest.raises(PretrainedFormatError, match=r"qwen2\.expert_count=4"):
        load_pretrained(path, device="cpu")


# ------------------------------------------------------------------ export


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_export_gives_transformers_the_same_model_in_its_own_family(folders, variant, tmp_path):
    hf, folder = folders[variant]
    model, tokenizer = load_pretrained(folder, kernels="reference", device="cpu")
    exported = export_hf(model, tokenizer, tmp_path / "export")
    config = json.loads((exported / "config.json").read_text())
    model_type = VARIANTS[variant][0]
    assert config["model_type"] == model_type and config["architectures"] == [hf.config.architectures[0]]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32,
                                                               attn_implementation="eager").eval()  # fmt: skip
    assert getattr(theirs.config, "layer_types", None) == getattr(hf.config, "layer_types", None)
    assert theirs.config.sliding_window == hf.config.sliding_window
    ids = token_ids(SEQ)
    assert_close(logits(theirs, ids), logits(hf, ids), atol=ATOL, rtol=RTOL, name=f"{variant} exported")
    assert read_pretrained_config(exported) == model.config
    names = set(theirs.state_dict())
    assert ("model.layers.0.self_attn.q_proj.bias" in names) == (model_type == "qwen2")
    assert ("model.layers.0.self_attn.q_norm.weight" in names) == (model_type == "qwen3")


def test_a_llama_with_its_own_head_dim_exports_as_llama(tmp_path):
    config = ModelConfig(vocab_size=VOCAB_SIZE, context_length=64, d_model=64, num_layers=2, num_heads=4, d_ff=96,
                         num_kv_heads=2, head_dim=32)  # fmt: skip
    torch.manual_seed(0)
    model = TransformerLM(config, kernels="reference", device="cpu").eval()
    exported = export_hf(model, TOKENIZER, tmp_path / "export")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    assert theirs.config.model_type == "llama" and theirs.config.head_dim == 32
    ids = token_ids(SEQ)
    assert_close(logits(model, ids), logits(theirs, ids), atol=ATOL, rtol=RTOL, name="llama head_dim 32")
    assert load_pretrained(exported, device="cpu")[0].config == config


def test_export_refuses_what_no_family_states(tmp_path):
    base = dict(vocab_size=VOCAB_SIZE, context_length=64, d_model=64, num_layers=2, num_heads=4, d_ff=96)
    cases = {
        "attention_scale=0.5": dict(attention_scale=0.5),
        "qk_norm and qkv_bias": dict(qk_norm=True, qkv_bias=True),
        r"sliding_window_layers=\(1,\) without qkv_bias or qk_norm": dict(sliding_window=8, sliding_window_layers=[1]),
    }
    for message, fields in cases.items():
        model = TransformerLM(ModelConfig(**base, **fields), kernels="reference", device="cpu")
        with pytest.raises(ValueError, match=message):
            export_hf(model, None, tmp_path / "refused")
        assert not (tmp_path / "refused").exists()


# ------------------------------------------------------------------ config fields and refusals


def test_new_fields_round_trip_and_leave_old_configs_unchanged():
    old = dict(vocab_size=100, context_length=64, d_model=64, num_layers=3, num_heads=4, d_ff=96)
    assert ModelConfig(**old).to_dict() == {**old, "rope_theta": 10000.0}
    config = ModelConfig(**old, head_dim=32, qkv_bias=True, qk_norm=True, attention_scale=0.1, sliding_window=8,
                         sliding_window_layers=[2, 1])  # fmt: skip
    stored = json.loads(json.dumps(config.to_dict()))
    assert stored["sliding_window_layers"] == [1, 2] and ModelConfig.from_dict(stored) == config
    assert [config.layer_window(i) for i in range(3)] == [None, 8, 8]
    # An explicit head_dim equal to d_model / num_heads is the default, and is stored as nothing.
    assert "head_dim" not in ModelConfig(**old, head_dim=16).to_dict()
    assert ModelConfig(**{**old, "d_model": 60}, head_dim=16).head_dim == 16  # 60 is no multiple of 4: fine with head_dim


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(head_dim=15), "head_dim=15"),
        (dict(sliding_window=0), "sliding_window=0"),
        (dict(sliding_window_layers=[0]), "sliding_window_layers=.* with sliding_window=None"),
        (dict(sliding_window=8, sliding_window_layers=[3]), r"sliding_window_layers=\[3\]"),
        (dict(attention_scale=-1.0), "attention_scale=-1.0"),
        (dict(qk_norm=1), "qk_norm=1"),
    ],
)
def test_bad_field_values_are_refused_by_name(fields, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(vocab_size=100, context_length=64, d_model=64, num_layers=3, num_heads=4, d_ff=96, **fields)


@pytest.mark.parametrize(
    "variant, changes, message",
    [
        ("qwen3-headdim", dict(attention_bias=True), "attention_bias=True"),
        ("qwen2-full-mqa", dict(model_type="qwen2_moe"), "model_type='qwen2_moe'; that is a mixture-of-experts"),
        ("qwen2-full-mqa", dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}),
         "rope_scaling.rope_type='yarn'"),
        ("qwen2-window", dict(layer_types=["full_attention"]), "layer_types=.*expected 3 entries"),
        ("mistral-window-mqa", dict(architectures=["Qwen2ForCausalLM"]), "architectures=.*MistralForCausalLM"),
    ],
)  # fmt: skip
def test_unsupported_family_configs_are_refused_by_name(folders, tmp_path, variant, changes, message):
    import shutil

    folder = shutil.copytree(folders[variant][1], tmp_path / "copy")
    edit_config(folder, **changes)
    with pytest.raises(PretrainedFormatError, match=message):
        load_pretrained(folder, device="cpu")


# ------------------------------------------------------------------ fine-tuning


def _hf_loss_and_grads(hf, ids):
    hf.zero_grad()
    loss = hf(ids, labels=ids).loss
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in hf.named_parameters()}


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("variant", ["qwen2-window", "qwen3-headdim", "mistral-window-mqa"])
def test_fine_tuning_gradients_match_transformers_and_steps_lower_the_loss(folders, variant, backend):
    hf, folder = folders[variant]
    model, _ = load_pretrained(folder, kernels=backend, device="cpu", tokenizer=False)
    model.train()
    ids = token_ids(seq=SEQ + 1)
    hf_loss, hf_grads = _hf_loss_and_grads(hf, ids)
    loss = model.loss(ids[:, :-1], ids[:, 1:])
    loss.backward()
    assert abs(loss.item() - hf_loss) < 1e-4
    # Weights not touched by the q/k row order compare as they are.
    assert_close(model.token_embeddings.weight.grad, hf_grads["model.embed_tokens.weight"], atol=1e-5, rtol=1e-4,
                 name="embedding grad")  # fmt: skip
    assert_close(model.layers[1].attn.v_proj.weight.grad, hf_grads["model.layers.1.self_attn.v_proj.weight"],
                 atol=1e-5, rtol=1e-4, name="v_proj grad")  # fmt: skip
    optimizer = AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(4):
        optimizer.zero_grad()
        loss = model.loss(ids[:, :-1], ids[:, 1:])
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    hf.zero_grad(set_to_none=True)
