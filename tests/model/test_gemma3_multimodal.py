"""Gemma 3 with a vision tower (model_type "gemma3"): its language model read out of the folder, against transformers.

The folder is written by transformers' own Gemma3ForConditionalGeneration: a
tiny SigLIP vision tower and projector beside a three-layer Gemma 3 language
model whose config sits under text_config. scratchlm reads the language model
alone; on text-only input its logits are the multi-modal model's. Sequences
run past the window of 8, the full layer turns by a linearly scaled RoPE base
and the sliding ones by another, and the norm weights are random around 0, so
a field read from the wrong place or a missed default changes the logits.
"""

from __future__ import annotations

import json

import pytest
import safetensors.torch as safetensors_torch
import torch
from helpers import assert_close
from llama_fixtures import TINY_LLAMA, TOKENIZER, VOCAB_SIZE, hf_greedy, logits, save_hf_folder, token_ids

from scratchlm.cli import main
from scratchlm.model import PretrainedFormatError, export_hf, load_pretrained
from scratchlm.model.pretrained import read_pretrained_config

transformers = pytest.importorskip("transformers", reason="transformers builds the reference models")

ATOL, RTOL = 1e-4, 1e-4
WINDOW, SEQ = 8, 40
FULL_ROPE = {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6}
# Everything Gemma3TextConfig would not default, in transformers 4.5x's spelling (rope_scaling, sliding_window_pattern):
# the rest (query_pre_attn_scalar 256, both RoPE bases, rms_norm_eps, tying, the activation) is left to the defaults.
MINIMAL_TEXT_CONFIG = {
    "model_type": "gemma3_text", "vocab_size": VOCAB_SIZE, "hidden_size": 64, "intermediate_size": 96,
    "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 32,
    "max_position_embeddings": 64, "sliding_window": WINDOW, "sliding_window_pattern": 2,
    "rope_scaling": {"rope_type": "linear", "factor": 4.0},
}  # fmt: skip
# What scratchlm must read from either config.
EXPECTED_FIELDS = dict(
    vocab_size=VOCAB_SIZE, d_model=64, num_layers=3, num_heads=4, num_kv_heads=1, head_dim=32, d_ff=96,
    sliding_window=WINDOW, sliding_window_layers=(0, 2), attention_scale=256**-0.5, rope_theta=1e6,
    rope_scaling={"rope_type": "linear", "factor": 4.0}, local_rope_theta=10_000.0, norm_eps=1e-6, qk_norm=True,
    post_norms=True, norm_offset=1.0, tie_embeddings=True, final_softcap=None,
)  # fmt: skip


