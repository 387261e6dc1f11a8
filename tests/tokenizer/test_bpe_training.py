"""train_bpe: hand-worked merges, a slow reference, tie-breaks, special tokens, determinism."""

from __future__ import annotations

from collections import Counter

import pytest
import regex
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scratchlm.tokenizer import train_bpe
from scratchlm.tokenizer import bpe as bpe_module

# Written out here rather than imported, so the reference below shares no code
# with the implementation under test.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

CLASSIC_CORPUS = "low low low low low lower lower widest widest widest newest newest newest newest newest newest"


def naive_train_bpe(text: str, vocab_size: int, special_tokens: list[str]):
    """Obviously correct and slow: recount every pair of every word for each merge."""
    vocab = {i: bytes([i]) for i in range(256)}
    for token in special_tokens:
        vocab[len(vocab)] = token.encode("utf-8")
    if special_tokens:
        pieces = regex.split("|".join(regex.escape(t) for t in sorted(special_tokens, key=len, reverse=True)), text)
    else:
        pieces = [text]
    words = Counter(
        tuple(bytes([b]) for b in word.encode("utf-8")) for piece in pieces for word in regex.findall(GPT2_PATTERN, piece)
    )
    merges = []
    while len(vocab) < vocab_size:
        pairs: Counter = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = max(pairs, key=lambda pair: (pairs[pair], pair))
        merges.append(best)
        vocab[len(vocab)] = best[0] + best[1]
        new_words: Counter = Counter()
        for word, count in words.items():
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    merged.append(best[0] + best[1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            new_words[tuple(merged)] += count
        words = new_words
    return vocab, merges


def write(tmp_path, text: str, name: str = "corpus.txt"):
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8"))
    return path


def test_classic_example_matches_hand_worked_merges(tmp_path):
    # Pre-tokens: "low" x1, " low" x4, " lower" x2, " widest" x3, " newest" x6.
    # (s,t) and (e,s) both occur 9 times: the tie goes to the greater (b"s", b"t").
    # Then (e,st) 9; (l,o) and (o,w) tie at 7 -> (o,w); (l,ow) 7; five pairs tie
    # at 6 and the greatest first byte string wins: (w,est), (n,e), (ne,west),
    # then (b" ", b"newest") > (b" ", b"low"); finally the ties at 3 in
    # " widest" go to (w,i).
    expected = [
        (b"s", b"t"),
        (b"e", b"st"),
        (b"o", b"w"),
        (b"l", b"ow"),
        (b"w", b"est"),
        (b"n", b"e"),
        (b"ne", b"west"),
        (b" ", b"newest"),
        (b" ", b"low"),
        (b"w", b"i"),
    ]
    path = write(tmp_path, CLASSIC_CORPUS)
    vocab, merges = train_bpe(path, 256 + 1 + len(expected), ["<|endoftext|>"])
    assert merges == expected
    assert vocab[256] == b"<|endoftext|>"
    assert [vocab[257 + i] for i in range(len(expected))] == [a + b for a, b in expected]
    assert naive_train_bpe(CLASSIC_CORPUS, 256 + 1 + len(expected), ["<|endoftext|>"])[1] == expected


def test_vocab_layout_bytes_then_specials_then_merges(tmp_path):
    path = write(tmp_path, CLASSIC_CORPUS)
    vocab, merges = train_bpe(path, 265, ["<|endoftext|>", "<pad>"])
    assert sorted(vocab) == list(range(265))
    assert all(vocab[i] == bytes([i]) for i in range(256))
    assert vocab[256] == b"<|endoftext|>" and vocab[257] == b"<pad>"
    assert [vocab[i] for i in range(258, 265)] == [a + b for a, b in merges]


def test_matches_naive_reference_on_classic_example_to_exhaustion(tmp_path):
    path = write(tmp_path, CLASSIC_CORPUS)
    vocab, merges = train_bpe(path, 1000, [])
    ref_vocab, ref_merges = naive_train_bpe(CLASSIC_CORPUS, 1000, [])
    assert merges == ref_merges
    assert vocab == ref_vocab
    assert len(vocab) < 1000  # stopped early: every word became one token


def test_matches_naive_reference_on_corpus_slices(tmp_path, shared_data):
    for name, num_bytes in (("python-docs.txt", 60_000), ("multilingual.txt", 30_000)):
        text = (shared_data / name).read_bytes()[:num_bytes].decode("utf-8", errors="ignore")
        text = text.replace("\n\n", "<|endoftext|>", 20)  # some special tokens too
        path = write(tmp_path, text, name)
        vocab, merges = train_bpe(path, 256 + 1 + 150, ["<|endoftext|>"], num_processes=1)
        ref_vocab, ref_merges = naive_train_bpe(text, 256 + 1 + 150, ["<|endoftext|>"])
        assert merges == ref_merges, name
        assert vocab == ref_vocab, name


# Few distinct characters make long runs and overlapping pairs (a a a,
# a b a b) - the cases where updating only an occurrence's neighbours must
# still add up to the true pair counts.
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet="ab é\n", max_size=80), extra_merges=st.integers(1, 40))
def test_matches_naive_reference_on_repetitive_text(tmp_path, text, extra_merges):
    path = write(tmp_path, text)
    vocab, merges = train_bpe(path, 256 + extra_merges, [], num_processes=1)
    ref_vocab, ref_merges = naive_train_bpe(text, 256 + extra_merges, [])
    assert merges == ref_merges
    assert vocab == ref_vocab


