"""pytest setup for the kernel benchmarks (run by ``make bench``, never by ``make test``).

Without a GPU, Triton can only run under its interpreter, chosen by an
environment variable read when Triton is first imported, so it is set here
before any benchmark module loads (as tests/conftest.py does). On a GPU it is
left alone: the benchmarks must time compiled kernels.

Skipped providers (no GPU, kernel not landed, Liger not installed) are
collected with their reasons and written to ``--skips-json`` so the report can
say what was left out and why.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# (benchmark id, reason) of every skipped benchmark, in order.
_skips: list[dict[str, str]] = []


def pytest_addoption(parser):
    parser.addoption(
        "--skips-json",
        default=None,
        help="write the skipped benchmarks and their reasons to this JSON file (read by benchmarks/report.py)",
    )


def pytest_report_header(config):
    from common import DEVICE, dtype_under_test, environment

    env = environment()
    return (
        f"scratchlm benchmarks: {env['device_name']} ({DEVICE}), dtype {dtype_under_test()}, "
        f"torch {env['torch_version']}, triton {env['triton_version']}"
    )


def pytest_runtest_logreport(report):
    if report.skipped and report.when in ("setup", "call"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skips.append({"benchmark": report.nodeid.split("::")[-1], "reason": reason.removeprefix("Skipped: ")})


def pytest_sessionfinish(session):
    path = session.config.getoption("--skips-json")
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(_skips, indent=1) + "\n", encoding="utf-8")
