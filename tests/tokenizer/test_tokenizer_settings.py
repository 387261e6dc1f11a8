"""The Llama-family settings (pre-tokenizer, ignore_merges, bos/eos, fixed special ids): checks, save/load, HF export."""

from __future__ import annotations

import json

import pytest

from scratchlm.tokenizer import Tokenizer
from scratchlm.tokenizer.pretokenizers import LLAMA3_PRETOKENIZE_PATTERN

from hf_trained_tokenizers import BOS, EOS, STYLES, SYNTHETIC, USER

BYTES = {i: bytes([i]) for i in range(256)}
SAMPLE = SYNTHETIC[:4000] + BOS + " 12345  \n\n x" + USER + EOS + " It's ſ 中文"


# ------------------------------------------------------------- construction


def test_settings_are_checked_with_the_argument_named():
    with pytest.raises(ValueError, match=r"pretokenizer must be one of .*got 'llama2'"):
        Tokenizer(BYTES, [], pretokenizer="llama2")
    with pytest.raises(ValueError, match="ignore_merges must be a bool, got 1"):
        Tokenizer(BYTES, [], ignore_merges=1)
    with pytest.raises(ValueError, match="add_bos=True needs a bos_token"):
        Tokenizer(BYTES, [], add_bos=True)
    with pytest.raises(ValueError, match=r"bos_token='<s>' is neither a special token nor a token of the vocabulary"):
        Tokenizer(BYTES, [], bos_token="<s>")
    with pytest.raises(ValueError, match=r"eos_token=300 is not an id of the vocabulary \(ids are 0\.\.255\)"):
        Tokenizer(BYTES, [], eos_token=300)
    with pytest.raises(ValueError, match=r"special_tokens\['<s>'\] = 97, but vocab\[97\] is b'a', another token"):
        Tokenizer(BYTES, [], {"<s>": 97})
    with pytest.raises(ValueError, match=r"special_tokens\['<s>'\] must be a non-negative int id"):
        Tokenizer(BYTES, [], {"<s>": -1})


def test_bos_and_eos_by_text_or_id_and_encode_never_adds_bos():
    tokenizer = Tokenizer(BYTES, [], ["<s>", "</s>"], bos_token="<s>", eos_token=257, add_bos=True)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.add_bos) == (256, 257, True)
    assert tokenizer.encode("hi</s>") == [104, 105, 257]
    assert Tokenizer(BYTES, []).bos_id is None and Tokenizer(BYTES, []).add_bos is False


def test_special_tokens_at_fixed_ids_extend_the_vocabulary():
    # Llama 3 numbers its added tokens after the model's vocabulary, with gaps allowed.
    tokenizer = Tokenizer(BYTES, [], {"<|begin_of_text|>": 1000, "a": 97})
    assert tokenizer.special_token_ids == {"<|begin_of_text|>": 1000, "a": 97}
    assert tokenizer.vocab[1000] == b"<|begin_of_text|>" and tokenizer.vocab_size == 1001
    assert tokenizer.encode("xa<|begin_of_text|>") == [120, 97, 1000]


def test_ignore_merges_only_changes_pieces_that_are_whole_tokens():
    # "abc" is in the vocabulary, but the merges build "a" + "bc".
    vocab = BYTES | {256: b"bc", 257: b"abc"}
    merges = [(b"b", b"c")]
    assert Tokenizer(vocab, merges).encode("abc bc") == [97, 256, 32, 256]
    ignoring = Tokenizer(vocab, merges, ignore_merges=True)
    assert ignoring.encode("abc bc") == [257, 32, 256]  # " bc" is no token: merged as usual
    assert ignoring.encode("abc" * 3) == [97, 256] * 3  # one piece, not a token: merged


# ---------------------------------------------------------------- save/load


@pytest.mark.parametrize("style", list(STYLES))
def test_save_and_load_keep_every_setting(tmp_path, ours, style):
    tokenizer = ours[style]
    path = tokenizer.save(tmp_path / "tokenizer.json")
    document = json.loads(path.read_text(encoding="utf-8"))
    assert document["version"] == 2
    assert document["pretokenizer"] == tokenizer.pretokenizer and document["ignore_merges"] == tokenizer.ignore_merges
    assert document["special_tokens"] == tokenizer.special_token_ids
    loaded = Tokenizer.load(path)
    for name in ("vocab", "merges", "special_token_ids", "pretokenizer", "ignore_merges", "bos_id", "eos_id", "add_bos"):
        assert getattr(loaded, name) == getattr(tokenizer, name), name
    assert loaded.encode(SAMPLE) == tokenizer.encode(SAMPLE)
    assert Tokenizer.from_document(tokenizer.to_document()).encode(SAMPLE) == tokenizer.encode(SAMPLE)


def test_version_1_is_written_whenever_it_is_enough():
    plain = Tokenizer(BYTES | {256: b"<eot>"}, [], ["<eot>", "<pad>"])
    assert plain.to_document()["version"] == 1
    assert plain.to_document()["special_tokens"] == ["<eot>", "<pad>"]
    # A special token at an id that version 1 would not give it back needs version 2.
    shadowed = Tokenizer(BYTES | {256: b"<eot>"}, [], {"<eot>": 300})
    document = shadowed.to_document()
    assert document["version"] == 2 and document["special_tokens"] == {"<eot>": 300}
    assert Tokenizer.from_document(document).special_token_ids == {"<eot>": 300}


