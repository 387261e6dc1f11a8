"""SentencePiece-style BPE (Llama 2, TinyLlama, Mistral, Gemma): the same ids and text as HF ``tokenizers``.

Every tokenizer is built by HF itself (see ``sentencepiece_files.py``), in
each family's form, then loaded with ``Tokenizer.from_hf`` and compared id
for id on slices of the shared corpora and on edge strings.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from scratchlm.tokenizer import Tokenizer, encode_file, read_token_file
from scratchlm.tokenizer import file_encoding
from scratchlm.tokenizer import tokenizer as tokenizer_module

from sentencepiece_files import BOS, EOS, FORMS, SYNTHETIC, UNK, build_hf, train_vocab, write_folder

tokenizers = pytest.importorskip("tokenizers")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
EDGE_TEXTS = [
    "", " ", "  ", "\n", "hello", " hello", "   hello  world  ", "hello\n\n  world\t!", "\t\tx", "a\r\nb",
    "😀", "a😀b", "中文的字😀🇩🇪", "Füße 1234567890", "x\u2581y", "\u2581\u2581start", "trailing ",
    f"{BOS}hello", f"hello{BOS}", f"hello {EOS} world", f"{BOS} {EOS}", f"{BOS}{BOS}  x{EOS}", f"{UNK}x",
    "def f(x):\n    return x ** 2\n", "\u0301\u0301 combining", "\U0001F600\U0001F600\U0001F600 triple",
]


def _corpus_slices() -> list[str]:
    if not SHARED_DATA.is_dir():
        return [SYNTHETIC[:4000]]
    docs = (SHARED_DATA / "python-docs.txt").read_bytes()[500_000:512_000].decode("utf-8", "ignore")
    multi = (SHARED_DATA / "multilingual.txt").read_bytes()[900_000:906_000].decode("utf-8", "ignore")
    return [docs, multi]


@pytest.fixture(scope="module")
def trained() -> tuple[dict, list]:
    if SHARED_DATA.is_dir():
        docs = (SHARED_DATA / "python-docs.txt").read_bytes()[:150_000].decode("utf-8", "ignore")
        multi = (SHARED_DATA / "multilingual.txt").read_bytes()[:40_000].decode("utf-8", "ignore")
        return train_vocab(docs + multi)
    return train_vocab(SYNTHETIC)


@pytest.fixture(scope="module")
def folders(trained, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sentencepiece")
    return {form: write_folder(build_hf(*trained, form), root / form) for form in FORMS}


def _texts() -> list[str]:
    return EDGE_TEXTS + _corpus_slices()


def _check_same_as_hf(hf, ours: Tokenizer, texts: list[str]) -> None:
    for text in texts:
        expected = hf.encode(text, add_special_tokens=False).ids
        got = ours.encode(text)
        assert got == expected, f"ids differ for {text[:80]!r}"
        decoded = hf.decode(expected, skip_special_tokens=False)
        assert ours.decode(got) == decoded, f"decode differs for {text[:80]!r}"


@pytest.mark.parametrize("form", FORMS)
def test_each_form_loads_with_hf_ids_and_text(form, folders):
    folder = folders[form]
    hf = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    ours = Tokenizer.from_hf(folder)
    assert (ours.metaspace, ours.metaspace_split, ours.decoder) == FORMS[form]
    assert ours.byte_fallback and ours.unk_id == 0 and ours.fuse_unk
    assert (ours.bos_id, ours.eos_id, ours.add_bos) == (1, 2, True)
    assert ours._sentencepiece.cuts_before_spaces  # trained with words cut before ▁
    texts = _texts()
    _check_same_as_hf(hf, ours, texts)
    # decode(encode(text)) is the text wherever HF's round-trips.
    for text in texts:
        if hf.decode(hf.encode(text, add_special_tokens=False).ids, skip_special_tokens=False) == text:
            assert ours.decode(ours.encode(text)) == text
    # decode_bytes streams: token by token it gives the bytes of the whole, which
    # decode strips of one leading space where the decoder does.
    ids = ours.encode(texts[-1])
    whole = ours.decode_bytes(ids)
    assert b"".join(ours.decode_bytes([token_id]) for token_id in ids) == whole
    if ours.decoder == "sentencepiece-strip":
        assert ours.decode(ids) == whole.decode("utf-8").removeprefix(" ")
    # The bos HF's template adds is ours.bos_id.
    assert hf.encode("hi").ids == [ours.bos_id] + ours.encode("hi")


@pytest.mark.parametrize("form", FORMS)
def test_every_single_id_decodes_as_in_hf(form, folders):
    folder = folders[form]
    hf = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    ours = Tokenizer.from_hf(folder)
    for token_id in range(ours.vocab_size):
        assert ours.decode([token_id]) == hf.decode([token_id], skip_special_tokens=False), token_id
        ours.decode_bytes([token_id])
    # Byte tokens that are not valid UTF-8 together: one U+FFFD per token, as HF.
    broken = [3 + 0xE4, 3 + 0xB8, 3 + ord("a")]
    assert ours.decode(broken) == hf.decode(broken, skip_special_tokens=False)


@pytest.mark.parametrize(
    "options",
    [
        {"fuse_unk": False, "drop_tokens": ("<0xF0>", "<0xE4>")},
        {"fuse_unk": True, "drop_tokens": ("<0xF0>", "<0xE4>")},
        {"unk": None, "drop_tokens": ("<0xF0>",)},
        {"byte_fallback": False},
        {"byte_fallback": False, "unk": None},
    ],
    ids=["no-fuse", "fuse", "no-unk", "no-fallback", "no-fallback-no-unk"],
)
@pytest.mark.parametrize("form", ["llama2-legacy", "metaspace-first", "metaspace-always-split-msdecoder"])
def test_unk_and_byte_fallback_options(form, options, trained, tmp_path):
    hf = build_hf(*trained, form, **options)
    folder = write_folder(hf, tmp_path / "tok")
    ours = Tokenizer.from_hf(folder)
    # 😀 (F0 ...) and 中 (E4 ...) lack a byte token; é and x have tokens.
    texts = ["😀", "😀😀x", "x😀中y", "q😀é😀", "中文 😀 x 中", " 😀", "Ωx😀Ω"] + EDGE_TEXTS
    _check_same_as_hf(hf, ours, texts + _corpus_slices()[-1:])


def test_a_vocabulary_that_joins_across_spaces_merges_whole_segments(trained, tmp_path):
    """Tokens with ▁ after another character make cutting before ▁ inexact: then segments are merged whole."""
    extra = (("e", "▁"), ("e▁", "▁"), ("s", "▁t"), (".", "▁"))
    hf = build_hf(*trained, "llama2-legacy", extra_merges=extra)
    ours = Tokenizer.from_hf(write_folder(hf, tmp_path / "tok"))
    assert not ours._sentencepiece.cuts_before_spaces
    assert ours._sentencepiece.stream_cut_pattern() is None
    texts = ["the  test. There", "de  e   tests. The", "a" * 40 + "e " * 30] + _texts()
    _check_same_as_hf(hf, ours, texts)
    assert any("e▁" in hf.encode(text).tokens for text in texts)
    # Streaming finds no cut and still gives encode's ids.
    text = "tests e  s the. " * 50
    assert list(ours.encode_iterable([text[i : i + 7] for i in range(0, len(text), 7)])) == ours.encode(text)


@pytest.mark.parametrize("form", ["llama2-legacy", "metaspace-first", "metaspace-always-split-msdecoder", "gemma"])
def test_ignore_merges_looks_up_hf_words_whole(form, trained, tmp_path):
    """Without split HF's word is the whole segment; with it, the text up to the next ▁."""
    words = ("\u2581the\u2581cat", "\u2581xyzzy", "xyzzy", "\u2581qj")
    hf = build_hf(*trained, form, ignore_merges=True, extra_tokens=words)
    ours = Tokenizer.from_hf(write_folder(hf, tmp_path / "tok"))
    assert ours.ignore_merges
    texts = ["the cat", " the cat", "xyzzy", "a xyzzy b", " xyzzy", "qj", " qj qj", "the cat sat"] + EDGE_TEXTS
    _check_same_as_hf(hf, ours, texts + _corpus_slices()[:1])
    assert any(len(hf.encode(text, add_special_tokens=False).ids) == 1 for text in texts)
    text = "the cat xyzzy qj " * 40
    chunks = [text[i : i + 5] for i in range(0, len(text), 5)]
    assert list(ours.encode_iterable(chunks)) == ours.encode(text)


