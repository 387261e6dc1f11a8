"""export_hf: transformers loads the folder with the same logits, ids and greedy tokens; round trips are bitwise."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import assert_close
from llama_fixtures import LLAMA3_SCALING, SAMPLE_TEXT, TOKENIZER, VOCAB_SIZE, hf_greedy, hf_llama, save_hf_folder

import scratchlm.model.hf_export as hf_export
from scratchlm.model import ModelConfig, TransformerLM, export_hf, generate_ids, load_pretrained
from scratchlm.model.safetensors_writer import SafetensorsStreamWriter

transformers = pytest.importorskip("transformers")

ATOL, RTOL = 1e-4, 1e-4


def scratch_model(seed: int = 0, **overrides) -> TransformerLM:
    values = dict(vocab_size=VOCAB_SIZE, context_length=64, d_model=64, num_layers=2, num_heads=4, d_ff=96,
                  rope_theta=20000.0, num_kv_heads=2, norm_eps=1e-6)  # fmt: skip
    torch.manual_seed(seed)
    model = TransformerLM(ModelConfig(**{**values, **overrides}), kernels="reference", device="cpu").eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("ln1.weight", "ln2.weight", "ln_final.weight")):
                param.copy_(1 + 0.5 * torch.randn_like(param))
    return model


VARIANTS = {
    "gqa-untied": dict(),
    "mqa-tied": dict(num_kv_heads=1, tie_embeddings=True),
    "llama3-scaling": dict(rope_scaling=LLAMA3_SCALING),
}


def transformers_model(folder):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def token_ids(seq: int = 24) -> torch.Tensor:
    return torch.randint(0, VOCAB_SIZE, (2, seq), generator=torch.Generator().manual_seed(9))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_transformers_gives_the_same_logits_and_greedy_tokens(variant, tmp_path):
    model = scratch_model(**VARIANTS[variant])
    folder = export_hf(model, TOKENIZER, tmp_path / "export")
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"
    ]  # fmt: skip
    hf_model = transformers_model(folder)
    assert hf_model.config.tie_word_embeddings == model.config.tie_embeddings
    ids = token_ids()
    with torch.no_grad():
        assert_close(model(ids), hf_model(ids).logits, atol=ATOL, rtol=RTOL, name=f"{variant} logits")
    prompt = TOKENIZER.encode(SAMPLE_TEXT)[:6]
    ours = [step[0] for step in generate_ids(model, [prompt], 10, temperature=0)]
    assert ours == hf_greedy(hf_model, prompt, 10)


def test_auto_tokenizer_gives_the_same_ids(tmp_path):
    folder = export_hf(scratch_model(), TOKENIZER, tmp_path / "export")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    text = SAMPLE_TEXT + "<|end_of_text|> and héllo, 世界!"
    assert tokenizer(text)["input_ids"] == TOKENIZER.encode(text)
    assert tokenizer.decode(TOKENIZER.encode(text)) == text
    config = json.loads((folder / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (TOKENIZER.bos_id, TOKENIZER.eos_id)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (TOKENIZER.bos_id, TOKENIZER.eos_id)
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["hidden_act"] == "silu" and config["head_dim"] == 16 and config["num_key_value_heads"] == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_export_then_load_pretrained_is_bitwise(variant, dtype, tmp_path):
    model = scratch_model(**VARIANTS[variant]).to(dtype)
    folder = export_hf(model, TOKENIZER, tmp_path / "export")
    back, tokenizer = load_pretrained(folder, kernels="reference", device="cpu")
    assert back.config == model.config
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert theirs[name].dtype == dtype and torch.equal(ours[name], theirs[name]), name
    assert tokenizer.encode(SAMPLE_TEXT) == TOKENIZER.encode(SAMPLE_TEXT)


def test_hf_folder_to_scratchlm_and_back_gives_the_original_tensors(tmp_path):
    """HF -> load_pretrained -> export_hf reproduces transformers' own files: the q/k reorders are inverses."""
    from safetensors.torch import load_file

    original = save_hf_folder(hf_llama(seed=2, num_key_value_heads=2), tmp_path / "original")
    model, tokenizer = load_pretrained(original, kernels="reference", device="cpu")
    exported = export_hf(model, tokenizer, tmp_path / "exported")
    before, after = load_file(original / "model.safetensors"), load_file(exported / "model.safetensors")
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name


def test_without_a_tokenizer_only_the_model_files_are_written(tmp_path):
    folder = export_hf(scratch_model(), None, tmp_path / "export")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    assert load_pretrained(folder, kernels="reference", device="cpu")[1] is None


def test_stream_writer_files_read_back_with_safetensors(tmp_path):
    from safetensors.torch import load_file

    tensors = {
        "b": torch.randn(3, 5).to(torch.bfloat16),
        "a": torch.randn(7),
        "h": torch.randn(2, 2, 2).half(),
        "i": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "empty": torch.zeros(0, 4),
    }
    path = tmp_path / "t.safetensors"
    with open(path, "wb") as file:
        writer = SafetensorsStreamWriter(file, [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()], {"k": "v"})
        with pytest.raises(ValueError, match="wrote tensor 'a'; expected 'b' next"):
            writer.write("a", tensors["a"])
        for name, tensor in tensors.items():
            writer.write(name, tensor)
        writer.close()
    back = load_file(path)
    assert back.keys() == tensors.keys()
    for name in tensors:
        assert back[name].dtype == tensors[name].dtype and torch.equal(back[name], tensors[name]), name
    with open(tmp_path / "short.safetensors", "wb") as file:
        writer = SafetensorsStreamWriter(file, [("x", torch.float32, (2,))])
        with pytest.raises(ValueError, match="declared torch.float32"):
            writer.write("x", torch.zeros(3))
        with pytest.raises(ValueError, match="ended before tensors"):
            writer.close()


# ---- atomicity -----------------------------------------------------------------


def test_non_empty_out_dir_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="exists and is not empty; pass overwrite=True"):
        export_hf(scratch_model(), TOKENIZER, out)
    assert [p.name for p in out.iterdir()] == ["config.json"]
    export_hf(scratch_model(), TOKENIZER, out, overwrite=True)
    assert (out / "config.json").read_text() != "{}" and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temporary siblings left


def test_overwrite_never_deletes_files_an_export_does_not_write(tmp_path):
    out = tmp_path / "export"
    export_hf(scratch_model(), TOKENIZER, out)
    (out / "keep.txt").write_text("mine")
    (out / "model.safetensors.index.json").write_text("{}")  # another model's shard index
    with pytest.raises(ValueError, match=r"holds keep\.txt, model\.safetensors\.index\.json, which an export does not write"):
        export_hf(scratch_model(), TOKENIZER, out, overwrite=True)
    assert (out / "keep.txt").read_text() == "mine"


def test_a_failure_leaves_no_half_written_folder(tmp_path, monkeypatch):
    def broken(model, path):
        path.write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(hf_export, "_write_weights", broken)
    with pytest.raises(OSError, match="disk full"):
        export_hf(scratch_model(), TOKENIZER, tmp_path / "export")
    assert list(tmp_path.iterdir()) == []

    previous = tmp_path / "previous"
    previous.mkdir()
    (previous / "config.json").write_text("{}")
    with pytest.raises(OSError, match="disk full"):
        export_hf(scratch_model(), TOKENIZER, previous, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["previous"]
    assert (previous / "config.json").read_text() == "{}"
