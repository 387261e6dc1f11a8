"""Fixtures shared by the Llama-family tokenizer tests: HF-trained tokenizers of each pre-tokenizer style."""

from __future__ import annotations

from pathlib import Path

import pytest

from scratchlm.tokenizer import Tokenizer

from hf_trained_tokenizers import STYLES, SYNTHETIC, TRAIN_BYTES, train_hf_folder

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


@pytest.fixture(scope="session")
def hf_folders(tmp_path_factory) -> dict[str, Path]:
    """One trained HF tokenizer folder per style (trained on the shared corpus when present)."""
    pytest.importorskip("tokenizers")
    root = tmp_path_factory.mktemp("hf")
    corpus = root / "corpus.txt"
    if SHARED_DATA.is_dir():
        docs = (SHARED_DATA / "python-docs.txt").read_bytes()[:TRAIN_BYTES].decode("utf-8", errors="ignore")
        multilingual = (SHARED_DATA / "multilingual.txt").read_bytes()[:50_000].decode("utf-8", errors="ignore")
        corpus.write_text(docs + multilingual, encoding="utf-8")
    else:
        corpus.write_text(SYNTHETIC, encoding="utf-8")
    return {style: train_hf_folder(style, corpus, root / style) for style in STYLES}


@pytest.fixture(scope="session")
def hf_tokenizers(hf_folders):
    """HF's own tokenizer for each folder."""
    tokenizers = pytest.importorskip("tokenizers")
    return {style: tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json")) for style, folder in hf_folders.items()}


@pytest.fixture(scope="session")
def ours(hf_folders) -> dict[str, Tokenizer]:
    """``Tokenizer.from_hf`` of each folder."""
    return {style: Tokenizer.from_hf(folder) for style, folder in hf_folders.items()}