@pytest.mark.parametrize("metaspace", ["prepend", "always", "first", "never"])
@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("decoder", ["sentencepiece", "sentencepiece-strip", "metaspace"])
def test_every_constructor_setting_exports_to_hf(metaspace, split, decoder, folders, tmp_path):
    loaded = Tokenizer.from_hf(folders["metaspace-first"])
    settings = {"metaspace": metaspace, "metaspace_split": split, "decoder": decoder, "byte_fallback": True}
    if split and metaspace == "prepend":  # HF's Prepend form never splits
        with pytest.raises(ValueError, match="metaspace_split=True needs"):
            Tokenizer(loaded.vocab, loaded.merges, loaded.special_token_ids, **settings)
        return
    ours = Tokenizer(loaded.vocab, loaded.merges, loaded.special_token_ids, unk_token=UNK, fuse_unk=True, **settings)
    hf = tokenizers.Tokenizer.from_file(str(ours.save_hf(tmp_path / "tokenizer.json")))
    _check_same_as_hf(hf, ours, _texts())
    back = Tokenizer.from_hf(tmp_path / "tokenizer.json")
    assert (back.metaspace, back.metaspace_split, back.decoder) == (metaspace, split, decoder)


@pytest.mark.parametrize("form", FORMS)
def test_save_load_and_save_hf_round_trip(form, folders, tmp_path):
    ours = Tokenizer.from_hf(folders[form])
    reloaded = Tokenizer.load(ours.save(tmp_path / "tok.json"))
    document = json.loads((tmp_path / "tok.json").read_text(encoding="utf-8"))
    assert document["version"] == 3 and document["metaspace"] == FORMS[form][0]
    exported = tokenizers.Tokenizer.from_file(str(ours.save_hf(tmp_path / "tokenizer.json")))
    folder = ours.save_hf_folder(tmp_path / "folder")
    from_folder = Tokenizer.from_hf(folder)
    for other in (reloaded, from_folder):
        assert (other.metaspace, other.metaspace_split, other.decoder, other.byte_fallback) == FORMS[form] + (True,)
    for text in _texts():
        ids = ours.encode(text)
        assert reloaded.encode(text) == ids and from_folder.encode(text) == ids
        assert exported.encode(text, add_special_tokens=False).ids == ids
        assert exported.decode(ids, skip_special_tokens=False) == ours.decode(ids)


