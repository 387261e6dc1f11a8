"""Llama-family tokenizer files: HF tokenizer.json and GGUF metadata give HF's ids; what cannot is refused."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scratchlm.tokenizer import Tokenizer, read_gguf_tokenizer_fields

from hf_trained_tokenizers import BOS, EOS, STYLES, SYNTHETIC, UNREACHABLE_WORDS, USER, write_gguf_tokenizer

tokenizers = pytest.importorskip("tokenizers")

def corpus_slices(shared_data: Path, name: str, count: int, size: int) -> str:
    """``count`` slices of ``size`` bytes from evenly spread places, joined by special tokens."""
    data = (shared_data / name).read_bytes()
    starts = [len(data) * (index + 1) // (count + 1) for index in range(count)]
    slices = [data[start : start + size].decode("utf-8", errors="ignore") for start in starts]
    return BOS.join(slices[:1]) + BOS + (USER + " ").join(slices[1:]) + EOS


# ------------------------------------------------------------- HF tokenizer.json


def test_settings_come_from_the_files(hf_folders, hf_tokenizers, ours):
    for style, (preset, ignore_merges, _) in STYLES.items():
        tokenizer, hf = ours[style], hf_tokenizers[style]
        assert tokenizer.pretokenizer == preset and tokenizer.ignore_merges == ignore_merges
        assert tokenizer.bos_id == hf.token_to_id(BOS) and tokenizer.eos_id == hf.token_to_id(EOS)
        assert tokenizer.add_bos is True
        # Every added token, special or not, keeps the id HF gives it.
        assert tokenizer.special_token_ids == {token: hf.token_to_id(token) for token in (BOS, EOS, USER)}
        assert tokenizer.vocab_size == hf.get_vocab_size(with_added_tokens=True)


@pytest.mark.parametrize("style", list(STYLES))
@pytest.mark.parametrize("name", ["python-docs.txt", "multilingual.txt"])
def test_ids_equal_hugging_faces_on_the_corpora(shared_data, hf_tokenizers, ours, style, name):
    text = corpus_slices(shared_data, name, count=4, size=250_000 if name == "python-docs.txt" else 150_000)
    ids = ours[style].encode(text)
    assert ids == hf_tokenizers[style].encode(text, add_special_tokens=False).ids
    assert ours[style].decode(ids) == text
    # HF's default adds bos, as add_bos says generation should.
    assert hf_tokenizers[style].encode(text[:2000]).ids == [ours[style].bos_id] + ours[style].encode(text[:2000])


def test_ignore_merges_takes_whole_vocabulary_tokens(ours):
    plain, ignoring = ours["llama3"], ours["llama3-ignore-merges"]
    built = {left + right for left, right in plain.merges}
    unreachable = [word for word in UNREACHABLE_WORDS if word.encode() in plain._token_ids and word.encode() not in built]
    assert unreachable, "the fixture must hold tokens that no merge builds"
    for word in unreachable:
        whole = plain._token_ids[word.encode()]
        assert ignoring.encode(word) == [whole]
        assert plain.encode(word) != [whole]
    text = " ".join(unreachable) * 3
    assert ignoring.encode(text) != plain.encode(text)


# Text of assigned characters (Unicode 14.0) plus the pieces that make BPE,
# pre-tokenizers and added tokens interact.
TRICKY = [BOS, EOS, USER, "<|", "|>", " ", "  ", "\n", "\r\n", "\n\n", " \n", "'s", "'S", "1", "234", "中文", "ſ", " the",
          " function", "Python", ".", ";\n", "\t", "\u3000", "é"]
TEXT = st.one_of(
    st.text(st.characters(exclude_categories=("Cn", "Cs")), max_size=80),
    st.lists(st.sampled_from(TRICKY), max_size=30).map("".join),
)


@pytest.mark.parametrize("style", list(STYLES))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT)
def test_ids_equal_hugging_faces_on_any_text(hf_tokenizers, ours, style, text):
    ids = ours[style].encode(text)
    assert ids == hf_tokenizers[style].encode(text, add_special_tokens=False).ids
    assert hf_tokenizers[style].decode(ids, skip_special_tokens=False) == ours[style].decode(ids)


def test_a_file_path_reads_the_config_beside_it_and_a_lone_file_reads_the_template(tmp_path, hf_folders, ours):
    folder = hf_folders["llama3-ignore-merges"]
    from_file = Tokenizer.from_hf(folder / "tokenizer.json")
    assert (from_file.bos_id, from_file.eos_id, from_file.add_bos) == (ours["llama3-ignore-merges"].bos_id,
                                                                       ours["llama3-ignore-merges"].eos_id, True)
    lone = tmp_path / "other-name.json"
    shutil.copy(folder / "tokenizer.json", lone)
    alone = Tokenizer.from_hf(lone)
    assert alone.bos_id == from_file.bos_id and alone.add_bos and alone.eos_id is None
    assert alone.encode(SYNTHETIC[:3000]) == from_file.encode(SYNTHETIC[:3000])


def test_the_config_overrides_add_bos(tmp_path, hf_folders):
    folder = tmp_path / "no-bos"
    shutil.copytree(hf_folders["gpt2"], folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(config | {"add_bos_token": False}))
    tokenizer = Tokenizer.from_hf(folder)
    assert tokenizer.add_bos is False and tokenizer.bos_id is not None


def test_a_merge_listed_twice_takes_its_last_rank_as_in_hf(tmp_path, hf_folders, ours):
    def repeat_early_merges(document):
        document["model"]["merges"] += document["model"]["merges"][:50]

    folder = edited_folder(tmp_path, hf_folders["llama3"], repeat_early_merges)
    hf = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer = Tokenizer.from_hf(folder)
    assert tokenizer.merges == ours["llama3"].merges[50:] + ours["llama3"].merges[:50]
    text = SYNTHETIC[:5000]
    assert tokenizer.encode(text) == hf.encode(text, add_special_tokens=False).ids
    # Whether the new ranks change these ids depends on the training text; on a
    # vocabulary made for it they must: "a b" listed again after "b c" ranks below it.
    vocab = {i: bytes([i]) for i in range(256)} | {256: b"ab", 257: b"bc"}
    Tokenizer(vocab, [(b"a", b"b"), (b"b", b"c")], pretokenizer="llama3").save_hf(tmp_path / "small.json")
    document = json.loads((tmp_path / "small.json").read_text())
    document["model"]["merges"].append(document["model"]["merges"][0])
    (tmp_path / "small.json").write_text(json.dumps(document))
    small = Tokenizer.from_hf(tmp_path / "small.json")
    assert small.merges == [(b"b", b"c"), (b"a", b"b")]
    hf_small = tokenizers.Tokenizer.from_file(str(tmp_path / "small.json"))
    assert small.encode("abc") == hf_small.encode("abc", add_special_tokens=False).ids == [97, 257]


# --------------------------------------------------------------- refusals


def edited_folder(tmp_path: Path, source: Path, edit, config_edit=None) -> Path:
    folder = tmp_path / "edited"
    shutil.copytree(source, folder)
    document = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    edit(document)
    (folder / "tokenizer.json").write_text(json.dumps(document, ensure_ascii=False), encoding="utf-8")
    if config_edit is not None:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        config_edit(config)
        (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def set_path(document: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        document = document[key]
    document[last] = value


REFUSED_FIELDS = [
    ("model.type", "WordPiece", r"model\.type is 'WordPiece'; only byte-level BPE"),
    ("model.byte_fallback", True, r"model\.byte_fallback is True; byte fallback"),
    ("model.continuing_subword_prefix", "##", r"model\.continuing_subword_prefix is '##'"),
    ("model.end_of_word_suffix", "</w>", r"model\.end_of_word_suffix is '</w>'"),
    ("model.dropout", 0.1, r"model\.dropout is 0\.1"),
    ("normalizer", {"type": "NFKC"}, r"normalizer is \{'type': 'NFKC'\}; only tokenizers without a normalizer"),
    ("normalizer", {"type": "Sequence", "normalizers": [{"type": "NFC"}, {"type": "Lowercase"}]},
     r"normalizer is .*; only tokenizers without a normalizer \(null\) or with NFC"),
    ("pre_tokenizer", {"type": "Metaspace", "replacement": "▁"}, r"pre_tokenizer\.type is 'Metaspace'"),
    ("pre_tokenizer", {"type": "Whitespace"}, r"pre_tokenizer\.type is 'Whitespace'"),
    ("pre_tokenizer", {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"\p{N}{1,3}"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]},
     r"pre_tokenizer is \[.*\]; the regex splits must be those of a preset"),
    ("pre_tokenizer", {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "x"}, "behavior": "Removed", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
     r"pre_tokenizer\.pretokenizers\[0\]\.behavior is 'Removed'"),
    ("pre_tokenizer", {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
     r"pre_tokenizer\.add_prefix_space is True; expected false"),
    ("pre_tokenizer", {"type": "Digits", "individual_digits": False}, r"individual_digits is False"),
    ("decoder", {"type": "Metaspace"}, r"decoder is \{'type': 'Metaspace'\}"),
    ("post_processor", {"type": "RobertaProcessing"}, r"post_processor\.type is 'RobertaProcessing'"),
]


@pytest.mark.parametrize("field, value, message", REFUSED_FIELDS)
def test_refused_fields_are_named_with_their_values(tmp_path, hf_folders, field, value, message):
    folder = edited_folder(tmp_path, hf_folders["gpt2"], lambda document: set_path(document, field, value))
    with pytest.raises(ValueError, match=message) as error:
        Tokenizer.from_hf(folder)
    assert str(folder / "tokenizer.json") in str(error.value)


def test_refused_added_tokens_and_templates(tmp_path, hf_folders):
    def strip(document):
        document["added_tokens"][2]["single_word"] = True

    with pytest.raises(ValueError, match=r"added_tokens\[2\]\.single_word is True; \('<\|user\|>'\) only false"):
        Tokenizer.from_hf(edited_folder(tmp_path / "a", hf_folders["gpt2"], strip))

    def renumber(document):
        document["added_tokens"][2]["id"] += 7

    with pytest.raises(ValueError, match=r"added_tokens\[2\]\.id is \d+; HF gives '<\|user\|>' id \d+"):
        Tokenizer.from_hf(edited_folder(tmp_path / "b", hf_folders["gpt2"], renumber))

    def two_after(document):
        document["post_processor"]["single"] += [{"SpecialToken": {"id": EOS, "type_id": 0}}] * 2

    with pytest.raises(ValueError, match=r"post_processor\.single is .*one after it \(eos\)"):
        Tokenizer.from_hf(edited_folder(tmp_path / "c", hf_folders["gpt2"], two_after))

    def overlapping_kinds(document):
        document["added_tokens"][2]["normalized"] = True
        document["added_tokens"][2]["content"] = "<|user|><|begin"

    with pytest.raises(ValueError, match=r"added_tokens is \['<\|begin_of_text\|>', '<\|user\|><\|begin'\]"):
        Tokenizer.from_hf(edited_folder(tmp_path / "d", hf_folders["gpt2"], overlapping_kinds))


@pytest.mark.parametrize(
    "config_edit, message",
    [
        (lambda c: c.update(add_eos_token=True, eos_token=None), r"add_eos_token is True; but no eos_token"),
        (lambda c: c.update(add_prefix_space=True), r"add_prefix_space is True"),
        (lambda c: c.update(bos_token="<|nowhere|>"), r"bos_token is '<\|nowhere\|>'; it is not a token"),
        (lambda c: c.update(bos_token=EOS), r"bos_token is '<\|end_of_text\|>'; .* the post-processor's template"),
    ],
)
def test_refused_configs_name_the_config_file(tmp_path, hf_folders, config_edit, message):
    folder = edited_folder(tmp_path, hf_folders["gpt2"], lambda document: None, config_edit)
    with pytest.raises(ValueError, match=message) as error:
        Tokenizer.from_hf(folder)
    assert "tokenizer_config.json" in str(error.value)


@pytest.mark.parametrize("kind", ["Unigram", "WordPiece"])
def test_real_unigram_and_wordpiece_files_are_refused(tmp_path, kind):
    model = getattr(tokenizers.models, kind)()
    hf = tokenizers.Tokenizer(model)
    path = tmp_path / "tokenizer.json"
    hf.save(str(path))
    with pytest.raises(ValueError, match=rf"model\.type is '{kind}'; only byte-level BPE"):
        Tokenizer.from_hf(path)


def test_truncated_or_missing_files_give_clear_errors(tmp_path, hf_folders):
    data = (hf_folders["gpt2"] / "tokenizer.json").read_bytes()
    path = tmp_path / "tokenizer.json"
    for cut in (0, 100, len(data) // 2, len(data) - 1):
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=r"tokenizer\.json' is not valid JSON \(truncated or corrupt\?\)"):
            Tokenizer.from_hf(path)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="holds JSON list, not an object"):
        Tokenizer.from_hf(path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no tokenizer.json"):
        Tokenizer.from_hf(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="is neither"):
        Tokenizer.from_hf(tmp_path / "missing.json")


# ------------------------------------------------------------------- GGUF


@pytest.fixture(scope="module")
def gguf_files(hf_folders, tmp_path_factory) -> dict[str, Path]:
    pytest.importorskip("gguf")
    root = tmp_path_factory.mktemp("gguf")
    return {
        style: write_gguf_tokenizer(folder, root / f"{style}.gguf", STYLES[style][2])
        for style, folder in hf_folders.items()
    }


@pytest.mark.parametrize("style", list(STYLES))
def test_gguf_metadata_gives_hugging_faces_ids(shared_data, gguf_files, hf_tokenizers, ours, style):
    tokenizer = Tokenizer.from_gguf(gguf_files[style])
    reference = ours[style]
    assert (tokenizer.pretokenizer, tokenizer.ignore_merges) == (reference.pretokenizer, reference.ignore_merges)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.add_bos) == (reference.bos_id, reference.eos_id, True)
    assert tokenizer.vocab == reference.vocab and tokenizer.merges == reference.merges
    assert tokenizer.special_token_ids == reference.special_token_ids
    text = corpus_slices(shared_data, "python-docs.txt", 2, 100_000) + corpus_slices(shared_data, "multilingual.txt", 2, 60_000)
    assert tokenizer.encode(text) == hf_tokenizers[style].encode(text, add_special_tokens=False).ids


def test_llama_bpe_adds_bos_unless_the_file_says_otherwise(tmp_path, hf_folders):
    folder = hf_folders["llama3-ignore-merges"]
    assert Tokenizer.from_gguf(write_gguf_tokenizer(folder, tmp_path / "a.gguf", "llama-bpe", add_bos_token=None)).add_bos
    said_no = write_gguf_tokenizer(folder, tmp_path / "b.gguf", "llama-bpe", add_bos_token=False)
    assert not Tokenizer.from_gguf(said_no).add_bos
    assert not Tokenizer.from_gguf(write_gguf_tokenizer(folder, tmp_path / "c.gguf", "gpt-2", add_bos_token=None)).add_bos
    # Without a bos id there is nothing to add (transformers' tokenizer of such a file adds nothing).
    no_bos = Tokenizer.from_gguf(
        write_gguf_tokenizer(folder, tmp_path / "d.gguf", "llama-bpe", add_bos_token=None, bos_token_id=None)
    )
    assert (no_bos.bos_id, no_bos.add_bos) == (None, False)


@pytest.fixture(scope="module")
def gguf_fields(gguf_files) -> dict:
    return read_gguf_tokenizer_fields(gguf_files["gpt2"])


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"model": "llama"}, r"tokenizer\.ggml\.scores is missing; tokenizer\.ggml\.model 'llama' \(SentencePiece\)"),
        ({"model": "bert"}, r"tokenizer\.ggml\.model is 'bert'; that is WordPiece"),
        ({"model": "t5"}, r"tokenizer\.ggml\.model is 't5'; that is Unigram"),
        ({"model": "rwkv"}, r"tokenizer\.ggml\.model is 'rwkv'"),
        ({"pre": "deepseek-llm"}, r"tokenizer\.ggml\.pre is 'deepseek-llm'; known pre-tokenizers are \[.*'llama-bpe'"),
        ({"pre": None}, r"tokenizer\.ggml\.pre is None; known pre-tokenizers"),
        ({"token_type": "byte"}, r"tokenizer\.ggml\.token_type\[70\] is 6; byte tokens"),
        ({"token_type": "short"}, r"tokenizer\.ggml\.token_type is '\d+ types'; expected \d+, one per token"),
        ({"tokens": "unspelled"}, r"tokenizer\.ggml\.tokens\[70\] is 'a b'; not spelled with GPT-2's"),
        ({"bos_token_id": 10**6}, r"tokenizer\.ggml\.bos_token_id is 1000000; ids are 0\.\."),
        ({"bos_token_id": None}, r"tokenizer\.ggml\.add_bos_token is True; but tokenizer\.ggml\.bos_token_id"),
        ({"add_eos_token": True, "eos_token_id": None}, r"tokenizer\.ggml\.add_eos_token is True; but tokenizer\.ggml\.eos"),
        ({"merges": ["a  b"]}, r"tokenizer\.ggml\.merges\[0\] is 'a  b'"),
        ({"tokens": None}, r"tokenizer\.ggml\.tokens is missing"),
    ],
)
def test_refused_gguf_fields_are_named_with_their_values(gguf_fields, changes, message):
    fields = dict(gguf_fields)
    for name, value in changes.items():
        key = "tokenizer.ggml." + name
        if value is None:
            fields.pop(key, None)
        elif value == "byte":
            fields[key] = [6 if index == 70 else kind for index, kind in enumerate(fields[key])]
        elif value == "short":
            fields[key] = fields[key][:-1]
        elif value == "unspelled":
            fields[key] = [*fields[key][:70], "a b", *fields[key][71:]]
        else:
            fields[key] = value
    with pytest.raises(ValueError, match=message) as error:
        Tokenizer.from_gguf_fields(fields, source="test.gguf")
    assert str(error.value).startswith("test.gguf: ")


def test_truncated_and_foreign_gguf_files_name_the_path(tmp_path, gguf_files):
    data = gguf_files["gpt2"].read_bytes()
    path = tmp_path / "cut.gguf"
    for cut in (0, 10, 100, len(data) // 3, len(data) - 10):
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=r"GGUF file '.*cut\.gguf' could not be read \(truncated or corrupt\?\)"):
            Tokenizer.from_gguf(path)
    path.write_bytes(b"not a gguf file at all, just text" * 10)
    with pytest.raises(ValueError, match="could not be read"):
        Tokenizer.from_gguf(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.from_gguf(tmp_path / "missing.gguf")


def test_importing_the_package_does_not_import_gguf_or_hf():
    code = "import sys, scratchlm.tokenizer; print(sorted({'gguf', 'tokenizers', 'transformers'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