def test_files_written_before_version_2_still_load_as_gpt2(tmp_path):
    # Exactly what the version 1 writer produced (hex bytes, special tokens by text).
    document = {
        "format": "scratchlm-bpe-tokenizer",
        "version": 1,
        "vocab": {str(i): bytes([i]).hex() for i in range(256)} | {"256": "6162", "257": "3c7c656f747c3e"},
        "merges": [["61", "62"]],
        "special_tokens": ["<|eot|>"],
    }
    path = tmp_path / "old.json"
    path.write_text(json.dumps(document), encoding="utf-8")
    tokenizer = Tokenizer.load(path)
    assert tokenizer.pretokenizer == "gpt2" and not tokenizer.ignore_merges
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.add_bos) == (None, None, False)
    assert tokenizer.encode("ab 12<|eot|>") == [256, 32, 49, 50, 257]
    assert tokenizer.to_document() == document


def test_malformed_and_unknown_documents_are_refused(tmp_path):
    good = Tokenizer(BYTES, [], pretokenizer="llama3").to_document()
    with pytest.raises(ValueError, match=r"reads versions 1, 2, 3"):
        Tokenizer.from_document(good | {"version": 4})
    broken = dict(good)
    del broken["pretokenizer"]
    with pytest.raises(ValueError, match=r"checkpoint x is a malformed version 2 tokenizer: KeyError: 'pretokenizer'"):
        Tokenizer.from_document(broken, source="checkpoint x")
    path = tmp_path / "cut.json"
    path.write_text(json.dumps(good)[:500])
    with pytest.raises(ValueError, match=r"cut\.json' is not valid JSON \(truncated or corrupt\?\)"):
        Tokenizer.load(path)


# --------------------------------------------------------------- HF export


@pytest.mark.parametrize("style", list(STYLES))
def test_save_hf_round_trips_through_hugging_face(tmp_path, ours, style):
    tokenizers = pytest.importorskip("tokenizers")
    tokenizer = ours[style]
    path = tokenizer.save_hf(tmp_path / "tokenizer.json")
    hf = tokenizers.Tokenizer.from_file(str(path))
    ids = tokenizer.encode(SAMPLE)
    assert hf.encode(SAMPLE, add_special_tokens=False).ids == ids
    assert hf.encode(SAMPLE).ids == [tokenizer.bos_id] + ids  # the bos template
    back = Tokenizer.from_hf(path)
    assert (back.pretokenizer, back.ignore_merges, back.bos_id, back.add_bos) == (
        tokenizer.pretokenizer, tokenizer.ignore_merges, tokenizer.bos_id, True
    )
    assert back.vocab == tokenizer.vocab and back.special_token_ids == tokenizer.special_token_ids
    assert back.merges == tokenizer.merges  # written as "a b" strings, read from [a, b] pairs before


def test_save_hf_writes_each_presets_pipeline(tmp_path):
    tokenizer = Tokenizer(BYTES, [], pretokenizer="llama3", ignore_merges=True)
    document = json.loads(tokenizer.save_hf(tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    split, byte_level = document["pre_tokenizer"]["pretokenizers"]
    assert split == {"type": "Split", "pattern": {"Regex": LLAMA3_PRETOKENIZE_PATTERN}, "behavior": "Isolated",
                     "invert": False}
    assert byte_level["type"] == "ByteLevel" and byte_level["use_regex"] is False
    assert document["model"]["ignore_merges"] is True and document["post_processor"] is None


@pytest.mark.parametrize("style", ["llama3-ignore-merges", "gpt2-digits"])
def test_auto_tokenizer_loads_the_saved_folder_with_the_same_ids(tmp_path, ours, style):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    tokenizer = ours[style]
    folder = tokenizer.save_hf_folder(tmp_path / "folder")
    auto = transformers.AutoTokenizer.from_pretrained(str(folder))
    ids = tokenizer.encode(SAMPLE)
    assert auto(SAMPLE, add_special_tokens=False)["input_ids"] == ids
    assert auto(SAMPLE)["input_ids"] == [tokenizer.bos_id] + ids
    assert (auto.bos_token, auto.eos_token) == (BOS, EOS)
    assert auto.decode(ids) == tokenizer.decode(ids)
    back = Tokenizer.from_hf(folder)
    assert (back.bos_id, back.eos_id, back.add_bos) == (tokenizer.bos_id, tokenizer.eos_id, tokenizer.add_bos)


def test_save_hf_folder_needs_bos_and_eos_to_be_special(tmp_path):
    tokenizer = Tokenizer(BYTES, [], bos_token="a")
    with pytest.raises(ValueError, match="bos_id=97 is not a special token; transformers would turn it into one"):
        tokenizer.save_hf_folder(tmp_path / "folder")
    assert not (tmp_path / "folder").exists()
