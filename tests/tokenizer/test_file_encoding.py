"""encode_file: text file -> token file, single process or several, same ids."""

from __future__ import annotations

import numpy as np
import pytest

from scratchlm.tokenizer import Tokenizer, encode_file, read_token_file
from scratchlm.tokenizer import file_encoding

EOT = "<|endoftext|>"


@pytest.fixture
def corpus(tmp_path, shared_data):
    docs = (shared_data / "python-docs.txt").read_bytes()[:150_000].decode("utf-8", errors="ignore")
    multilingual = (shared_data / "multilingual.txt").read_bytes()[:150_000].decode("utf-8", errors="ignore")
    text = docs + EOT + multilingual.replace("%\n", EOT) + "\r\ntrailing  "
    path = tmp_path / "corpus.txt"
    path.write_bytes(text.encode("utf-8"))
    return path, text


@pytest.fixture
def gpt2(shared_data) -> Tokenizer:
    return Tokenizer.from_files(shared_data / "gpt2_vocab.json", shared_data / "gpt2_merges.txt", [EOT])


def test_one_and_two_processes_write_identical_files_equal_to_encode(tmp_path, corpus, gpt2, monkeypatch):
    path, text = corpus
    # Small ranges: many cuts, and more ranges than the in-flight window.
    monkeypatch.setattr(file_encoding, "_RANGE_BYTES", 4096)
    count_one = encode_file(gpt2, path, tmp_path / "one.npy")
    count_two = encode_file(gpt2, path, tmp_path / "two.npy", num_processes=2)
    one = read_token_file(tmp_path / "one.npy", gpt2.vocab_size)
    two = read_token_file(tmp_path / "two.npy", gpt2.vocab_size)
    expected = gpt2.encode(text)
    assert count_one == count_two == len(expected)
    assert one.tolist() == expected
    assert np.array_equal(one, two)
    assert (tmp_path / "one.npy").read_bytes() == (tmp_path / "two.npy").read_bytes()


def test_default_range_size_equals_encode(tmp_path, corpus, gpt2):
    path, text = corpus
    encode_file(gpt2, path, tmp_path / "out.npy", num_processes=2)
    assert read_token_file(tmp_path / "out.npy").tolist() == gpt2.encode(text)


def test_dtype_follows_vocab_size(tmp_path):
    text = "hi <|big|> there"
    path = tmp_path / "in.txt"
    path.write_text(text, encoding="utf-8")
    small = Tokenizer({i: bytes([i]) for i in range(256)}, [], ["<|big|>"])
    encode_file(small, path, tmp_path / "small.npy")
    assert np.load(tmp_path / "small.npy").dtype == np.uint16

    # An id beyond 65,535 needs uint32, and must survive the trip.
    large = Tokenizer({i: bytes([i]) for i in range(256)} | {70_000: b"<|big|>"}, [], ["<|big|>"])
    encode_file(large, path, tmp_path / "large.npy", num_processes=2)
    ids = np.load(tmp_path / "large.npy")
    assert ids.dtype == np.uint32
    assert ids.tolist() == large.encode(text) and 70_000 in ids.tolist()


def test_empty_file_and_bad_arguments(tmp_path):
    tokenizer = Tokenizer({i: bytes([i]) for i in range(256)}, [])
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    assert encode_file(tokenizer, empty, tmp_path / "empty.npy") == 0
    assert len(read_token_file(tmp_path / "empty.npy")) == 0
    with pytest.raises(ValueError, match="num_processes"):
        encode_file(tokenizer, empty, tmp_path / "x.npy", num_processes=0)
    with pytest.raises(FileNotFoundError, match="input_path"):
        encode_file(tokenizer, tmp_path / "missing.txt", tmp_path / "x.npy")


def test_invalid_utf8_fails_without_leaving_a_file(tmp_path):
    tokenizer = Tokenizer({i: bytes([i]) for i in range(256)}, [])
    path = tmp_path / "bad.txt"
    path.write_bytes(b"fine text \xc3( more")
    with pytest.raises(ValueError, match=r"not valid UTF-8 at byte 10"):
        encode_file(tokenizer, path, tmp_path / "out.npy")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.txt"]
