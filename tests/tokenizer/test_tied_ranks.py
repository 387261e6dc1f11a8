"""GGUF ``llama`` vocabularies whose scores tie: the Tokenizer merges as llama.cpp (leftmost among equal scores)."""

from __future__ import annotations

import random

import pytest

from scratchlm.tokenizer import Tokenizer

from llama_cpp_spm import llama_cpp_tokenize

NORMAL, UNKNOWN, CONTROL, BYTE = 1, 2, 3, 6


def tied_fields(rng: random.Random, alphabet: str, size: int) -> tuple[dict, list[str], list[float], list[int]]:
    """GGUF fields of a vocabulary with few distinct scores (so different tokens tie), plus its lists."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{byte:02X}>" for byte in range(256)] + list(alphabet)
    base = len(tokens)
    while len(tokens) < base + size:
        token = "".join(rng.choice(alphabet) for _ in range(rng.randint(2, 5)))
        if token not in tokens:
            tokens.append(token)
    types = [UNKNOWN, CONTROL, CONTROL] + [BYTE] * 256 + [NORMAL] * (len(tokens) - 259)
    scores = [0.0] * base + [-float(rng.randint(0, 2)) for _ in range(len(tokens) - base)]
    fields = {"model": "llama", "tokens": tokens, "scores": scores, "token_type": types,
              "bos_token_id": 1, "eos_token_id": 2, "unknown_token_id": 0}
    return {"tokenizer.ggml." + key: value for key, value in fields.items()}, tokens, scores, types


def test_the_docstring_example_ties_as_llama_cpp():
    """``ab`` and ``bc`` share a score: on "abc" llama.cpp merges the leftmost, ``ab``."""
    tokens = ["<unk>", "a", "b", "c", "bc", "ab", "\u2581"]
    types = [UNKNOWN] + [NORMAL] * 6
    scores = [0.0, 0.0, 0.0, 0.0, -1.0, -1.0, 0.0]
    fields = {"tokenizer.ggml." + key: value for key, value in
              {"model": "llama", "tokens": tokens, "scores": scores, "token_type": types, "unknown_token_id": 0,
               "add_space_prefix": False}.items()}
    ours = Tokenizer.from_gguf_fields(fields)
    assert ours.encode("abc") == llama_cpp_tokenize("abc", tokens, scores, types, add_space_prefix=False) == [5, 3]
    # Saved and loaded, the ties stay; the version 3 file without merge_ranks still loads (as list ranks).
    document = ours.to_document()
    assert document["merge_ranks"] == [0, 0]
    assert Tokenizer.from_document(document).encode("abc") == [5, 3]
    assert Tokenizer.from_document({k: v for k, v in document.items() if k != "merge_ranks"}).encode("abc") == [1, 4]


@pytest.mark.parametrize("alphabet", ["ab\u2581", "abc\u2581"])
def test_random_tied_vocabularies_give_llama_cpps_ids(alphabet):
    rng = random.Random(len(alphabet))
    for _ in range(40):
        fields, tokens, scores, types = tied_fields(rng, alphabet, rng.randint(4, 16))
        ours = Tokenizer.from_gguf_fields(fields)
        for _ in range(15):
            text = "".join(rng.choice(alphabet.replace("\u2581", " ") + "x") for _ in range(rng.randint(0, 20)))
            expected = llama_cpp_tokenize(text, tokens, scores, types)
            assert ours.encode(text) == expected, (tokens[259:], scores[259:], text)


def test_bad_merge_ranks_are_named():
    vocab = {0: b"a", 1: b"b", 2: b"ab", 3: b"c", 4: b"bc"}
    merges = [(b"a", b"b"), (b"b", b"c")]
    with pytest.raises(ValueError, match="merge_ranks is only supported with SentencePiece-style BPE"):
        Tokenizer(vocab, merges, merge_ranks=[0, 0])
    with pytest.raises(ValueError, match=r"merge_ranks must hold one rank per merge \(2\), got 1"):
        Tokenizer(vocab, merges, metaspace="never", merge_ranks=[0])
    with pytest.raises(ValueError, match=r"must not decrease .* merge_ranks\[1\] = 0 < merge_ranks\[0\] = 1"):
        Tokenizer(vocab, merges, metaspace="never", merge_ranks=[1, 0])
    with pytest.raises(ValueError, match=r"merge_ranks\[0\] must be a non-negative int, got -1"):
        Tokenizer(vocab, merges, metaspace="never", merge_ranks=[-1, 0])


def test_cli_tokenize_reads_a_tied_gguf_file(tmp_path):
    """``scratchlm tokenize --tokenizer x.gguf`` with a SentencePiece GGUF: llama.cpp's ids."""
    import numpy as np

    from scratchlm.cli import main

    from hf_trained_tokenizers import write_gguf_metadata

    fields, tokens, scores, types = tied_fields(random.Random(7), "abc\u2581", 14)
    path = write_gguf_metadata({key.rsplit(".", 1)[1]: value for key, value in fields.items()}, tmp_path / "t.gguf",
                               "llama")
    text = "abc cab  bca\nx " * 50
    (tmp_path / "in.txt").write_text(text, encoding="utf-8")
    output = tmp_path / "o.npy"
    argv = ["tokenize", "--tokenizer", str(path), "--input", str(tmp_path / "in.txt"), "--output", str(output)]
    assert main(argv) == 0
    assert np.load(output).tolist() == llama_cpp_tokenize(text, tokens, scores, types)
