"""The two merge loops (rescan and heap) agree, and long pre-tokens stay fast."""

from __future__ import annotations

import doctest
import importlib
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scratchlm.tokenizer import Tokenizer
from scratchlm.tokenizer.apply_merges import merge_by_rank, merge_by_rank_heap

from irregular_ranks import IRREGULAR_RANKS


@settings(max_examples=300, deadline=None)
@given(ids=st.lists(st.integers(0, 3), max_size=60))
def test_heap_and_rescan_agree_even_for_irregular_ranks(ids):
    assert merge_by_rank_heap(ids, IRREGULAR_RANKS) == merge_by_rank(ids, IRREGULAR_RANKS)


def test_one_merge_at_a_time_leftmost_first():
    # 0 1 0 1 0: (0,1) at index 0 merges first -> 4 0 1 0; now (4,0) has
    # rank 0 and goes before the second (0,1) -> 6 1 0. Merging both (0,1)
    # in one pass would give 4 4 0 -> 7 0 instead.
    assert merge_by_rank([0, 1, 0, 1, 0], IRREGULAR_RANKS) == [6, 1, 0]
    assert merge_by_rank_heap([0, 1, 0, 1, 0], IRREGULAR_RANKS) == [6, 1, 0]
    assert merge_by_rank([1, 1, 1], IRREGULAR_RANKS) == [5, 1]


def test_heap_and_rescan_agree_on_gpt2_text(shared_data):
    tokenizer = Tokenizer.from_files(shared_data / "gpt2_vocab.json", shared_data / "gpt2_merges.txt")
    text = (shared_data / "python-docs.txt").read_bytes()[:20_000]
    for start in range(0, len(text) - 64, 97):
        ids = [tokenizer._byte_ids[b] for b in text[start : start + 64]]
        assert merge_by_rank_heap(ids, tokenizer._merge_ranks) == merge_by_rank(ids, tokenizer._merge_ranks)


def test_long_pretokens_encode_quickly_and_correctly(shared_data):
    tokenizer = Tokenizer.from_files(shared_data / "gpt2_vocab.json", shared_data / "gpt2_merges.txt")
    # One pre-token each; the rescan loop alone would take minutes on these.
    for text in (" " * 200_000, "a" * 100_000, "ab1" * 30_000):
        start = time.perf_counter()
        ids = tokenizer.encode(text)
        assert time.perf_counter() - start < 5.0
        assert tokenizer.decode(ids) == text


@pytest.mark.parametrize(
    "module", ["apply_merges", "bpe", "file_encoding", "gpt2_files", "merge_batch", "pretokenize", "tokenizer"]
)
def test_docstring_examples(module):
    result = doctest.testmod(importlib.import_module(f"scratchlm.tokenizer.{module}"))
    assert result.failed == 0