@pytest.mark.parametrize("form", ["llama2-legacy", "metaspace-first", "gemma"])
def test_transformers_reads_an_exported_folder_to_the_same_ids(form, folders, tmp_path):
    transformers = pytest.importorskip("transformers")
    ours = Tokenizer.from_hf(folders[form])
    theirs = transformers.AutoTokenizer.from_pretrained(str(ours.save_hf_folder(tmp_path / "folder")))
    for text in EDGE_TEXTS + _corpus_slices():
        ids = ours.encode(text)
        assert theirs(text)["input_ids"] == [ours.bos_id] + ids
        assert theirs.decode(ids) == ours.decode(ids)


def test_constructor_builds_the_same_tokenizer_as_from_hf(folders):
    """The keyword API (what a GGUF reader uses) gives from_hf's tokenizer."""
    loaded = Tokenizer.from_hf(folders["llama2-legacy"])
    built = Tokenizer(
        loaded.vocab, loaded.merges, {UNK: 0, BOS: 1, EOS: 2},
        metaspace="prepend", byte_fallback=True, unk_token=UNK, fuse_unk=True,
        bos_token=BOS, eos_token=EOS, add_bos=True,
    )
    assert built.decoder == "sentencepiece-strip"
    for text in _texts():
        assert built.encode(text) == loaded.encode(text)
    assert "metaspace='prepend'" in repr(built)
    with pytest.raises(ValueError, match="SentencePiece-style"):
        built.save_gpt2_files("encoder.json", "vocab.bpe")


