"""Tokenizer: encode/decode, special tokens, streaming, save/load, GPT-2 files vs tiktoken."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scratchlm.tokenizer import GPT2_PRETOKENIZE_PATTERN, Tokenizer, train_bpe
from scratchlm.tokenizer import tokenizer as tokenizer_module

SLICE_BYTES = 300_000
EOT = "<|endoftext|>"

# Enough repeated English, German and Chinese text for a few hundred merges.
SYNTHETIC_CORPUS = (
    "The quick brown fox jumps over the lazy dog. It's 2024, isn't it?\n"
    "Größere Füße laufen schneller über die Straße.\n"
    "我们的社区欢迎每一个人。请保持礼貌。\n"
    "def main():\n    return [x ** 2 for x in range(10)]\n"
) * 40


def byte_tokenizer(special_tokens=None) -> Tokenizer:
    return Tokenizer({i: bytes([i]) for i in range(256)}, [], special_tokens)


def read_slice(shared_data, name: str, num_bytes: int = SLICE_BYTES) -> str:
    return (shared_data / name).read_bytes()[:num_bytes].decode("utf-8", errors="ignore")


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp("corpus") / "synthetic.txt"
    path.write_text(SYNTHETIC_CORPUS.replace("def main", EOT + "def main"), encoding="utf-8")
    vocab, merges = train_bpe(path, 600, [EOT], num_processes=1)
    return Tokenizer(vocab, merges, [EOT])


def gpt2_paths(shared_data):
    return shared_data / "gpt2_vocab.json", shared_data / "gpt2_merges.txt"


# GPT-2's byte -> character table, built independently of the package: the
# printable Latin-1 bytes stand for themselves, the other 68 take U+0100 on.
def independent_byte_decoder() -> dict[str, int]:
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(0x100 + i): b for i, b in enumerate(others)})
    return table


def offline_tiktoken(shared_data):
    tiktoken = pytest.importorskip("tiktoken")
    decoder = independent_byte_decoder()
    encoder = json.loads(gpt2_paths(shared_data)[0].read_text(encoding="utf-8"))
    ranks = {bytes(decoder[c] for c in token): rank for token, rank in encoder.items() if token != EOT}
    return tiktoken.Encoding(
        name="gpt2-offline",
        pat_str=GPT2_PRETOKENIZE_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={EOT: encoder[EOT]},
    )


# ------------------------------------------------------------------ basics


def test_merges_apply_by_rank_not_by_position():
    vocab = {i: bytes([i]) for i in range(256)} | {256: b"bc", 257: b"ab", 258: b"abc"}
    # (b,c) has rank 0, so "abc" becomes a + bc, and (a, bc) is no merge.
    tokenizer = Tokenizer(vocab, [(b"b", b"c"), (b"a", b"b")])
    assert tokenizer.encode("abc") == [ord("a"), 256]
    # With the ranks swapped, ab forms first, then (ab, c).
    tokenizer = Tokenizer(vocab, [(b"a", b"b"), (b"ab", b"c")])
    assert tokenizer.encode("abc") == [258]
    assert tokenizer.encode("abab") == [257, 257]
    # Merges never cross pre-tokens: " ab" is one, "c" after "!" another.
    assert tokenizer.encode("ab!c") == [257, ord("!"), ord("c")]


def test_repeated_pair_merges_left_to_right():
    vocab = {i: bytes([i]) for i in range(256)} | {256: b"aa"}
    tokenizer = Tokenizer(vocab, [(b"a", b"a")])
    assert tokenizer.encode("aaa") == [256, ord("a")]
    assert tokenizer.encode("aaaa") == [256, 256]


def test_empty_text_and_type_errors():
    tokenizer = byte_tokenizer([EOT])
    assert tokenizer.encode("") == []
    assert tokenizer.decode([]) == ""
    with pytest.raises(TypeError, match="text must be a str"):
        tokenizer.encode(b"bytes")


def test_bad_vocab_or_merges_raise():
    with pytest.raises(ValueError, match="vocab must map non-negative int ids to bytes"):
        Tokenizer({-1: b"\x00"}, [])
    with pytest.raises(ValueError, match="vocab must map non-negative int ids to bytes"):
        Tokenizer({0: "a"}, [])
    with pytest.raises(ValueError, match=r"merges\[0\]"):
        Tokenizer({i: bytes([i]) for i in range(256)}, [(b"a", b"b")])


def test_decode_replaces_invalid_utf8_and_rejects_unknown_ids():
    tokenizer = byte_tokenizer()
    ids = tokenizer.encode("é")
    assert ids == [0xC3, 0xA9]
    assert tokenizer.decode(ids[:1]) == "\ufffd"
    assert tokenizer.decode([ord("h"), 0xFF, ord("i")]) == "h\ufffdi"
    assert tokenizer.decode_bytes(ids[:1]) == b"\xc3"
    with pytest.raises(ValueError, match="token id 999"):
        tokenizer.decode([1, 999])
    with pytest.raises(ValueError, match="token id 999"):
        tokenizer.decode_bytes(iter([1, 999]))


# ---------------------------------------------------------- special tokens


def test_special_tokens_overlapping_longest_wins_at_edges_and_adjacent():
    specials = ["<|a|>", "<|a|><|a|>", "<|"]
    tokenizer = byte_tokenizer(specials)
    ids = tokenizer.special_token_ids
    assert len(set(ids.values())) == 3 and min(ids.values()) == 256
    double, single, opener = ids["<|a|><|a|>"], ids["<|a|>"], ids["<|"]
    assert tokenizer.encode("<|a|><|a|><|a|>") == [double, single]
    assert tokenizer.encode("<|a|>x<|a|>") == [single, ord("x"), single]
    assert tokenizer.encode("<|b") == [opener, ord("b")]
    assert tokenizer.encode("x<|a|><|") == [ord("x"), single, opener]
    text = "<|a|><|a|>hi <|a|>\n<|"
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_special_token_ids_reuse_vocab_or_extend_it():
    vocab = {i: bytes([i]) for i in range(256)} | {256: EOT.encode()}
    tokenizer = Tokenizer(vocab, [], [EOT, "<pad>"])
    assert tokenizer.special_token_ids == {EOT: 256, "<pad>": 257}
    assert tokenizer.vocab_size == 258
    assert vocab == {i: bytes([i]) for i in range(256)} | {256: EOT.encode()}  # caller's dict untouched


def test_special_token_text_without_special_tokens_is_ordinary_text(small_tokenizer):
    plain = Tokenizer(small_tokenizer.vocab, small_tokenizer.merges)
    text = "a" + EOT + "b"
    eot_id = small_tokenizer.special_token_ids[EOT]
    assert eot_id in small_tokenizer.encode(text)
    ids = plain.encode(text)
    assert eot_id not in ids and len(ids) > 3
    assert plain.decode(ids) == text


def test_special_tokens_break_merges(small_tokenizer):
    eot = small_tokenizer.special_token_ids[EOT]
    ids = small_tokenizer.encode("The" + EOT + " quick")
    assert ids == small_tokenizer.encode("The") + [eot] + small_tokenizer.encode(" quick")


# -------------------------------------------------------------- round trips


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text())
def test_arbitrary_unicode_round_trips(small_tokenizer, text):
    ids = small_tokenizer.encode(text)
    assert small_tokenizer.decode(ids) == text
    assert all(0 <= i < small_tokenizer.vocab_size for i in ids)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.lists(st.sampled_from(["<|endoftext|>", "<|", "|>", " ", "\n", "a", "é", "中", "quick"])).map("".join))
def test_text_mixed_with_special_tokens_round_trips(small_tokenizer, text):
    ids = small_tokenizer.encode(text)
    assert small_tokenizer.decode(ids) == text
    assert ids.count(small_tokenizer.special_token_ids[EOT]) == text.count(EOT)


def test_trained_tokenizer_round_trips_corpus_slices(tmp_path, shared_data):
    docs = read_slice(shared_data, "python-docs.txt")
    multilingual = read_slice(shared_data, "multilingual.txt")
    path = tmp_path / "train.txt"
    path.write_text(docs[:100_000] + EOT + multilingual[:100_000], encoding="utf-8")
    vocab, merges = train_bpe(path, 2000, [EOT], num_processes=1)
    tokenizer = Tokenizer(vocab, merges, [EOT])
    for text in (docs, multilingual):
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        assert len(ids) < len(text.encode("utf-8")) / 2  # it does compress


# ------------------------------------------------------------ encode_iterable


def test_encode_iterable_over_an_open_file_equals_encode(tmp_path, shared_data):
    tokenizer = Tokenizer.from_files(*gpt2_paths(shared_data), [EOT])
    text = read_slice(shared_data, "python-docs.txt", 200_000) + EOT + read_slice(shared_data, "multilingual.txt", 200_000)
    path = tmp_path / "text.txt"
    path.write_text(text, encoding="utf-8")
    with open(path, encoding="utf-8") as file:
        streamed = tokenizer.encode_iterable(file)
        assert not isinstance(streamed, list)
        assert list(streamed) == tokenizer.encode(text)


def test_encode_iterable_is_lazy_and_bounded():
    tokenizer = byte_tokenizer()
    consumed = 0

    def lines():
        nonlocal consumed
        for _ in range(100_000):
            consumed += 1
            yield "some words on a line\n"

    stream = tokenizer.encode_iterable(lines())
    first = [next(stream) for _ in range(10)]
    assert first == list(b"some words")
    assert consumed < 10_000  # only a window was read, not all 100k lines


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    text=st.lists(st.sampled_from(["<|endoftext|>", "<|", "|>", " ", "  ", "\n", "a", "'s", "1", "中", "."])).map("".join),
    cuts=st.lists(st.integers(0, 400), max_size=12),
)
def test_encode_iterable_equals_encode_for_any_chunking(small_tokenizer, monkeypatch, text, cuts):
    # Look for a cut after every chunk, so cutting is exercised on small texts.
    monkeypatch.setattr(tokenizer_module, "_STREAM_MIN_CHARS", 1)
    bounds = sorted({0, len(text), *(c for c in cuts if c < len(text))})
    chunks = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    assert list(small_tokenizer.encode_iterable(chunks)) == small_tokenizer.encode(text)


# -------------------------------------------------------------- save / load


def test_save_load_round_trip(tmp_path, small_tokenizer):
    path = small_tokenizer.save(tmp_path / "sub" / "tokenizer.json")
    loaded = Tokenizer.load(path)
    assert loaded.vocab == small_tokenizer.vocab
    assert loaded.merges == small_tokenizer.merges
    assert loaded.special_token_ids == small_tokenizer.special_token_ids
    text = SYNTHETIC_CORPUS[:2000] + EOT + "über"
    assert loaded.encode(text) == small_tokenizer.encode(text)
    document = json.loads(path.read_text(encoding="utf-8"))
    assert document["format"] == "scratchlm-bpe-tokenizer" and document["version"] == 1
    assert document["vocab"]["32"] == "20" and document["special_tokens"] == [EOT]
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.json"]  # no temp file left


def test_load_rejects_other_files(tmp_path):
    path = tmp_path / "other.json"
    path.write_text('{"format": "something-else"}')
    with pytest.raises(ValueError, match="not a saved tokenizer"):
        Tokenizer.load(path)
    path.write_text('{"format": "scratchlm-bpe-tokenizer", "version": 99}')
    with pytest.raises(ValueError, match="version 99"):
        Tokenizer.load(path)


def test_failed_save_keeps_the_old_file(tmp_path, small_tokenizer, monkeypatch):
    path = small_tokenizer.save(tmp_path / "tokenizer.json")
    before = path.read_bytes()

    def broken_dump(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(tokenizer_module.json, "dump", broken_dump)
    with pytest.raises(OSError, match="disk full"):
        small_tokenizer.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]


# --------------------------------------------------------------- GPT-2 files


def test_from_files_matches_known_gpt2_ids(shared_data):
    tokenizer = Tokenizer.from_files(*gpt2_paths(shared_data), [EOT])
    assert tokenizer.encode("Hello world") == [15496, 995]
    assert tokenizer.encode(EOT) == [50256]
    assert tokenizer.vocab_size == 50257
    assert tokenizer.decode([15496, 995, 50256]) == "Hello world" + EOT


def test_from_files_skips_version_header(tmp_path, shared_data):
    vocab_path, merges_path = gpt2_paths(shared_data)
    with_header = tmp_path / "vocab.bpe"
    with_header.write_text("#version: 0.2\n" + merges_path.read_text(encoding="utf-8"), encoding="utf-8")
    a = Tokenizer.from_files(vocab_path, merges_path)
    b = Tokenizer.from_files(vocab_path, with_header)
    assert a.merges == b.merges and len(a.merges) == 50_000


@pytest.mark.parametrize("name", ["python-docs.txt", "multilingual.txt"])
def test_gpt2_encoding_matches_tiktoken_token_for_token(shared_data, name):
    encoding = offline_tiktoken(shared_data)
    tokenizer = Tokenizer.from_files(*gpt2_paths(shared_data), [EOT])
    text = read_slice(shared_data, name)
    text = text[: len(text) // 2] + EOT + text[len(text) // 2 :]
    ids = tokenizer.encode(text)
    assert ids == encoding.encode(text, allowed_special="all")
    assert tokenizer.decode(ids) == text
    # Without special tokens, "<|endoftext|>" is ordinary text for both.
    plain = Tokenizer.from_files(*gpt2_paths(shared_data))
    assert plain.encode(text) == encoding.encode_ordinary(text)


def test_gpt2_long_pretokens_match_tiktoken(shared_data):
    # Long pieces go through the heap-based merge loop.
    encoding = offline_tiktoken(shared_data)
    tokenizer = Tokenizer.from_files(*gpt2_paths(shared_data))
    for text in (" " * 50_000, "a" * 20_000, "ab1" * 10_000, "x" + " \n" * 5000 + "y", "Ä" * 3000 + "中文" * 3000):
        assert tokenizer.encode(text) == encoding.encode_ordinary(text)


def test_pretoken_cache_stays_bounded_and_is_only_a_cache(small_tokenizer, monkeypatch):
    text = " ".join(f"word{i}" for i in range(500))
    expected = Tokenizer(small_tokenizer.vocab, small_tokenizer.merges, [EOT]).encode(text)
    monkeypatch.setattr(tokenizer_module, "_CACHE_MAX_ENTRIES", 10)
    fresh = Tokenizer(small_tokenizer.vocab, small_tokenizer.merges, [EOT])
    assert fresh.encode(text) == expected
    assert 0 < len(fresh._cache) <= 10
