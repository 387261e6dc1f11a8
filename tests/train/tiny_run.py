"""A tiny training run's settings and data, shared by the training tests."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np

from scratchlm.tokenizer.token_file import write_token_file
from scratchlm.train import TrainConfig
from scratchlm.train.trainer import Trainer

VOCAB = 64
CONTEXT = 16


def tiny_config(tmp_path: Path, **overrides) -> TrainConfig:
    """20 steps of a 2-layer, d_model 32 model on a learnable random walk over 64 ids, on the CPU."""
    rng = np.random.default_rng(0)
    # A learnable stream: a random walk over ids, so the next id is predictable but not trivial.
    ids = np.cumsum(rng.integers(1, 4, size=3000)) % VOCAB
    train_path = write_token_file(tmp_path / "train.npy", ids[:2500], VOCAB)
    val_path = write_token_file(tmp_path / "val.npy", ids[2500:], VOCAB)
    settings = dict(
        train_data_path=str(train_path),
        val_data_path=str(val_path),
        vocab_size=VOCAB,
        context_length=CONTEXT,
        d_model=32,
        num_layers=2,
        num_heads=4,
        d_ff=64,
        total_iters=20,
        output_dir=str(tmp_path / "run"),
        batch_size=4,
        learning_rate=1e-2,
        warmup_iters=2,
        eval_interval=5,
        eval_batches=2,
        checkpoint_interval=10,
        device="cpu",
        kernels="reference",
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def read_run_metrics(run_dir: str | Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def crash_at_step(monkeypatch, call: int) -> None:
    """Make the ``call``-th ``Trainer.train_step`` from now raise KeyboardInterrupt (a crash mid-run)."""
    real_step = Trainer.train_step
    calls = {"n": 0}

    def crash(self, data, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt("simulated crash")
        return real_step(self, data, **kwargs)

    monkeypatch.setattr(Trainer, "train_step", crash)


class DiskFillsUp:
    """A binary file object over ``file`` that takes ``room`` more bytes, then fails as a full disk does.

    The bytes that fit are written, so a half-written file is really left
    behind for the code under test to clean up.
    """

    def __init__(self, file, room: int):
        self.file, self.room = file, room

    def write(self, data) -> int:
        if len(data) > self.room:
            self.file.write(bytes(data[: self.room]))
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()
