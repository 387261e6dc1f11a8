"""add_bos/add_eos, the pad token and skip_special_tokens, as HF and GGUF files say, against HF itself."""

from __future__ import annotations

import json
import shutil

import pytest

from scratchlm.tokenizer import Tokenizer
from scratchlm.tokenizer.saved_format import tokenizer_document

from hf_trained_tokenizers import BOS, EOS, SYNTHETIC, USER, write_gguf_tokenizer

tokenizers = pytest.importorskip("tokenizers")

TEXTS = ["", "hello world", SYNTHETIC[:400], f"{BOS}a{EOS} b {USER}c", "  \n\t x"]


def _bos_eos_folder(tmp_path, hf_folders, config_changes: dict, add_bos: bool = True, add_eos: bool = True):
    """The llama3 folder with a post-processor adding bos and/or eos (none: no post-processor), config changed."""
    folder = tmp_path / "folder"
    shutil.copytree(hf_folders["llama3"], folder)
    hf = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    before, after = [BOS] if add_bos else [], [EOS] if add_eos else []
    single = " ".join(before + ["$A"] + after)
    if add_bos or add_eos:
        hf.post_processor = tokenizers.processors.TemplateProcessing(
            single=single, pair=f"{single} {single.replace('$A', '$B')}",
            special_tokens=[(token, hf.token_to_id(token)) for token in before + after],
        )
    document = json.loads(hf.to_str())
    if not (add_bos or add_eos):
        document["post_processor"] = None
    (folder / "tokenizer.json").write_text(json.dumps(document, ensure_ascii=False), encoding="utf-8")
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    config = {key: value for key, value in (config | config_changes).items() if value is not None}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def test_a_template_adding_bos_and_eos_gives_hfs_ids(tmp_path, hf_folders):
    folder = _bos_eos_folder(tmp_path, hf_folders, {"add_bos_token": None})
    hf = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    ours = Tokenizer.from_hf(folder)
    assert ours.add_bos and ours.add_eos and ours.eos_id == hf.token_to_id(EOS)
    for text in TEXTS:
        assert ours.encode(text, add_special_tokens=True) == hf.encode(text).ids
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False).ids
    # The lone tokenizer.json says the same through its template.
    assert Tokenizer.from_hf(folder / "tokenizer.json").add_eos


@pytest.mark.parametrize("add_bos, add_eos", [(True, True), (False, True), (True, False), (False, False)])
def test_config_flags_and_pad_token_give_transformers_ids(tmp_path, hf_folders, add_bos, add_eos):
    transformers = pytest.importorskip("transformers")
    folder = _bos_eos_folder(
        tmp_path, hf_folders, {"add_bos_token": add_bos, "add_eos_token": add_eos, "pad_token": EOS, "eos_token": EOS},
        add_bos, add_eos,
    )
    theirs = transformers.AutoTokenizer.from_pretrained(str(folder))
    ours = Tokenizer.from_hf(folder)
    assert (ours.add_bos, ours.add_eos, ours.pad_id) == (add_bos, add_eos, theirs.pad_token_id)
    for text in TEXTS:
        assert ours.encode(text, add_special_tokens=True) == theirs.encode(text)
    # Written back out, transformers reads the same flags and ids.
    again = transformers.AutoTokenizer.from_pretrained(str(ours.save_hf_folder(tmp_path / "out")))
    assert again.pad_token_id == ours.pad_id
    for text in TEXTS:
        assert again.encode(text) == ours.encode(text, add_special_tokens=True)
    assert Tokenizer.from_hf(tmp_path / "out").to_document() == ours.to_document()


