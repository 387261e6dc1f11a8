"""Qwen2, Qwen3, Mistral, Gemma 2 and Gemma 3 through the command line: generate, convert and fine-tune (--init_from).

The models are tiny ones built by transformers itself (tests/llama_fixtures.py),
with the tiny byte-level tokenizer saved beside them.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import assert_close
from llama_fixtures import SAMPLE_TEXT, TOKENIZER, hf_model, save_hf_folder

from scratchlm.cli import main
from scratchlm.model import load_pretrained
from scratchlm.train import read_checkpoint

transformers = pytest.importorskip("transformers", reason="transformers builds the reference models")

PROMPT = "the theory of th"
GREEDY = ["--prompt", PROMPT, "--max_tokens", "12", "--temperature", "0", "--device", "cpu", "--kernels", "torch"]

MODELS = {
    # Windows of 4 on layers 1 and 2: the prompt plus 12 new tokens runs well past them.
    "qwen2": dict(num_hidden_layers=3, num_key_value_heads=2, use_sliding_window=True, sliding_window=4,
                  max_window_layers=1, tie_word_embeddings=True),
    "qwen3": dict(num_key_value_heads=1, head_dim=32),
    "mistral": dict(num_key_value_heads=2, sliding_window=4),
    # Gemma: soft-caps, post-norms, GeGLU, a window of 4 on alternate layers (Gemma 2) or 2 of 3 (Gemma 3).
    "gemma2": dict(num_hidden_layers=3, head_dim=16, sliding_window=4, query_pre_attn_scalar=16,
                   attn_logit_softcapping=5.0, final_logit_softcapping=8.0),
    "gemma3_text": dict(num_hidden_layers=3, num_key_value_heads=1, head_dim=16, sliding_window=4,
                        query_pre_attn_scalar=16, layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
}  # fmt: skip


def _expected_greedy(hf) -> str:
    prompt = TOKENIZER.encode(PROMPT)
    with torch.no_grad():
        ids = hf.generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=12, min_new_tokens=12, eos_token_id=None,
            pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        )  # fmt: skip
    return PROMPT + TOKENIZER.decode(ids[0, len(prompt) :].tolist()) + "\n"


def _greedy_text(capsys, checkpoint) -> str:
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(checkpoint), *GREEDY]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("model_type", list(MODELS))
def test_generate_and_convert_both_ways(model_type, tmp_path, capsys):
    hf = hf_model(model_type, seed=21, **MODELS[model_type])
    folder = save_hf_folder(hf, tmp_path / "hf")
    expected = _expected_greedy(hf)
    assert _greedy_text(capsys, folder) == expected
    assert main(["convert", str(folder), str(tmp_path / "model.pt")]) == 0
    assert _greedy_text(capsys, tmp_path / "model.pt") == expected
    assert main(["convert", str(tmp_path / "model.pt"), str(tmp_path / "exported")]) == 0
    assert json.loads((tmp_path / "exported" / "config.json").read_text())["model_type"] == model_type
    assert _greedy_text(capsys, tmp_path / "exported") == expected


def _fine_tune(tmp_path, model_type: str, seed: int, checkpoint_interval: int):
    """train --init_from a tiny HF model for 4 steps (torch kernels); the run folder, its val loss checked to fall."""
    hf = hf_model(model_type, seed=seed, **MODELS[model_type])
    folder = save_hf_folder(hf, tmp_path / "hf")
    ids = np.array(TOKENIZER.encode(SAMPLE_TEXT * 30), dtype=np.uint16)
    np.save(tmp_path / "ids.npy", ids)
    args = [
        "train", "--init_from", str(folder),
        "--train_data_path", str(tmp_path / "ids.npy"), "--val_data_path", str(tmp_path / "ids.npy"),
        "--context_length", "24", "--batch_size", "4", "--total_iters", "4", "--learning_rate", "3e-3",
        "--eval_interval", "2", "--eval_batches", "2", "--checkpoint_interval", str(checkpoint_interval),
        "--output_dir", str(tmp_path / "run"), "--device", "cpu", "--kernels", "torch",
    ]  # fmt: skip
    assert main(args) == 0
    run = tmp_path / "run"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val_losses = [m["val_loss"] for m in metrics if "val_loss" in m]
    assert val_losses[-1] < val_losses[0]
    return run


def _export_and_compare(run, tmp_path, name: str):
    """convert the run to an HF folder; transformers' model of it (returned) gives the run's logits."""
    exported = tmp_path / "exported"
    assert main(["convert", str(run), str(exported)]) == 0
    ours, tokenizer = load_pretrained(run, kernels="reference", device="cpu")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(exported, attn_implementation="eager").eval()
    prompt = torch.tensor([tokenizer.encode(SAMPLE_TEXT)[:20]])
    with torch.no_grad():
        assert_close(theirs(prompt).logits, ours(prompt), atol=1e-4, rtol=1e-4, name=name)
    return theirs


def test_fine_tune_a_qwen2_with_windows_resume_and_export(tmp_path):
    run = _fine_tune(tmp_path, "qwen2", seed=22, checkpoint_interval=2)
    stored = read_checkpoint(run / "checkpoint_00000004.pt")["model_config"]
    assert (stored["qkv_bias"], stored["sliding_window"], stored["sliding_window_layers"]) == (True, 4, [1, 2])
    assert main(["train", "--config", str(run / "train_config.json"), "--resume", "--total_iters", "6"]) == 0
    theirs = _export_and_compare(run, tmp_path, "fine-tuned logits")
    assert theirs.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]


def test_fine_tune_a_gemma2_and_export(tmp_path):
    """--init_from a Gemma 2: the capped loss trains it, the checkpoint keeps its fields, export gives transformers it."""
    run = _fine_tune(tmp_path, "gemma2", seed=23, checkpoint_interval=4)
    stored = read_checkpoint(run / "checkpoint_00000004.pt")["model_config"]
    assert (stored["final_softcap"], stored["norm_offset"], stored["mlp_activation"]) == (8.0, 1.0, "gelu_tanh")
    theirs = _export_and_compare(run, tmp_path, "fine-tuned Gemma 2 logits")
    assert theirs.config.model_type == "gemma2" and theirs.config.final_logit_softcapping == 8.0