@settings(max_examples=60, deadline=None)
@given(
    text=st.lists(st.sampled_from(list("ab e\u2581\n😀中") + [BOS, "x y", "  ", "the"]), max_size=20).map("".join),
    cuts=st.lists(st.integers(0, 40), max_size=6),
    form=st.sampled_from(sorted(FORMS)),
)
def test_encode_iterable_and_encode_file_equal_encode(folders, tmp_path_factory, monkeypatch_module, text, cuts, form):
    ours = _loaded(folders, form)
    bounds = sorted({0, len(text), *(min(c, len(text)) for c in cuts)})
    chunks = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    assert list(ours.encode_iterable(chunks)) == ours.encode(text)
    path = tmp_path_factory.mktemp("file") / "in.txt"
    path.write_bytes(text.encode("utf-8"))
    encode_file(ours, path, path.with_suffix(".npy"))
    assert read_token_file(path.with_suffix(".npy")).tolist() == ours.encode(text)


@pytest.fixture(scope="module")
def with_added_tokens(trained, tmp_path_factory) -> dict[str, tuple]:
    """(HF, ours) per form, with two non-special added tokens (normalized, as HF makes them by default).

    The Prepend form refuses normalized added tokens, so it has none.
    """
    root = tmp_path_factory.mktemp("added")
    pairs = {}
    for form in FORMS:
        hf = build_hf(*trained, form)
        if form != "llama2-legacy":
            hf.add_tokens(["hello", "<t>"])
        pairs[form] = (hf, Tokenizer.from_hf(write_folder(hf, root / form)))
    return pairs


@settings(max_examples=150, deadline=None)
@given(
    text=st.lists(
        st.sampled_from(list("ab e\u2581\n\t😀中xyz.7") + [BOS, EOS, "hello", "<t>", "  ", "the", "\u2581\u2581"]),
        max_size=14,
    ).map("".join),
    form=st.sampled_from(sorted(FORMS)),
)
def test_random_text_has_hf_ids_and_text(with_added_tokens, text, form):
    hf, ours = with_added_tokens[form]
    _check_same_as_hf(hf, ours, [text])


_LOADED: dict = {}


def _loaded(folders, form) -> Tokenizer:
    if form not in _LOADED:
        _LOADED[form] = Tokenizer.from_hf(folders[form])
    return _LOADED[form]


