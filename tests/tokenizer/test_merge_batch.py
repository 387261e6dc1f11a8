"""BatchMerger (numpy, many pre-tokens per round) against merge_by_rank, and the encode path that uses it."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scratchlm.tokenizer import Tokenizer
from scratchlm.tokenizer import tokenizer as tokenizer_module
from scratchlm.tokenizer.apply_merges import merge_by_rank
from scratchlm.tokenizer.merge_batch import MAX_ID, MAX_PIECE_BYTES, BatchMerger

from irregular_ranks import IRREGULAR_RANKS

BYTE_IDS = list(range(256))
# Lengths around every group boundary (2, 4, 8, 16, 32) and both ends (0, 64).
SMALL_BYTES = st.binary(max_size=MAX_PIECE_BYTES).map(lambda data: bytes(b % 4 for b in data))


@settings(max_examples=300, deadline=None)
@given(pieces=st.lists(SMALL_BYTES, max_size=30))
def test_irregular_ranks_merge_as_merge_by_rank(pieces):
    merger = BatchMerger(IRREGULAR_RANKS, BYTE_IDS)
    assert merger.merge(pieces) == [merge_by_rank(list(piece), IRREGULAR_RANKS) for piece in pieces]


def test_one_merge_at_a_time_leftmost_first():
    merger = BatchMerger(IRREGULAR_RANKS, BYTE_IDS)
    # 0 1 0 1 0 -> 4 0 1 0 -> (4,0) rank 0 beats the second (0,1) -> 6 1 0.
    assert merger.merge([bytes([0, 1, 0, 1, 0]), bytes([1, 1, 1]), b"", bytes([3])]) == [[6, 1, 0], [5, 1], [], [3]]


def test_no_merges_and_too_long_pieces():
    assert BatchMerger({}, BYTE_IDS).merge([b"ab", b"", b"x" * MAX_PIECE_BYTES]) == [
        [97, 98],
        [],
        [120] * MAX_PIECE_BYTES,
    ]
    with pytest.raises(ValueError, match="at most 64 bytes"):
        BatchMerger({}, BYTE_IDS).merge([b"x" * (MAX_PIECE_BYTES + 1)])
    with pytest.raises(ValueError, match="ids must be below"):
        BatchMerger({(97, 98): (0, MAX_ID)}, BYTE_IDS)


def test_encode_with_huge_ids_skips_the_batch(batch_always):
    vocab = {i: bytes([i]) for i in range(256)} | {MAX_ID + 5: b"ab"}
    assert Tokenizer(vocab, [(b"a", b"b")]).encode("abc ab") == [MAX_ID + 5, 99, 32, MAX_ID + 5]


@pytest.fixture
def gpt2(shared_data) -> Tokenizer:
    return Tokenizer.from_files(shared_data / "gpt2_vocab.json", shared_data / "gpt2_merges.txt")


@pytest.fixture
def gpt2_merger(gpt2) -> BatchMerger:
    return BatchMerger(gpt2._merge_ranks, gpt2._byte_ids)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pieces=st.lists(st.binary(max_size=MAX_PIECE_BYTES), max_size=40))
def test_gpt2_ranks_on_arbitrary_bytes(gpt2, gpt2_merger, pieces):
    # GPT-2 numbers its bytes differently from 0..255, so byte_ids matter here.
    expected = [merge_by_rank([gpt2._byte_ids[b] for b in piece], gpt2._merge_ranks) for piece in pieces]
    assert gpt2_merger.merge(pieces) == expected


def test_gpt2_ranks_on_the_distinct_pretokens_of_a_corpus_slice(gpt2, shared_data):
    text = (shared_data / "multilingual.txt").read_bytes()[:400_000].decode("utf-8", errors="ignore")
    pieces = sorted({piece.encode("utf-8") for piece in tokenizer_module.GPT2_PRETOKENIZE_REGEX.findall(text)})
    pieces = [piece for piece in pieces if len(piece) <= MAX_PIECE_BYTES]
    merger = BatchMerger(gpt2._merge_ranks, gpt2._byte_ids)
    expected = [merge_by_rank([gpt2._byte_ids[b] for b in piece], gpt2._merge_ranks) for piece in pieces]
    assert merger.merge(pieces) == expected


@pytest.fixture
def batch_always(monkeypatch):
    """Make encode take the batch path for any text with a single missing pre-token."""
    monkeypatch.setattr(tokenizer_module, "_BATCH_MIN_PIECES", 1)
    monkeypatch.setattr(tokenizer_module, "_SAMPLE_MIN_MISSES", 1)
    monkeypatch.setattr(tokenizer_module, "_BATCH_MIN_MISSES", 1)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=300))
def test_encode_through_the_batch_equals_encode_one_by_one(gpt2, text):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tokenizer_module, "_BATCH_MIN_PIECES", 1 << 62)
        gpt2._cache.clear()
        expected = gpt2.encode(text)
    with pytest.MonkeyPatch.context() as patch:
        # Take the batch path for any text with a single missing pre-token.
        patch.setattr(tokenizer_module, "_BATCH_MIN_PIECES", 1)
        patch.setattr(tokenizer_module, "_SAMPLE_MIN_MISSES", 1)
        patch.setattr(tokenizer_module, "_BATCH_MIN_MISSES", 1)
        gpt2._cache.clear()
        assert gpt2.encode(text) == expected


def test_batch_path_on_corpora_with_a_small_cache(gpt2, shared_data, batch_always, monkeypatch):
    text = (shared_data / "python-docs.txt").read_bytes()[:300_000].decode("utf-8", errors="ignore")
    text += " " * 100 + "x" * 80 + "\n"  # pieces over MAX_PIECE_BYTES stay out of the batch
    expected = gpt2.encode(text)
    # Room for every distinct pre-token: one batch, after the cache is emptied.
    fresh = Tokenizer(gpt2.vocab, gpt2.merges)
    fresh.encode("warm up the cache with a few pieces")
    distinct = len(set(tokenizer_module.GPT2_PRETOKENIZE_REGEX.findall(text)))
    monkeypatch.setattr(tokenizer_module, "_CACHE_MAX_ENTRIES", distinct + 2)
    assert fresh.encode(text) == expected
    assert len(fresh._cache) <= distinct + 2
    # Too many distinct pre-tokens for the cache: no batch, one by one.
    monkeypatch.setattr(tokenizer_module, "_CACHE_MAX_ENTRIES", 100)
    assert Tokenizer(gpt2.vocab, gpt2.merges).encode(text) == expected