def gemma3_vision_model():
    """A seeded Gemma3ForConditionalGeneration: the text model of MINIMAL_TEXT_CONFIG, a one-layer SigLIP tower."""
    text = transformers.Gemma3TextConfig(
        **{key: TINY_LLAMA[key] for key in ("vocab_size", "hidden_size", "intermediate_size", "max_position_embeddings")},
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1, head_dim=32, sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], initializer_range=0.2,
        rope_parameters={"full_attention": dict(FULL_ROPE), "sliding_attention": {"rope_type": "default",
                                                                                 "rope_theta": 10_000.0}},
    )  # fmt: skip
    vision = transformers.SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    )
    # The image token lies past the vocabulary, so no text id is one.
    config = transformers.Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=VOCAB_SIZE,
        boi_token_index=VOCAB_SIZE + 1, eoi_token_index=VOCAB_SIZE + 2,
    )  # fmt: skip
    torch.manual_seed(31)
    model = transformers.Gemma3ForConditionalGeneration._from_config(
        config, attn_implementation="eager", dtype=torch.float32
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") and "language_model" in name:  # Gemma's norms start at 0 (scale 1 + w)
                param.copy_(0.5 * torch.randn_like(param))
    return model.eval()


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    """(transformers model, the folder it saved with the tiny tokenizer), in shards as large checkpoints come."""
    model = gemma3_vision_model()
    folder = save_hf_folder(model, tmp_path_factory.mktemp("gemma3"), max_shard_size="60KB")
    assert len(list(folder.glob("*.safetensors"))) > 2
    return model, folder


def copy_folder(folder, to):
    to.mkdir()
    for path in folder.iterdir():
        (to / path.name).write_bytes(path.read_bytes())
    return to


def stored_tensors(folder) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's shards, by its stored name."""
    return {name: tensor for path in folder.glob("*.safetensors") for name, tensor in
            safetensors_torch.load_file(path).items()}  # fmt: skip


def one_file_folder(folder, to, tensors: dict[str, torch.Tensor]):
    """``folder``'s config.json beside one model.safetensors holding ``tensors``."""
    to.mkdir()
    (to / "config.json").write_bytes((folder / "config.json").read_bytes())
    safetensors_torch.save_file(tensors, to / "model.safetensors", metadata={"format": "pt"})
    return to


def edit_json(path, edit) -> None:
    values = json.loads(path.read_text())
    edit(values)
    path.write_text(json.dumps(values))


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_text_logits_match_the_multimodal_model(gemma3, backend):
    hf, folder = gemma3
    model, _ = load_pretrained(folder, kernels=backend, device="cpu", tokenizer=False)
    assert set(model.backends.values()) == {backend}
    for field, value in EXPECTED_FIELDS.items():
        assert getattr(model.config, field) == value, field
    # The Triton interpreter is slow: 20 tokens still run past the window of 8.
    ids = token_ids(seq=20, batch=1) if backend == "triton" else token_ids(SEQ)
    assert_close(logits(model, ids), logits(hf, ids), atol=ATOL, rtol=RTOL, name=f"gemma3 {backend}")


def test_absent_text_config_fields_take_gemma3_text_config_defaults(gemma3, tmp_path):
    """A text_config as terse as those on the Hub: transformers and scratchlm both read the model it was saved from."""
    hf, folder = gemma3
    minimal = copy_folder(folder, tmp_path / "minimal")
    edit_json(minimal / "config.json", lambda values: values.update(text_config=MINIMAL_TEXT_CONFIG))
    edit_json(minimal / "config.json", lambda values: values.pop("tie_word_embeddings"))
    theirs = transformers.Gemma3ForConditionalGeneration.from_pretrained(
        minimal, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    model, _ = load_pretrained(minimal, kernels="reference", device="cpu", tokenizer=False)
    for field, value in EXPECTED_FIELDS.items():
        assert getattr(model.config, field) == value, field
    ids = token_ids(SEQ)
    assert_close(logits(theirs, ids), logits(hf, ids), atol=ATOL, rtol=RTOL, name="transformers, minimal config")
    assert_close(logits(model, ids), logits(hf, ids), atol=ATOL, rtol=RTOL, name="scratchlm, minimal config")


def test_in_memory_tensor_names_load_too(gemma3, tmp_path):
    """model.language_model.* / model.vision_tower.* (transformers' module names since 4.52) as well as the
    language_model.model.* it writes: transformers reads both, and so does scratchlm."""
    hf, folder = gemma3
    stored = stored_tensors(folder)
    assert any(name.startswith("language_model.model.") for name in stored)

    def in_memory(name: str) -> str:
        if name.startswith("language_model.model."):
            return "model.language_model." + name.removeprefix("language_model.model.")
        return "model." + name  # vision_tower.*, multi_modal_projector.*

    renamed = one_file_folder(folder, tmp_path / "renamed", {in_memory(k): v for k, v in stored.items()})
    theirs = transformers.Gemma3ForConditionalGeneration.from_pretrained(
        renamed, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    model, _ = load_pretrained(renamed, kernels="reference", device="cpu", tokenizer=False)
    ids = token_ids(SEQ)
    assert_close(logits(theirs, ids), logits(hf, ids), atol=ATOL, rtol=RTOL, name="transformers, renamed")
    assert_close(logits(model, ids), logits(hf, ids), atol=ATOL, rtol=RTOL, name="scratchlm, renamed")


def test_the_vision_tensors_are_never_read(gemma3, monkeypatch):
    """Every tensor read is the language model's: the tower and projector stay on disk (their headers aside)."""
    import safetensors

    _, folder = gemma3
    read = []
    opener = safetensors.safe_open

    class Recording:
        def __init__(self, *args, **kwargs):
            self.file = opener(*args, **kwargs)

        def __enter__(self):
            self.file.__enter__()
            return self

        def __exit__(self, *exc):
            return self.file.__exit__(*exc)

        def get_tensor(self, name):
            read.append(name)
            return self.file.get_tensor(name)

        def __getattr__(self, name):  # keys, get_slice: headers only
            return getattr(self.file, name)

    monkeypatch.setattr(safetensors, "safe_open", Recording)
    load_pretrained(folder, kernels="reference", device="cpu", tokenizer=False)
    stored = set(stored_tensors(folder))
    assert sorted(read) == sorted(name for name in stored if name.startswith("language_model.model."))
    assert any(name.startswith("vision_tower.") for name in stored)
    assert any(name.startswith("multi_modal_projector.") for name in stored)


def test_export_writes_a_gemma3_text_folder_transformers_loads(gemma3, tmp_path):
    hf, folder = gemma3
    model, _ = load_pretrained(folder, kernels="reference", device="cpu", tokenizer=False)
    exported = export_hf(model, None, tmp_path / "export")
    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["architectures"] == ["Gemma3ForCausalLM"]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32,
                                                               attn_implementation="eager").eval()  # fmt: skip
    assert type(theirs).__name__ == "Gemma3ForCausalLM"
    ids = token_ids(SEQ)
    assert_close(logits(theirs, ids), logits(hf, ids), atol=ATOL, rtol=RTOL, name="exported gemma3_text")
    assert read_pretrained_config(exported) == model.config == read_pretrained_config(folder)


def test_a_terse_gemma3_text_config_takes_the_same_defaults(gemma3, tmp_path):
    """The defaults belong to the gemma3_text family, not only to text_config: the exported folder with its config
    cut to MINIMAL_TEXT_CONFIG is the same model to transformers' Gemma3ForCausalLM and to scratchlm."""
    hf, folder = gemma3
    model, _ = load_pretrained(folder, kernels="reference", device="cpu", tokenizer=False)
    terse = export_hf(model, None, tmp_path / "terse")
    (terse / "config.json").write_text(json.dumps({**MINIMAL_TEXT_CONFIG, "architectures": ["Gemma3ForCausalLM"]}))
    assert read_pretrained_config(terse) == model.config
    theirs = transformers.Gemma3ForCausalLM.from_pretrained(terse, dtype=torch.float32,
                                                            attn_implementation="eager").eval()  # fmt: skip
    ids = token_ids(SEQ)
    assert_close(logits(theirs, ids), logits(hf, ids), atol=ATOL, rtol=RTOL, name="transformers, terse gemma3_text")


def test_cli_generate_reads_the_folder_and_its_tokenizer(gemma3, capsys):
    hf, folder = gemma3
    prompt = "the theory of th"
    expected = prompt + TOKENIZER.decode(hf_greedy(hf, TOKENIZER.encode(prompt), 12)) + "\n"
    capsys.readouterr()
    args = ["--prompt", prompt, "--max_tokens", "12", "--temperature", "0", "--device", "cpu", "--kernels", "torch"]
    assert main(["generate", "--checkpoint", str(folder), *args]) == 0
    assert capsys.readouterr().out == expected


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda v: v["text_config"].update(hidden_activation="gelu"), r"text_config of .*hidden_activation='gelu'"),
        (lambda v: v["text_config"].update(use_bidirectional_attention=True),
         r"text_config of .*use_bidirectional_attention"),
        (lambda v: v["text_config"].update(attention_bias=True), r"text_config of .*attention_bias"),
        (lambda v: v["text_config"].update(model_type="gemma2"), r"text_config.model_type='gemma2'"),
        (lambda v: v.pop("text_config"), r"text_config=None.*vision tower"),
        (lambda v: v.update(architectures=["Gemma3ForCausalLM"]), r"architectures=\['Gemma3ForCausalLM'\]"),
        (lambda v: v.update(quantization_config={"quant_method": "bitsandbytes"}), r"quant_method='bitsandbytes'"),
        # transformers 5 unties by the top-level flag, whatever text_config says: then the file lacks an lm_head.
        (lambda v: v.update(tie_word_embeddings=False), r"lacks the tensor for 'lm_head.weight'"),
    ],
)  # fmt: skip
def test_refusals_name_the_field(gemma3, tmp_path, edit, match):
    _, folder = gemma3
    broken = copy_folder(folder, tmp_path / "broken")
    edit_json(broken / "config.json", edit)
    with pytest.raises(PretrainedFormatError, match=match):
        load_pretrained(broken, device="cpu", tokenizer=False)


def test_a_tensor_of_neither_part_is_refused_by_name(gemma3, tmp_path):
    _, folder = gemma3
    extra = {"language_model.model.layers.0.mlp.extra_proj.weight": torch.zeros(2, 2)}
    broken = one_file_folder(folder, tmp_path / "broken", {**stored_tensors(folder), **extra})
    with pytest.raises(PretrainedFormatError, match=r"'language_model\.model\.layers\.0\.mlp\.extra_proj\.weight'"):
        load_pretrained(broken, device="cpu", tokenizer=False)
