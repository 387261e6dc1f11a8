"""Tokenizer: GPT-2 file export, HF tokenizer.json export, and round-trip properties."""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scratchlm.tokenizer import Tokenizer, train_bpe
from scratchlm.tokenizer.gpt2_files import decode_gpt2_token, encode_gpt2_token

EOT = "<|endoftext|>"

CORPUS = (
    "The quick brown fox jumps over the lazy dog. It's 2024, isn't it?\n"
    "Größere Füße laufen schneller über die Straße.\n"
    "我们的社区欢迎每一个人。\t\tdef f(x):\n    return x ** 2\n"
) * 30
SAMPLE = "Hello  world!\n\n  It's über-cool 中文 123 " + EOT + "<|endoftext|" + EOT + EOT + " \x00\x7f end  "


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(CORPUS.replace("def f", EOT + "def f"), encoding="utf-8")
    vocab, merges = train_bpe(path, 500, [EOT], num_processes=1)
    return Tokenizer(vocab, merges, [EOT])


def gpt2_paths(shared_data):
    return shared_data / "gpt2_vocab.json", shared_data / "gpt2_merges.txt"


# ---------------------------------------------------------------- GPT-2 files


def test_gpt2_token_spelling_round_trips_every_byte():
    every_byte = bytes(range(256))
    spelled = encode_gpt2_token(every_byte)
    assert len(spelled) == 256 and " " not in spelled
    assert decode_gpt2_token(spelled) == every_byte


def test_save_gpt2_files_round_trips_a_trained_tokenizer(tmp_path, trained):
    vocab_path, merges_path = tmp_path / "encoder.json", tmp_path / "vocab.bpe"
    trained.save_gpt2_files(vocab_path, merges_path)
    loaded = Tokenizer.from_files(vocab_path, merges_path, [EOT])
    assert loaded.vocab == trained.vocab and loaded.merges == trained.merges
    assert loaded.special_token_ids == trained.special_token_ids
    assert loaded.encode(SAMPLE) == trained.encode(SAMPLE)
    assert merges_path.read_text(encoding="utf-8").startswith("#version: 0.2\n")
    assert json.loads(vocab_path.read_text(encoding="utf-8"))["Ġthe"] == trained._token_ids[b" the"]


def test_save_gpt2_files_reproduces_gpt2s_own_files(tmp_path, shared_data):
    vocab_path, merges_path = gpt2_paths(shared_data)
    gpt2 = Tokenizer.from_files(vocab_path, merges_path, [EOT])
    gpt2.save_gpt2_files(tmp_path / "encoder.json", tmp_path / "merges.txt")
    assert json.loads((tmp_path / "encoder.json").read_text(encoding="utf-8")) == json.loads(
        vocab_path.read_text(encoding="utf-8")
    )
    ours = (tmp_path / "merges.txt").read_text(encoding="utf-8").splitlines()
    theirs = [line for line in merges_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not theirs[0].startswith("#version"):
        ours = ours[1:]
    assert ours == theirs


def test_save_gpt2_files_refuses_a_token_held_twice(tmp_path):
    vocab = {i: bytes([i]) for i in range(256)} | {256: b"a"}
    with pytest.raises(ValueError, match="twice"):
        Tokenizer(vocab, []).save_gpt2_files(tmp_path / "encoder.json", tmp_path / "vocab.bpe")


# ------------------------------------------------------------ HF tokenizers


def test_hf_tokenizer_json_gives_the_same_ids(tmp_path, trained):
    tokenizers = pytest.importorskip("tokenizers")
    hf = tokenizers.Tokenizer.from_file(str(trained.save_hf(tmp_path / "tokenizer.json")))
    for text in (SAMPLE, CORPUS[:3000], "", " ", "\n\n\n", "a" + EOT):
        ids = trained.encode(text)
        assert hf.encode(text).ids == ids
        assert hf.decode(ids, skip_special_tokens=False) == text
    assert hf.token_to_id(EOT) == trained.special_token_ids[EOT]


def test_hf_tokenizer_json_matches_gpt2_on_real_text(tmp_path, shared_data):
    tokenizers = pytest.importorskip("tokenizers")
    gpt2 = Tokenizer.from_files(*gpt2_paths(shared_data), [EOT])
    hf = tokenizers.Tokenizer.from_file(str(gpt2.save_hf(tmp_path / "tokenizer.json")))
    for name in ("python-docs.txt", "multilingual.txt"):
        text = (shared_data / name).read_bytes()[:100_000].decode("utf-8", errors="ignore") + EOT + " tail"
        assert hf.encode(text).ids == gpt2.encode(text)


# ----------------------------------------------------------------- properties


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300))
def test_arbitrary_bytes_decode_back_exactly(trained, data):
    # Bytes that are not UTF-8 can only come from slices of ids; every id
    # sequence must give back exactly the bytes of its tokens.
    byte_ids = [trained._token_ids[bytes([b])] for b in data]
    assert trained.decode_bytes(byte_ids) == data
    text = data.decode("utf-8", errors="replace")
    ids = trained.encode(text)
    assert trained.decode_bytes(ids) == text.encode("utf-8")
    assert trained.decode(byte_ids) == text


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=st.characters(codec="utf-8"), max_size=200))
def test_arbitrary_unicode_encodes_to_its_utf8_bytes(trained, text):
    assert trained.decode_bytes(trained.encode(text)) == text.encode("utf-8")


def test_empty_input_everywhere(trained):
    assert trained.encode("") == []
    assert trained.decode_bytes([]) == b""
    assert list(trained.encode_iterable([])) == []
    assert list(trained.encode_iterable(["", ""])) == []


@pytest.mark.parametrize("unit", ["a", " ", "ab ", "中", "\n\n", "x" + EOT])
def test_a_million_repetitive_characters_encode_in_seconds(trained, unit):
    text = (unit * (1_000_000 // len(unit) + 1))[:1_000_000]
    start = time.perf_counter()
    ids = trained.encode(text)
    assert time.perf_counter() - start < 10
    assert trained.decode(ids) == text