@pytest.fixture(scope="module")
def monkeypatch_module():
    """Streams and files cut as often as they can."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tokenizer_module, "_STREAM_MIN_CHARS", 1)
        patch.setattr(file_encoding, "_RANGE_BYTES", 3)
        yield patch


@pytest.mark.parametrize("form", ["llama2-legacy", "metaspace-first-split", "gemma"])
def test_long_text_streams_and_files_in_parallel_equal_encode(form, folders, tmp_path, monkeypatch):
    monkeypatch.setattr(tokenizer_module, "_STREAM_MIN_CHARS", 512)
    monkeypatch.setattr(file_encoding, "_RANGE_BYTES", 2048)
    ours = Tokenizer.from_hf(folders[form])
    text = "".join(_corpus_slices()) + f" {BOS} tail"
    expected = ours.encode(text)
    lines = text.splitlines(keepends=True)
    assert list(ours.encode_iterable(lines)) == expected
    path = tmp_path / "in.txt"
    path.write_bytes(text.encode("utf-8"))
    encode_file(ours, path, tmp_path / "out.npy", num_processes=2)
    assert np.load(tmp_path / "out.npy").tolist() == expected


def test_cli_tokenize_reads_a_sentencepiece_folder(folders, tmp_path):
    from scratchlm.cli import main

    text = "".join(_corpus_slices())[:3000]
    (tmp_path / "in.txt").write_text(text, encoding="utf-8")
    for index, source in enumerate((folders["gemma"], folders["llama2-legacy"] / "tokenizer.json")):
        output = tmp_path / f"out{index}.npy"
        argv = ["tokenize", "--tokenizer", str(source), "--input", str(tmp_path / "in.txt"), "--output", str(output)]
        assert main(argv) == 0
        assert np.load(output).tolist() == Tokenizer.from_hf(source).encode(text)


VOCAB = {0: b"<unk>", 1: "\u2581".encode(), 2: b"a", 3: "\u2581a".encode()}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"metaspace": "sometimes"}, r"metaspace must be None or one of .*'sometimes'"),
        ({"metaspace": "first", "metaspace_split": "yes"}, r"metaspace_split must be a bool, got 'yes'"),
        ({"metaspace_split": True}, r"metaspace_split=True needs metaspace"),
        ({"byte_fallback": True}, r"byte_fallback=True needs metaspace"),
        ({"decoder": "sentencepiece"}, r"decoder='sentencepiece' needs metaspace"),
        ({"metaspace": "prepend", "metaspace_split": True}, r"metaspace_split=True needs metaspace 'always'"),
        ({"metaspace": "first", "decoder": "bytelevel"}, r"decoder must be None or one of .*'bytelevel'"),
        ({"metaspace": "first", "pretokenizer": "llama3"}, r"expected the default pretokenizer"),
        ({"metaspace": "first", "normalizer": "nfc"}, r"normalizer=None"),
    ],
)
def test_bad_settings_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Tokenizer(VOCAB, [("\u2581".encode(), b"a")], **kwargs)


def test_unsupported_files_are_refused_by_field(folders, tmp_path):
    document = json.loads((folders["llama2-legacy"] / "tokenizer.json").read_text(encoding="utf-8"))

    def refused(change, message):
        broken = json.loads(json.dumps(document))
        change(broken)
        path = tmp_path / "tokenizer.json"
        path.write_text(json.dumps(broken), encoding="utf-8")
        with pytest.raises(ValueError, match=message):
            Tokenizer.from_hf(path)

    refused(lambda d: d.update(normalizer={"type": "NFKC"}), r"normalizer is .*NFKC.*Precompiled")
    refused(lambda d: d.update(pre_tokenizer={"type": "Whitespace"}), r"pre_tokenizer is .*expected null")
    refused(lambda d: d.update(decoder={"type": "WordPiece"}), r"decoder is .*ByteFallback")
    refused(lambda d: d["added_tokens"][1].update(normalized=True), r"added_tokens\[1\]\.normalized")
    refused(lambda d: d["added_tokens"][1].update(single_word=True), r"added_tokens\[1\]\.single_word")
    refused(
        lambda d: (d.update(normalizer=None), d.update(pre_tokenizer={"type": "Metaspace", "replacement": "_"})),
        r"pre_tokenizer\.replacement",
    )

    def unk_elsewhere(d):
        d["model"]["unk_token"] = "<missing>"
        del d["model"]["vocab"]["<0x00>"]

    refused(unk_elsewhere, r"model\.unk_token is '<missing>'")
