"""Shared fixtures: the optional ../shared/data folder and deterministic seeds.

Without a GPU, Triton kernels run through Triton's interpreter on the CPU; it
is chosen by an environment variable that must be set before Triton is first
imported, so it is set here, before any test module loads.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests build their own small models and files; nothing is ever fetched from a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """The folder of shared test corpora; tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent (only present beside the team's checkout)")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield
