"""Pre-tokenization and the safe-cut rule that lets text be processed in pieces."""

from __future__ import annotations

import io

import pytest
import regex
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scratchlm.tokenizer import pretokenize as pretokenize_module
from scratchlm.tokenizer.pretokenize import (
    GPT2_PRETOKENIZE_PATTERN,
    GPT2_PRETOKENIZE_REGEX,
    is_safe_cut,
    last_safe_cut,
    next_safe_byte_cut,
    pretokenize,
    safe_byte_ranges,
    special_token_regex,
    split_on_special_tokens,
)

# A small alphabet makes every regex alternative and special-token overlap likely.
ALPHABET = "ab 's\n\t1.<|>é中\u3000\xa0"
SPECIAL_TOKENS = st.lists(st.text(alphabet=ALPHABET, min_size=1, max_size=4), max_size=3)


def pieces(text: str, special_tokens) -> list[str]:
    """Pre-tokens with the special tokens kept in place: what encoding sees."""
    parts = split_on_special_tokens(text, special_token_regex(special_tokens))
    out = []
    for index, part in enumerate(parts):
        out.extend([part] if index % 2 else regex.findall(GPT2_PRETOKENIZE_PATTERN, part))
    return out


def test_gpt2_pattern_splits_as_gpt2_does():
    assert pretokenize("Hello, world! It's 2024.") == ["Hello", ",", " world", "!", " It", "'s", " 2024", "."]
    # The last space of a run leads the next word; the rest stays together.
    assert pretokenize("a   b\n\nc") == ["a", "  ", " b", "\n", "\n", "c"]
    assert pretokenize("end  ") == ["end", "  "]
    assert pretokenize("we'll 3.14 ünï 中文") == ["we", "'ll", " 3", ".", "14", " ünï", " 中文"]


# Apostrophes next to contraction letters, spaces before every class, runs of
# mixed whitespace (\u3000 and \xa0 are \s but not " "), digits of other
# scripts (\u0663, \u2167 is \p{N} but not a digit), combining marks (\u0301
# is neither L nor N).
REORDER_ALPHABET = "'stremvld ST1\u0663\u2167.,\n\t\r\u3000\xa0\u0301é中_-"


@settings(max_examples=1000, deadline=None)
@given(text=st.one_of(st.text(alphabet=REORDER_ALPHABET, max_size=60), st.text(max_size=60)))
def test_reordered_pattern_finds_gpt2s_pieces_on_any_text(text):
    # Encoding runs a reordered but equivalent pattern (why: pretokenize.py).
    assert GPT2_PRETOKENIZE_REGEX.findall(text) == regex.findall(GPT2_PRETOKENIZE_PATTERN, text)


@pytest.mark.parametrize("name", ["python-docs.txt", "multilingual.txt"])
def test_reordered_pattern_finds_gpt2s_pieces_on_the_corpora(shared_data, name):
    text = (shared_data / name).read_text(encoding="utf-8")
    assert GPT2_PRETOKENIZE_REGEX.findall(text) == regex.findall(GPT2_PRETOKENIZE_PATTERN, text)


def test_special_tokens_split_longest_first_and_stay_whole():
    special = special_token_regex(["<|a|>", "<|a|><|a|>"])
    assert split_on_special_tokens("x<|a|><|a|><|a|>y", special) == ["x", "<|a|><|a|>", "", "<|a|>", "y"]
    assert split_on_special_tokens("x", None) == ["x"]
    assert pretokenize("one<|endoftext|>two", ["<|endoftext|>"]) == ["one", "two"]
    assert pretokenize("one<|endoftext|>two") == ["one", "<|", "endoftext", "|>", "two"]


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=ALPHABET, max_size=40), special_tokens=SPECIAL_TOKENS)
def test_every_safe_cut_preserves_the_pieces(text, special_tokens):
    whole = pieces(text, special_tokens)
    for position in range(len(text) + 1):
        if is_safe_cut(text, position, special_tokens):
            assert pieces(text[:position], special_tokens) + pieces(text[position:], special_tokens) == whole