def test_gguf_add_eos_and_padding_id(tmp_path, hf_folders):
    ids = json.loads((hf_folders["llama3"] / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
    path = write_gguf_tokenizer(
        hf_folders["llama3"], tmp_path / "t.gguf", "llama-bpe", add_eos_token=True, padding_token_id=ids[EOS]
    )
    ours = Tokenizer.from_gguf(path)
    assert (ours.add_bos, ours.add_eos, ours.pad_id) == (True, True, ids[EOS])
    assert ours.encode("hi there", add_special_tokens=True) == [ids[BOS], *ours.encode("hi there"), ids[EOS]]


def test_saved_files_keep_add_eos_and_pad_and_old_documents_still_load(tmp_path):
    vocab = {i: bytes([i]) for i in range(256)}
    tokenizer = Tokenizer(vocab, [], {"<s>": 256, "</s>": 257, "<pad>": 258}, bos_token="<s>", eos_token="</s>",
                          add_eos=True, pad_token="<pad>")
    loaded = Tokenizer.load(tokenizer.save(tmp_path / "t.json"))
    assert (loaded.add_eos, loaded.pad_id, loaded.add_bos) == (True, 258, False)
    assert loaded.encode("ab", add_special_tokens=True) == [97, 98, 257]
    # A version 2 document from before these keys loads with neither.
    old = tokenizer_document(vocab, [], {"<s>": 256, "</s>": 257, "<pad>": 258}, pretokenizer="gpt2",
                             ignore_merges=False, bos_id=256, eos_id=257, add_bos=True)
    assert "add_eos" not in old and "pad_id" not in old
    plain = Tokenizer.from_document(old)
    assert (plain.add_eos, plain.pad_id) == (False, None)
    assert plain.encode("ab", add_special_tokens=True) == [256, 97, 98]


def test_bad_add_eos_pad_and_flags_are_named():
    vocab = {i: bytes([i]) for i in range(256)}
    with pytest.raises(ValueError, match="add_eos=True needs an eos_token"):
        Tokenizer(vocab, [], add_eos=True)
    with pytest.raises(ValueError, match="add_eos must be a bool, got 1"):
        Tokenizer(vocab, [], eos_token=0, add_eos=1)
    with pytest.raises(ValueError, match="pad_token=999 is not an id"):
        Tokenizer(vocab, [], pad_token=999)
    with pytest.raises(ValueError, match="add_special_tokens must be a bool, got 'yes'"):
        Tokenizer(vocab, []).encode("a", add_special_tokens="yes")
    with pytest.raises(ValueError, match="skip_special_tokens must be a bool, got None"):
        Tokenizer(vocab, []).decode([97], skip_special_tokens=None)
    with pytest.raises(ValueError, match="999"):
        Tokenizer(vocab, []).decode([97, 999], skip_special_tokens=True)


@pytest.mark.parametrize("style", ["llama3", "gpt2"])
def test_skip_special_tokens_decodes_as_hf(hf_folders, hf_tokenizers, ours, style):
    hf, tokenizer = hf_tokenizers[style], ours[style]
    # USER is an added token that is not special: HF keeps it, and so must we.
    for text in [f"{BOS}hello{EOS} world {EOS}", f"{BOS}{BOS}", SYNTHETIC[:300] + EOS, f"a{USER}b{BOS}"]:
        ids = tokenizer.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False).ids
        for skip in (False, True):
            assert tokenizer.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


# ------------------------------------------------------------ lstrip/rstrip

STRIP_TEXTS = [
    "a  <mask>  b", "x\n\t<mask>y", "a [INST] \n b", "a\u3000<mask>", "a\x1c<mask> b", "[INST] <mask>",
    f"a [INST]  <mask> b{EOS}  c", "<mask>", "  [INST]", "q [INST]", "no specials here  ", SYNTHETIC[:300] + " <mask> ",
]


@pytest.fixture(scope="module")
def strip_folder(hf_folders, tmp_path_factory):
    """The llama3 folder plus an lstrip token (RoBERTa-style ``<mask>``) and an rstrip one (Mistral-style)."""
    folder = tmp_path_factory.mktemp("strip") / "folder"
    shutil.copytree(hf_folders["llama3"], folder)
    hf = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    hf.add_special_tokens([
        tokenizers.AddedToken("<mask>", lstrip=True, normalized=False, special=True),
        tokenizers.AddedToken("[INST]", rstrip=True, normalized=False, special=True),
    ])
    hf.save(str(folder / "tokenizer.json"))
    return folder


def test_lstrip_and_rstrip_tokens_give_hfs_ids(strip_folder, tmp_path, monkeypatch):
    from scratchlm.tokenizer import encode_file, read_token_file
    from scratchlm.tokenizer import tokenizer as tokenizer_module

    hf = tokenizers.Tokenizer.from_file(str(strip_folder / "tokenizer.json"))
    ours = Tokenizer.from_hf(strip_folder)
    assert (ours.lstrip_tokens, ours.rstrip_tokens) == (("<mask>",), ("[INST]",))
    for text in STRIP_TEXTS:
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False).ids, text
    # Streams cut nowhere inside the whitespace a token takes, whatever the window.
    whole = "".join(STRIP_TEXTS) * 3
    expected = hf.encode(whole, add_special_tokens=False).ids
    monkeypatch.setattr(tokenizer_module, "_STREAM_MIN_CHARS", 7)
    assert list(ours.encode_iterable(whole[i:i + 5] for i in range(0, len(whole), 5))) == expected
    (tmp_path / "in.txt").write_text(whole, encoding="utf-8")
    encode_file(ours, tmp_path / "in.txt", tmp_path / "out.npy")
    assert read_token_file(tmp_path / "out.npy").tolist() == expected
    # Saved and exported, the flags stay.
    assert Tokenizer.load(ours.save(tmp_path / "t.json")).encode(whole) == expected
    exported = tokenizers.Tokenizer.from_file(str(ours.save_hf(tmp_path / "tokenizer.json")))
    assert exported.encode(whole, add_special_tokens=False).ids == expected


def test_strip_token_lists_must_name_special_tokens():
    vocab = {i: bytes([i]) for i in range(256)}
    with pytest.raises(ValueError, match="lstrip_tokens holds '<x>', which is not one of special_tokens"):
        Tokenizer(vocab, [], ["<y>"], lstrip_tokens=["<x>"])
    with pytest.raises(ValueError, match="rstrip_tokens must be a list of special_tokens' texts, got '<y>'"):
        Tokenizer(vocab, [], ["<y>"], rstrip_tokens="<y>")


@pytest.mark.parametrize("form", ["llama2-legacy", "metaspace-first", "gemma"])
def test_strip_tokens_in_sentencepiece_files_give_hfs_ids(tmp_path, form):
    import sentencepiece_files

    hf = sentencepiece_files.build_hf(*sentencepiece_files.train_vocab(sentencepiece_files.SYNTHETIC), form)
    hf.add_special_tokens([
        tokenizers.AddedToken("<mask>", lstrip=True, normalized=False, special=True),
        tokenizers.AddedToken("[INST]", rstrip=True, normalized=False, special=True),
    ])
    ours = Tokenizer.from_hf(sentencepiece_files.write_folder(hf, tmp_path / form))
    for text in STRIP_TEXTS:
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False).ids, text
        ids = hf.encode(text, add_special_tokens=False).ids
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), text
