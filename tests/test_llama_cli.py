"""Bring your own Llama, through the command line: generate, convert, tokenize and fine-tune (--init_from).

The models are tiny Llamas built by transformers itself (tests/llama_fixtures.py).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import assert_close
from llama_fixtures import SAMPLE_TEXT, TOKENIZER, hf_llama, save_hf_folder, write_gguf

from scratchlm.cli import main
from scratchlm.model import load_pretrained
from scratchlm.train import read_checkpoint

transformers = pytest.importorskip("transformers", reason="transformers builds the reference models")

GREEDY = ["--prompt", "the th", "--max_tokens", "6", "--temperature", "0", "--device", "cpu", "--kernels", "reference"]


@pytest.fixture(scope="module")
def hf_model():
    return hf_llama(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=50000.0)


@pytest.fixture
def hf_dir(tmp_path, hf_model):
    return save_hf_folder(hf_model, tmp_path / "hf")


def _greedy_text(capsys, checkpoint, *extra) -> str:
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(checkpoint), *GREEDY, *extra]) == 0
    return capsys.readouterr().out


def _expected_greedy(hf_model) -> str:
    prompt = TOKENIZER.encode("the th")
    with torch.no_grad():
        ids = hf_model.generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=6, min_new_tokens=6, eos_token_id=None,
            pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        )  # fmt: skip
    return "the th" + TOKENIZER.decode(ids[0, len(prompt) :].tolist()) + "\n"


def test_generate_reads_the_model_and_tokenizer_from_every_format(tmp_path, hf_dir, hf_model, capsys):
    expected = _expected_greedy(hf_model)
    assert _greedy_text(capsys, hf_dir) == expected
    gguf_file = write_gguf(hf_model, tmp_path / "tiny.gguf", "F32")
    assert _greedy_text(capsys, gguf_file) == expected
    assert main(["convert", str(hf_dir), str(tmp_path / "tiny.pt")]) == 0
    assert _greedy_text(capsys, tmp_path / "tiny.pt") == expected
    # --tokenizer overrides the one the checkpoint carries (here with the same one, as an HF file).
    assert _greedy_text(capsys, tmp_path / "tiny.pt", "--tokenizer", str(hf_dir / "tokenizer.json")) == expected


def test_generate_needs_a_tokenizer_from_somewhere(tmp_path, hf_model, capsys):
    folder = save_hf_folder(hf_model, tmp_path / "bare", tokenizer=None)
    assert main(["generate", "--checkpoint", str(folder), *GREEDY]) == 2
    assert "carries no tokenizer; pass --tokenizer" in capsys.readouterr().err
    TOKENIZER.save(tmp_path / "tok.json")
    assert _greedy_text(capsys, folder, "--tokenizer", str(tmp_path / "tok.json")) == _expected_greedy(hf_model)


def test_convert_gguf_to_checkpoint_keeps_weights_and_tokenizer(tmp_path, hf_model):
    gguf_file = write_gguf(hf_model, tmp_path / "tiny.gguf", "Q8_0")
    out = tmp_path / "tiny.pt"
    assert main(["convert", str(gguf_file), str(out)]) == 0
    payload = read_checkpoint(out)
    assert payload["extra"]["tokenizer"] == TOKENIZER.to_document()
    converted, tokenizer = load_pretrained(out, kernels="reference", device="cpu")
    original, _ = load_pretrained(gguf_file, kernels="reference", device="cpu")
    for (name, a), b in zip(converted.state_dict().items(), original.state_dict().values()):
        assert torch.equal(a, b), name
    assert tokenizer.encode(SAMPLE_TEXT) == TOKENIZER.encode(SAMPLE_TEXT)
    # DST exists: refused unless --overwrite.
    assert main(["convert", str(gguf_file), str(out)]) == 2
    assert main(["convert", str(gguf_file), str(out), "--overwrite", "--dtype", "bfloat16"]) == 0
    assert {t.dtype for t in read_checkpoint(out)["model"].values()} == {torch.bfloat16}


def _finetune_args(tmp_path, init_from, total_iters=4, *extra):
    return [
        "train", "--init_from", str(init_from),
        "--train_data_path", str(tmp_path / "ids.npy"), "--val_data_path", str(tmp_path / "ids.npy"),
        "--context_length", "24", "--batch_size", "4", "--total_iters", str(total_iters), "--learning_rate", "3e-3",
        "--eval_interval", "2", "--eval_batches", "2", "--checkpoint_interval", "2", "--output_dir", str(tmp_path / "run"),
        "--device", "cpu", "--kernels", "reference", *extra,
    ]  # fmt: skip


@pytest.fixture
def token_file(tmp_path, hf_dir):
    """The sample text encoded with the model's own tokenizer, through `scratchlm tokenize`."""
    (tmp_path / "text.txt").write_text(SAMPLE_TEXT * 40, encoding="utf-8")
    command = ["tokenize", "--tokenizer", str(hf_dir), "--input", str(tmp_path / "text.txt")]
    assert main([*command, "--output", str(tmp_path / "ids.npy"), "--num_processes", "1"]) == 0
    assert np.load(tmp_path / "ids.npy").tolist() == TOKENIZER.encode(SAMPLE_TEXT * 40)
    return tmp_path / "ids.npy"


