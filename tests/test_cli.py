"""The `scratchlm` command end to end: tokenizer -> token files -> train -> generate, and the demo."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from scratchlm.cli import main
from scratchlm.tokenizer import Tokenizer

TEXT = (
    "The quick brown fox jumps over the lazy dog. A stitch in time saves nine.<|endoftext|>"
    "Pack my box with five dozen liquor jugs. Über café — 你好, 世界!<|endoftext|>"
) * 40


@pytest.fixture
def pipeline(tmp_path):
    """Run tokenizer train, tokenize and a short train through the CLI; return the paths."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    tok = tmp_path / "tok.json"
    assert main(["tokenizer", "train", "--input", str(corpus), "--vocab_size", "300", "--output", str(tok)]) == 0
    ids = tmp_path / "ids.npy"
    assert main(["tokenize", "--tokenizer", str(tok), "--input", str(corpus), "--output", str(ids)]) == 0
    run = tmp_path / "run"
    train_args = [
        "train", "--train_data_path", str(ids), "--val_data_path", str(ids), "--vocab_size", "300",
        "--context_length", "16", "--d_model", "32", "--num_layers", "1", "--num_heads", "2", "--d_ff", "64",
        "--batch_size", "4", "--total_iters", "3", "--eval_interval", "3", "--eval_batches", "2",
        "--output_dir", str(run), "--device", "cpu",
    ]
    assert main(train_args) == 0
    return {"corpus": corpus, "tokenizer": tok, "ids": ids, "run": run, "train_args": train_args}


def test_tokenize_writes_the_ids_of_the_saved_tokenizer(pipeline):
    tokenizer = Tokenizer.load(pipeline["tokenizer"])
    assert tokenizer.vocab_size == 300
    assert np.load(pipeline["ids"]).tolist() == tokenizer.encode(TEXT)


def test_generate_streams_a_seeded_continuation(pipeline, capsys):
    args = [
        # A run folder stands for its newest checkpoint.
        "generate", "--checkpoint", str(pipeline["run"]), "--tokenizer", str(pipeline["tokenizer"]),
        "--prompt", "The quick", "--max_tokens", "12", "--seed", "3", "--device", "cpu",
    ]
    capsys.readouterr()
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    second = capsys.readouterr().out
    assert first.startswith("The quick") and len(first) > len("The quick\n")
    assert first == second, "the same seed must give the same sample"


def test_unknown_kernels_fails_before_training(pipeline, tmp_path, capsys):
    args = [a if a != str(pipeline["run"]) else str(tmp_path / "other") for a in pipeline["train_args"]]
    assert main([*args, "--kernels", "cuda-magic"]) == 2
    assert "cuda-magic" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


def test_tokenize_missing_tokenizer_is_a_clear_error(tmp_path, capsys):
    args = ["tokenize", "--tokenizer", str(tmp_path / "nope.json"), "--input", str(tmp_path / "x.txt"), "--output", str(tmp_path / "o.npy")]
    assert main(args) == 2
    assert "nope.json" in capsys.readouterr().err
    assert not (tmp_path / "o.npy").exists()


def test_demo_runs_end_to_end_and_reports_its_last_line(tmp_path):
    """A shortened demo (the full one is `make demo`); the last line's format is part of the contract."""
    result = subprocess.run(
        [sys.executable, "-m", "scratchlm", "demo", "--output_dir", str(tmp_path / "demo"), "--total_iters", "4",
         "--vocab_size", "512", "--batch_size", "4", "--context_length", "32", "--max_tokens", "5", "--device", "cpu"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    last = result.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"demo: val loss (\d+\.\d+) -> (\d+\.\d+), checkpoint at (.+)", last)
    assert match, last
    before, after, checkpoint = float(match[1]), float(match[2]), match[3]
    assert after < before
    assert checkpoint == str(tmp_path / "demo" / "run" / "checkpoint_00000004.pt") and Path(checkpoint).is_file()


# ---------------------------------------------------------------- one writer per destination

# Holds the lock named by argv[1] ("convert DST" or "train RUN_DIR") as that command would, until killed.
LOCK_HOLDER = """
import sys, time
from pathlib import Path
from scratchlm.convert import destination_lock
from scratchlm.folder_lock import RUN_LOCK_NAME, FolderLock

what, path = sys.argv[1], Path(sys.argv[2])
if what == "convert":
    destination_lock(path)
else:
    FolderLock(path / RUN_LOCK_NAME, "--output_dir", "scratchlm train").acquire()
print("locked", flush=True)
time.sleep(600)
"""


def _hold_lock(what: str, path: Path) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, what, str(path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


@pytest.fixture
def small_checkpoint(tmp_path) -> Path:
    from scratchlm.model import TransformerLM
    from scratchlm.train import AdamW, save_checkpoint

    model = TransformerLM(vocab_size=64, context_length=16, d_model=32, num_layers=1, num_heads=2, d_ff=64)
    save_checkpoint(model, AdamW(model.parameters(), lr=1e-3), 0, tmp_path / "src.pt")
    return tmp_path / "src.pt"


def test_convert_refuses_a_destination_another_convert_is_writing(tmp_path, small_checkpoint, capsys):
    dst = tmp_path / "out.pt"
    holder = _hold_lock("convert", dst)
    try:
        assert main(["convert", str(small_checkpoint), str(dst)]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith(f"scratchlm convert: error: DST {str(dst)!r} is in use by scratchlm convert (pid {holder.pid} ")
        assert not dst.exists()
    finally:
        holder.kill()
        holder.wait(timeout=60)
    # Its holder gone (killed, even), the destination is free.
    assert main(["convert", str(small_checkpoint), str(dst)]) == 0
    assert dst.is_file()


def test_convert_over_a_live_training_run_is_refused(tmp_path, small_checkpoint):
    from scratchlm import convert
    from scratchlm.cli import build_parser
    from scratchlm.folder_lock import FolderInUseError

    run = tmp_path / "run"
    holder = _hold_lock("train", run)
    try:
        args = build_parser().parse_args(["convert", str(small_checkpoint), str(run), "--overwrite"])
        with pytest.raises(FolderInUseError, match=rf"in use by scratchlm train \(pid {holder.pid} "):
            convert.run(args)
        assert [p.name for p in run.iterdir()] == [".scratchlm.lock"], "the run's folder was not replaced"
    finally:
        holder.kill()
        holder.wait(timeout=60)
