"""A run's metrics: ``metrics.jsonl`` always, TensorBoard event files when tensorboard is installed.

Each line of ``metrics.jsonl`` is one JSON object, one of:
    a training step  {"step", "loss", "lr", "grad_norm", "ms_per_step", "tokens_per_s"[, "mfu"]}
    a skipped step   {"step", "skipped": reason, "skipped_steps"}   (step = steps applied so far)
    an evaluation    {"step", "val_loss"}

TensorBoard gets the same numbers as scalars (train/loss, train/lr, ...,
val/loss) under ``output_dir/tensorboard``; ``scratchlm plot`` draws them from
the JSONL file without TensorBoard.
"""

from __future__ import annotations

import json
from pathlib import Path

from scratchlm.atomic import NoSpaceLeftError, atomic_write, disk_full_cause

METRICS_NAME = "metrics.jsonl"
_TRAIN_SCALARS = ("loss", "lr", "grad_norm", "ms_per_step", "tokens_per_s", "mfu")


def read_metrics(path: str | Path) -> list[dict]:
    """Every record of a metrics.jsonl file; a line torn by a crash is skipped."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _summary_writer(log_dir: Path):
    """TensorBoard's writer, or None when the tensorboard package is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(log_dir))


class MetricsLog:
    """Appends records to ``metrics.jsonl`` (and TensorBoard); opened by rank 0 only.

    On resume from step ``resume_step``, lines the resumed run will write
    again are dropped first: a run that crashed between checkpoints logged
    steps it now retakes, and it re-measures validation loss at its first
    step, so keeping both would give the history two step 57s.
    """

    def __init__(self, output_dir: Path, resume_step: int | None, *, tensorboard: bool = True):
        self.path = output_dir / METRICS_NAME
        if resume_step is None or not self.path.exists():
            self.path.write_text("", encoding="utf-8")
        else:
            kept = [
                json.dumps(record) + "\n"
                for record in read_metrics(self.path)
                if record.get("step", 0) < resume_step
                or (record.get("step") == resume_step and "loss" in record and "skipped" not in record)
            ]
            with atomic_write(self.path, "w", encoding="utf-8") as f:
                f.write("".join(kept))
        # Line buffering: every record reaches the file as soon as it is written.
        self._file = open(self.path, "a", encoding="utf-8", buffering=1)
        self._tensorboard = _summary_writer(output_dir / "tensorboard") if tensorboard else None

    def write(self, record: dict) -> None:
        try:
            self._file.write(json.dumps(record) + "\n")
        except OSError as e:
            if disk_full_cause(e) is not None:
                raise NoSpaceLeftError(self.path) from e
            raise
        if self._tensorboard is None:
            return
        step = record["step"]
        if "val_loss" in record:
            self._tensorboard.add_scalar("val/loss", record["val_loss"], step)
        for name in _TRAIN_SCALARS:
            if name in record and "skipped" not in record:
                self._tensorboard.add_scalar(f"train/{name}", record[name], step)
        if "skipped" in record:
            self._tensorboard.add_scalar("train/skipped_steps", record["skipped_steps"], step)

    def close(self) -> None:
        self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def format_step(record: dict, total_steps: int) -> str:
    """The human log line: step, loss, lr, grad norm, ms/step, tokens/s and (when known) MFU."""
    parts = [
        f"step {record['step']}/{total_steps}",
        f"loss {record['loss']:.4f}",
        f"lr {record['lr']:.2e}",
        f"grad norm {record['grad_norm']:.3f}",
        f"{record['ms_per_step']:.1f} ms/step",
        f"{record['tokens_per_s']:,.0f} tok/s",
    ]
    if "mfu" in record:
        parts.append(f"MFU {100 * record['mfu']:.1f}%")
    return " | ".join(parts)