def test_safe_cut_examples():
    assert is_safe_cut("Hello world", 5)
    assert not is_safe_cut("Hello world", 4)  # inside a word
    assert not is_safe_cut("ab  ", 2)  # whitespace at the end may still grow
    assert not is_safe_cut("a <|x|>", 1, ["<|x|>"])  # " " would end its segment
    assert not is_safe_cut("<a b>", 2, ["<a b>"])  # inside a special token
    assert is_safe_cut("<a b> c", 5, ["<a b>"])


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=ALPHABET, max_size=60), special_tokens=SPECIAL_TOKENS, extra=st.text(ALPHABET, max_size=8))
def test_last_safe_cut_holds_whatever_text_follows(text, special_tokens, extra):
    # The cut is chosen on a prefix; it must stay valid once more text arrives.
    cut = last_safe_cut(text, special_tokens)
    assert 0 <= cut < max(len(text), 1)
    if cut:
        full = text + extra
        assert pieces(full[:cut], special_tokens) + pieces(full[cut:], special_tokens) == pieces(full, special_tokens)


def test_last_safe_cut_finds_the_last_candidate():
    assert last_safe_cut("one two three") == 7
    assert last_safe_cut("one two three", search_from=8) == 0
    assert last_safe_cut("nospace") == 0
    # The cut before " c" needs the special token's length of look-ahead.
    assert last_safe_cut("a b c", ["<tok>"]) == 0
    assert last_safe_cut("a b cdefg", ["<tok>"]) == 3


def brute_force_byte_cut(data: bytes, position: int, special_tokens: list[bytes]) -> int | None:
    """The byte rule spelled out position by position."""
    for p in range(max(position, 1), len(data) - 1):
        if data[p] in b" \t\n\r\x0b\x0c" and 0x21 <= data[p + 1] <= 0x7E:
            overlapping = any(
                data[q : q + len(token)] == token
                for token in special_tokens
                for q in range(max(0, p - len(token) + 1), p + 2)
            )
            if not overlapping:
                return p
    return None


@pytest.mark.parametrize("window", [1, 2, 5, 64])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.text(ALPHABET, max_size=60).map(str.encode) | st.binary(max_size=80).map(lambda b: b.replace(b"\x00", b" ")),
    special_tokens=SPECIAL_TOKENS.map(lambda tokens: [t.encode() for t in tokens]),
)
def test_next_safe_byte_cut_matches_brute_force_for_any_window(monkeypatch, window, data, special_tokens):
    monkeypatch.setattr(pretokenize_module, "_SCAN_WINDOW_BYTES", window)
    for position in range(len(data) + 2):
        got = next_safe_byte_cut(io.BytesIO(data), position, special_tokens)
        assert got == brute_force_byte_cut(data, position, special_tokens), position


def test_safe_byte_ranges_tile_the_file_and_preserve_pieces(tmp_path, shared_data):
    special = ["<|endoftext|>"]
    text = (shared_data / "multilingual.txt").read_bytes()[:100_000].decode("utf-8", errors="ignore")
    text = text.replace("%\n", "<|endoftext|>")
    path = tmp_path / "corpus.txt"
    path.write_bytes(text.encode("utf-8"))
    ranges = list(safe_byte_ranges(path, 500, special))
    assert len(ranges) > 50
    assert ranges[0][0] == 0 and ranges[-1][1] == path.stat().st_size
    assert all(end == next_start for (_, end), (next_start, _) in zip(ranges, ranges[1:]))
    data = path.read_bytes()
    joined = [p for start, end in ranges for p in pieces(data[start:end].decode("utf-8"), special)]
    assert joined == pieces(text, special)


def test_safe_byte_ranges_rejects_bad_target(tmp_path):
    path = tmp_path / "x.txt"
    path.write_text("abc")
    with pytest.raises(ValueError, match="target_bytes"):
        list(safe_byte_ranges(path, 0))
    assert list(safe_byte_ranges(path, 100)) == [(0, 3)]