def test_ties_go_to_the_lexicographically_greater_byte_pair(tmp_path):
    # "az" and " ba" give pairs (a,z), (" ",b), (b,a), once each: (b,a) is
    # greatest because the first elements compare first (b"b" > b"a"),
    # although b"a" < b"z" in second place.
    path = write(tmp_path, "az ba")
    _, merges = train_bpe(path, 257, [])
    assert merges == [(b"b", b"a")]
    # Comparison is on bytes, not on ids or first appearance: 'c' (0x63) vs
    # 'é' (0xC3 0xA9) - the multi-byte character's lead byte is greater.
    path = write(tmp_path, "cd é")
    _, merges = train_bpe(path, 257, [])
    assert merges == [(b"\xc3", b"\xa9")]


def test_more_frequent_pair_beats_greater_pair(tmp_path):
    path = write(tmp_path, "ab ab ab zz")
    _, merges = train_bpe(path, 257, [])
    # (a,b) occurs 3 times, (" ",a) twice, (" ",z) and (z,z) once each.
    assert merges == [(b"a", b"b")]


def test_no_merge_crosses_a_special_token(tmp_path):
    special = "<|endoftext|>"
    # Between the special tokens there is only " x"; were they text, "<|",
    # "endoftext" and "|>" would give many more merges.
    path = write(tmp_path, (" x" + special) * 200)
    vocab, merges = train_bpe(path, 300, [special])
    assert merges == [(b" ", b"x")]
    assert len(vocab) == 258

    text = ("hello" + special + "world" + special) * 50
    path = write(tmp_path, text)
    vocab, merges = train_bpe(path, 300, [special])
    for token in list(vocab.values())[257:]:
        assert b"<" not in token and b"|" not in token and b">" not in token, token
        assert token in b"hello" or token in b"world", token


def test_special_tokens_are_removed_longest_first(tmp_path):
    # With "<a>" and "<a>zz" special, "<a>zz" goes as a whole and no text is
    # left; with only "<a>", "zz" is text and (z, z) is merged.
    path = write(tmp_path, "<a>zz" * 100)
    vocab, merges = train_bpe(path, 300, ["<a>", "<a>zz"])
    assert merges == []
    vocab, merges = train_bpe(path, 300, ["<a>"])
    assert merges == [(b"z", b"z")]


@pytest.mark.parametrize("vocab_size", [0, 255, 256])
def test_vocab_size_below_bytes_plus_specials_raises(tmp_path, vocab_size):
    path = write(tmp_path, CLASSIC_CORPUS)
    with pytest.raises(ValueError, match=rf"vocab_size .*at least 257.*got {vocab_size}"):
        train_bpe(path, vocab_size, ["<|endoftext|>"])
    train_bpe(path, 257, ["<|endoftext|>"])  # the minimum itself is fine


def test_bad_arguments_raise(tmp_path):
    path = write(tmp_path, CLASSIC_CORPUS)
    with pytest.raises(ValueError, match="num_processes"):
        train_bpe(path, 300, [], num_processes=0)
    with pytest.raises(ValueError, match="special_tokens"):
        train_bpe(path, 300, "<|endoftext|>")
    with pytest.raises(FileNotFoundError, match="input_path"):
        train_bpe(tmp_path / "missing.txt", 300, [])


def test_invalid_utf8_input_names_the_file_and_offset(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"hello \xff world")
    with pytest.raises(ValueError, match=r"not valid UTF-8 at byte 6"):
        train_bpe(path, 300, [])


def test_same_merges_for_any_number_of_processes_and_runs(tmp_path, shared_data, monkeypatch):
    text = (shared_data / "python-docs.txt").read_bytes()[:300_000].decode("utf-8", errors="ignore")
    text += (shared_data / "multilingual.txt").read_bytes()[:100_000].decode("utf-8", errors="ignore")
    path = write(tmp_path, text.replace("\n\n\n", "\n<|endoftext|>"))
    one = train_bpe(path, 1500, ["<|endoftext|>"], num_processes=1)
    two = train_bpe(path, 1500, ["<|endoftext|>"], num_processes=2)
    assert one == two
    assert train_bpe(path, 1500, ["<|endoftext|>"], num_processes=1) == one
    # Many small ranges (hundreds of cuts) still give the same counts.
    monkeypatch.setattr(bpe_module, "_MAX_RANGE_BYTES", 997)
    assert bpe_module.count_pretokens(path, ["<|endoftext|>"], 2) == bpe_module.count_pretokens(
        path, ["<|endoftext|>"], 1
    )
    many = train_bpe(path, 1500, ["<|endoftext|>"], num_processes=2)
    assert many == one


def test_count_pretokens_equals_counting_the_whole_text(tmp_path, shared_data, monkeypatch):
    text = (shared_data / "multilingual.txt").read_bytes()[:200_000].decode("utf-8", errors="ignore")
    path = write(tmp_path, text)
    whole = Counter(word.encode("utf-8") for word in regex.findall(GPT2_PATTERN, text))
    monkeypatch.setattr(bpe_module, "_MAX_RANGE_BYTES", 1013)
    assert bpe_module.count_pretokens(path, [], num_processes=1) == whole
