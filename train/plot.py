"""``scratchlm plot``: a run's metrics.jsonl drawn as PNG curves.

Three panels against the optimizer step: training and validation loss, the
learning rate, and throughput (tokens/s, with MFU on a second axis when the
run logged it). Skipped steps are marked on the loss panel. Needs matplotlib.
"""

from __future__ import annotations

import os
from pathlib import Path

from scratchlm.atomic import atomic_write
from scratchlm.train.metrics import METRICS_NAME, read_metrics


def plot_metrics(run: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Draw ``run`` (a run folder or its metrics.jsonl) to ``out`` (default: metrics.png beside it)."""
    run = Path(run)
    metrics_path = run / METRICS_NAME if run.is_dir() else run
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{str(metrics_path)!r} does not exist; expected a run folder or its {METRICS_NAME}")
    records = read_metrics(metrics_path)
    steps = [r for r in records if "loss" in r and "skipped" not in r]
    evals = [r for r in records if "val_loss" in r]
    skips = [r for r in records if "skipped" in r]
    if not steps and not evals:
        raise ValueError(f"{str(metrics_path)!r} holds no training steps or evaluations to plot")
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("scratchlm plot needs matplotlib: pip install matplotlib") from e

    out = Path(out) if out is not None else metrics_path.with_name("metrics.png")
    figure, (loss_ax, lr_ax, speed_ax) = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    loss_ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=0.8, label="train loss")
    loss_ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", ms=3, label="val loss")
    for r in skips:
        loss_ax.axvline(r["step"] + 1, color="red", lw=0.5, alpha=0.5)
    loss_ax.set_ylabel("cross-entropy")
    loss_ax.legend()
    loss_ax.set_title(f"{metrics_path.parent.name}" + (f" ({len(skips)} skipped steps)" if skips else ""))

    lr_ax.plot([r["step"] for r in steps], [r["lr"] for r in steps])
    lr_ax.set_ylabel("learning rate")

    speed_ax.plot([r["step"] for r in steps], [r["tokens_per_s"] for r in steps], lw=0.8)
    speed_ax.set_ylabel("tokens/s")
    speed_ax.set_xlabel("step")
    with_mfu = [r for r in steps if "mfu" in r]
    if with_mfu:
        mfu_ax = speed_ax.twinx()
        mfu_ax.plot([r["step"] for r in with_mfu], [100 * r["mfu"] for r in with_mfu], lw=0.8, color="tab:orange")
        mfu_ax.set_ylabel("MFU (%)")
    for ax in (loss_ax, lr_ax, speed_ax):
        ax.grid(alpha=0.3)
    figure.tight_layout()
    with atomic_write(out, "wb") as f:
        figure.savefig(f, format="png", dpi=120)
    plt.close(figure)
    return out
