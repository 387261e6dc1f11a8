"""benchmarks/bench_train.py still runs end to end (one tiny step: a smoke test, not a timing)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_train.py"


def test_bench_train_writes_its_json_and_table(tmp_path):
    out = tmp_path / "train.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--preset", "debug", "--context", "32", "--batch", "2", "--warmup", "0",
         "--steps", "2", "--kernels", "reference", "torch", "--no-compile", "--peak_tflops", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(out.read_text())
    assert [(r["kernels"], r["loss"], r["compile"]) for r in results["rows"]] == [
        ("reference", "reference", False), ("torch", "torch", False)
    ]
    for row in results["rows"]:
        assert row["tokens_per_s"] > 0 and 0 < row["mfu"] < 1 and row["precision"] == "fp32"
    table = out.with_suffix(".md").read_text()
    assert "| reference | reference | False |" in table and "1.00x" in table


def test_bench_train_runs_each_loss_backend(tmp_path):
    out = tmp_path / "train.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--preset", "debug", "--context", "32", "--batch", "2", "--warmup", "0",
         "--steps", "1", "--kernels", "torch", "--losses", "reference", "torch", "--no-compile", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["kernels"], r["loss"]) for r in rows] == [("torch", "reference"), ("torch", "torch")]
    assert all(r["tokens_per_s"] > 0 for r in rows)
