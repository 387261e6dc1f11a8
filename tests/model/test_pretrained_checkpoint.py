"""load_pretrained on scratchlm checkpoints: a file or a run folder, with the tokenizer saved in "extra"."""

from __future__ import annotations

import json

import pytest
import torch
from llama_fixtures import SAMPLE_TEXT, TOKENIZER, VOCAB_SIZE

from scratchlm.model import ModelConfig, PretrainedFormatError, TransformerLM, load_pretrained
from scratchlm.model.pretrained import CHECKPOINT_TOKENIZER_KEY, read_pretrained_config
from scratchlm.train.checkpoint import CheckpointError, checkpoint_path, save_checkpoint

CONFIG = dict(vocab_size=VOCAB_SIZE, context_length=32, d_model=64, num_layers=2, num_heads=4, d_ff=96)


def tokenizer_document(tmp_path) -> dict:
    return json.loads(TOKENIZER.save(tmp_path / "tokenizer.json").read_text())


def saved(tmp_path, extra=None, **overrides) -> tuple[TransformerLM, object]:
    model = TransformerLM(ModelConfig(**{**CONFIG, **overrides}), kernels="reference", device="cpu")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    run = tmp_path / "run"
    save_checkpoint(model, optimizer, 7, checkpoint_path(run, 7), extra=extra)
    return model, run


@pytest.mark.parametrize("overrides", [dict(), dict(num_kv_heads=2, tie_embeddings=True, norm_eps=1e-6)])
def test_file_and_run_folder_load_the_same_weights_and_tokenizer(tmp_path, overrides):
    model, run = saved(tmp_path, extra={CHECKPOINT_TOKENIZER_KEY: tokenizer_document(tmp_path)}, **overrides)
    for path in (run, checkpoint_path(run, 7)):
        loaded, tokenizer = load_pretrained(path, kernels="reference", device="cpu")
        assert loaded.config == model.config and not loaded.training
        for name, value in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], value), name
        assert tokenizer.encode(SAMPLE_TEXT) == TOKENIZER.encode(SAMPLE_TEXT)
    if model.config.tie_embeddings:
        assert loaded.lm_head.weight is loaded.token_embeddings.weight
    assert read_pretrained_config(run) == model.config


def test_no_tokenizer_gives_none_and_dtype_converts(tmp_path):
    model, run = saved(tmp_path, extra={"train_config": {"lr": 1.0}})
    loaded, tokenizer = load_pretrained(run, kernels="reference", device="cpu", dtype=torch.bfloat16)
    assert tokenizer is None
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight.to(torch.bfloat16))


def test_bad_tokenizer_entry_and_bad_files_are_refused(tmp_path):
    _, run = saved(tmp_path, extra={CHECKPOINT_TOKENIZER_KEY: "tokenizer.json"})
    with pytest.raises(PretrainedFormatError, match="extra\\['tokenizer'\\] of type str"):
        load_pretrained(run, device="cpu")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="garbage.pt"):
        load_pretrained(garbage, device="cpu")
    with pytest.raises(ValueError, match="dtype=torch.int8"):
        load_pretrained(run, device="cpu", dtype=torch.int8)