def test_finetune_starts_from_the_pretrained_weights_and_exports_to_transformers(tmp_path, hf_dir, hf_model, token_file):
    assert main(_finetune_args(tmp_path, hf_dir)) == 0
    run = tmp_path / "run"
    config = json.loads((run / "train_config.json").read_text())
    # The shape came from the checkpoint; the windows are the 24 tokens asked for.
    assert (config["d_model"], config["num_kv_heads"], config["tie_embeddings"], config["rope_theta"]) == (
        64, 2, True, 50000.0,
    )  # fmt: skip
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val_losses = [m["val_loss"] for m in metrics if "val_loss" in m]
    # Step 0 is the pretrained model itself: its loss on these windows, computed by transformers.
    ids = torch.from_numpy(np.load(token_file).astype(np.int64))
    windows = torch.stack([ids[i : i + 25] for i in range(0, 8 * 25, 25)])
    with torch.no_grad():
        logits = hf_model(windows[:, :-1]).logits
    pretrained_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten())
    assert abs(val_losses[0] - pretrained_loss.item()) < 0.5  # different windows, same model
    assert val_losses[-1] < val_losses[0]
    payload = read_checkpoint(run / "checkpoint_00000004.pt")
    assert payload["model_config"]["num_kv_heads"] == 2 and payload["extra"]["tokenizer"] == TOKENIZER.to_document()
    # Resume without the pretrained folder: the run's checkpoints hold everything.
    for file in hf_dir.iterdir():
        file.unlink()
    hf_dir.rmdir()
    assert main(["train", "--config", str(run / "train_config.json"), "--resume", "--total_iters", "6"]) == 0
    assert read_checkpoint(run / "checkpoint_00000006.pt")["iteration"] == 6
    # The fine-tuned run exports to a folder transformers loads, with the same logits.
    exported = tmp_path / "exported"
    assert main(["convert", str(run), str(exported)]) == 0
    ours, tokenizer = load_pretrained(run, kernels="reference", device="cpu")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    prompt = torch.tensor([tokenizer.encode(SAMPLE_TEXT)[:20]])
    with torch.no_grad():
        assert_close(theirs(prompt).logits, ours(prompt), atol=1e-4, rtol=1e-4, name="fine-tuned logits")


def test_finetune_refuses_flags_that_contradict_the_checkpoint(tmp_path, hf_dir, token_file, capsys):
    for flags, message in [
        (["--d_model", "128"], "--d_model=128 but --init_from"),
        (["--num_kv_heads", "4"], "--num_kv_heads=4 but --init_from"),
        (["--context_length", "65"], "--context_length=65 is longer than --init_from"),
    ]:
        args = _finetune_args(tmp_path, hf_dir)
        if "--context_length" in flags:
            args[args.index("--context_length") + 1] = flags[1]
        else:
            args += flags
        assert main(args) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "run").exists()


def test_finetune_checks_token_ids_against_the_pretrained_vocabulary(tmp_path, hf_dir, capsys):
    np.save(tmp_path / "ids.npy", np.full(100, TOKENIZER.vocab_size, dtype=np.uint16))
    assert main(_finetune_args(tmp_path, hf_dir)) == 2
    assert f"holds id {TOKENIZER.vocab_size}, but vocab_size is {TOKENIZER.vocab_size}" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_given_tokenizer_replaces_one_scratchlm_cannot_read(tmp_path, hf_model, capsys):
    # A Unigram vocabulary (T5-style files): refused alone, fine with --tokenizer beside it.
    gguf_file = write_gguf(hf_model, tmp_path / "unigram.gguf", "F32", tokenizer=None,
                           extra_metadata={"tokenizer.ggml.model": "t5"})  # fmt: skip
    assert main(["generate", "--checkpoint", str(gguf_file), *GREEDY]) == 2
    assert "tokenizer.ggml.model" in capsys.readouterr().err
    TOKENIZER.save(tmp_path / "tok.json")
    assert _greedy_text(capsys, gguf_file, "--tokenizer", str(tmp_path / "tok.json")) == _expected_greedy(hf_model)
    out = tmp_path / "unigram.pt"
    assert main(["convert", str(gguf_file), str(out), "--tokenizer", str(tmp_path / "tok.json")]) == 0
    assert read_checkpoint(out)["extra"]["tokenizer"] == TOKENIZER.to_document()
