"""Qwen2-style tokenizers (NFC, Qwen2's regex, ChatML tokens): HF's ids from tokenizer.json, GGUF and our files."""

from __future__ import annotations

import json
import sys
import unicodedata
from pathlib import Path

import pytest
import regex
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scratchlm.tokenizer import Tokenizer, encode_file, read_token_file
from scratchlm.tokenizer import file_encoding
from scratchlm.tokenizer import tokenizer as tokenizer_module
from scratchlm.tokenizer.pretokenizers import QWEN2_PRETOKENIZE_PATTERN

from hf_trained_tokenizers import SYNTHETIC, write_gguf_tokenizer

tokenizers = pytest.importorskip("tokenizers")

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
# Decomposed and precomposed accents, Hangul as syllables and as jamo (which
# NFC composes), emoji, CJK: what NFC changes, next to what it keeps.
UNICODE_TEXT = (
    "Cafe\u0301 café, Cafe\u0301\u0301 naïve nai\u0308ve; 한국어 \u1112\u1161\u11ab\u1100\u116e\u11a8\n"
    "日本語の文章。中文 🙂👍🏽 Ångström A\u030angstro\u0308m\r\n\tIT'S 12345 don't\n\n"
) * 20
EDGE_TEXTS = [
    "", " ", "   ", "a  b   c ", " leading", "trailing ", "\n", "\n\n\n", "a\nb\n\n c", "\t\tx\t", "a\r\nb\r\n\r\n",
    "12345", "x1y22z333", "IT'S", "IT'S WE'LL i'd", "🙂👍🏽 emoji", "中文的字。日本語", "e\u0301", "é",
    "e\u0301\u0323 \u1e69", "\u1100\u1161\u11a8 \uac01", "\u1100\u1161", "\u0301 leading mark", "\n\u0301",
    "\u2000x\u2001y", f"a{IM_START}user\nhi{IM_END}\n", f"{ENDOFTEXT}{ENDOFTEXT}", f"e{IM_END}\u0301",
    "<|im_start", "Å Å Å",
]


def hf_qwen2_tokenizer(corpus: Path):
    """A byte-level BPE trained by HF with Qwen2's normalizer, pre-tokenizer, post-processor and decoder."""
    from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer, decoders, models, normalizers
    from tokenizers import pre_tokenizers, processors, trainers

    hf = HFTokenizer(models.BPE())
    hf.normalizer = normalizers.NFC()
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    hf.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    hf.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=1000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    hf.train([str(corpus)], trainer)
    hf.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in (ENDOFTEXT, IM_START, IM_END)])
    return hf


@pytest.fixture(scope="module")
def qwen2_folder(tmp_path_factory) -> Path:
    """tokenizer.json and tokenizer_config.json as Qwen2.5-Instruct ships them (no bos; eos <|im_end|>)."""
    folder = tmp_path_factory.mktemp("qwen2")
    corpus = folder / "corpus.txt"
    text = SYNTHETIC[:4000]
    if SHARED_DATA.is_dir():
        text = (SHARED_DATA / "python-docs.txt").read_bytes()[:6000].decode("utf-8", errors="ignore")
        text += (SHARED_DATA / "multilingual.txt").read_bytes()[:3000].decode("utf-8", errors="ignore")
    corpus.write_text(text + UNICODE_TEXT, encoding="utf-8")
    hf_qwen2_tokenizer(corpus).save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
        "chat_template": "{{ never run }}",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def hf(qwen2_folder):
    return tokenizers.Tokenizer.from_file(str(qwen2_folder / "tokenizer.json"))


@pytest.fixture(scope="module")
def ours(qwen2_folder) -> Tokenizer:
    return Tokenizer.from_hf(qwen2_folder)


def test_the_file_is_qwen2s_and_loads_with_its_settings(qwen2_folder, hf, ours):
    document = json.loads((qwen2_folder / "tokenizer.json").read_text(encoding="utf-8"))
    assert document["normalizer"] == {"type": "NFC"}
    assert [step["type"] for step in document["pre_tokenizer"]["pretokenizers"]] == ["Split", "ByteLevel"]
    assert all(not entry["normalized"] and entry["special"] for entry in document["added_tokens"])
    assert (ours.normalizer, ours.pretokenizer, ours.ignore_merges) == ("nfc", "qwen2", False)
    assert (ours.bos_id, ours.eos_id, ours.add_bos) == (None, hf.token_to_id(IM_END), False)
    assert ours.special_token_ids == {token: hf.token_to_id(token) for token in (ENDOFTEXT, IM_START, IM_END)}
    assert "normalizer='nfc'" in repr(ours)


@pytest.mark.parametrize("text", EDGE_TEXTS)
def test_edge_texts_give_hugging_faces_ids(hf, ours, text):
    ids = ours.encode(text)
    assert ids == hf.encode(text, add_special_tokens=False).ids
    assert hf.encode(text).ids == ids  # the ByteLevel post-processor adds nothing
    if hf.decode(ids, skip_special_tokens=False) == text:
        assert ours.decode(ids) == text


def test_nfc_joins_decomposed_accents_and_jamo(ours):
    assert ours.encode("e\u0301") == ours.encode("é")
    assert ours.encode("\u1112\u1161\u11ab") == ours.encode("한")
    assert ours.decode(ours.encode("e\u0301")) == "é"
    # Special tokens are not normalized, and no mark joins across one.
    assert ours.encode(f"e{IM_END}\u0301") == ours.encode("e") + [ours.eos_id] + ours.encode("\u0301")


@pytest.mark.parametrize("name", ["python-docs.txt", "multilingual.txt"])
def test_ids_equal_hugging_faces_on_the_corpora(shared_data, hf, ours, name):
    data = (shared_data / name).read_bytes()
    for start in (0, len(data) // 3, 2 * len(data) // 3):
        text = data[start : start + 60_000].decode("utf-8", errors="ignore")
        # Decomposed copies too, so NFC has work to do on every line.
        text = f"{IM_START}{text}{IM_END}\n" + unicodedata.normalize("NFD", text) + ENDOFTEXT
        ids = ours.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False).ids
        assert ours.decode(ids) == unicodedata.normalize("NFC", text)


# Characters NFC acts on, and every class the cut rules read.
ALPHABET = "ae\u0301\u0308\u0323\u030a AEIT'S1\u1100\u1112\u1161\u116e\u11a8\u11ab\uac01\n\r\t\u2000\u3000.中🙂"
TEXT = st.text(alphabet=ALPHABET, max_size=60)
STREAM_PIECES = [IM_END, " ", "  ", "\n", "\r\n", "e", "\u0301", "\u0323", "\u1100", "\u1161", "\u11a8", "가", "IT'S",
                 "1", "中", ".", "\u2000", "\t"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(TEXT, st.lists(st.sampled_from(STREAM_PIECES)).map("".join)))
def test_any_text_gives_hugging_faces_ids(hf, ours, text):
    assert ours.encode(text) == hf.encode(text, add_special_tokens=False).ids


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.lists(st.sampled_from(STREAM_PIECES)).map("".join), cuts=st.lists(st.integers(0, 200), max_size=12))
def test_encode_iterable_with_nfc_equals_encode_for_any_chunking(ours, monkeypatch, text, cuts):
    monkeypatch.setattr(tokenizer_module, "_STREAM_MIN_CHARS", 1)  # look for a cut after every chunk
    bounds = sorted({0, len(text), *(c for c in cuts if c < len(text))})
    chunks = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    assert list(ours.encode_iterable(chunks)) == ours.encode(text)


def test_encode_file_with_nfc_equals_encode_with_one_and_two_processes(tmp_path, ours, monkeypatch):
    text = (UNICODE_TEXT + IM_END + " \u0301x\n\u0301\u1161 \u11a8") * 3
    path = tmp_path / "text.txt"
    path.write_bytes(text.encode("utf-8"))
    monkeypatch.setattr(file_encoding, "_RANGE_BYTES", 97)  # many cuts
    expected = ours.encode(text)
    for processes in (1, 2):
        encode_file(ours, path, tmp_path / f"{processes}.npy", num_processes=processes)
        assert read_token_file(tmp_path / f"{processes}.npy").tolist() == expected, processes


def test_nfc_cannot_join_across_the_cut_rules_cuts():
    """The facts the NFC argument in Tokenizer.encode_iterable rests on, over all code points."""
    space = regex.compile(r"\s")  # the pre-tokenizers' whitespace; CR and LF are in it
    digit = regex.compile(r"\p{N}")
    for code in range(sys.maxunicode + 1):
        if 0xD800 <= code <= 0xDFFF:
            continue
        char = chr(code)
        normalized = unicodedata.normalize("NFC", char)
        if space.match(char):
            # A starter that stays one whitespace character.
            assert unicodedata.combining(char) == 0 and len(normalized) == 1 and space.match(normalized), hex(code)
        else:
            assert not space.search(normalized), hex(code)
        if not digit.match(char):
            assert not digit.match(normalized), hex(code)  # gpt2-digits' rule also reads "not a digit"
        decomposition = unicodedata.decomposition(char)
        if decomposition and not decomposition.startswith("<"):
            # No canonical composition takes whitespace as either part (Hangul's,
            # by rule, join jamo only).
            parts = [chr(int(part, 16)) for part in decomposition.split()]
            assert len(parts) == 1 or not any(space.match(part) for part in parts), hex(code)


def test_save_and_load_keep_the_normalizer(tmp_path, ours):
    ours.save(tmp_path / "tok.json")
    document = json.loads((tmp_path / "tok.json").read_text(encoding="utf-8"))
    assert document["version"] == 2 and document["normalizer"] == "nfc"
    loaded = Tokenizer.load(tmp_path / "tok.json")
    assert loaded.normalizer == "nfc" and loaded.encode("Cafe\u0301") == ours.encode("Café")
    plain = Tokenizer({i: bytes([i]) for i in range(256)}, [], pretokenizer="qwen2")
    assert "normalizer" not in plain.to_document()
    with pytest.raises(ValueError, match=r"normalizer must be one of \(None, 'nfc'\), got 'NFKC'"):
        Tokenizer({i: bytes([i]) for i in range(256)}, [], normalizer="NFKC")


def test_hf_export_gives_the_same_ids(tmp_path, ours):
    folder = ours.save_hf_folder(tmp_path / "exported")
    document = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    assert document["normalizer"] == {"type": "NFC"}
    exported = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    for text in [*EDGE_TEXTS, UNICODE_TEXT]:
        assert exported.encode(text, add_special_tokens=False).ids == ours.encode(text), text
    again = Tokenizer.from_hf(folder)
    assert (again.normalizer, again.pretokenizer, again.eos_id) == ("nfc", "qwen2", ours.eos_id)


def test_normalized_added_tokens_are_refused_with_nfc(tmp_path, qwen2_folder):
    document = json.loads((qwen2_folder / "tokenizer.json").read_text(encoding="utf-8"))
    document["added_tokens"][1]["normalized"] = True
    (tmp_path / "tokenizer.json").write_text(json.dumps(document), encoding="utf-8")
    with pytest.raises(ValueError, match=r"added_tokens\[1\]\.normalized is True; \('<\|im_start\|>'\) with a normalizer"):
        Tokenizer.from_hf(tmp_path / "tokenizer.json")


def test_nfc_in_a_one_step_sequence_loads(tmp_path, qwen2_folder, ours):
    document = json.loads((qwen2_folder / "tokenizer.json").read_text(encoding="utf-8"))
    document["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "NFC"}]}
    (tmp_path / "tokenizer.json").write_text(json.dumps(document), encoding="utf-8")
    assert Tokenizer.from_hf(tmp_path / "tokenizer.json").normalizer == "nfc"


# ------------------------------------------------------------------------ GGUF


@pytest.fixture(scope="module")
def qwen2_gguf(qwen2_folder, tmp_path_factory) -> Path:
    """The folder's tokenizer as llama.cpp's converter writes a Qwen2 model's (no bos, eos <|im_end|>)."""
    pytest.importorskip("gguf")
    path = tmp_path_factory.mktemp("gguf") / "qwen2.gguf"
    return write_gguf_tokenizer(qwen2_folder, path, "qwen2", arch="qwen2", add_bos_token=False)


def test_gguf_loads_as_qwen2_without_nfc(qwen2_gguf, hf, ours):
    # llama.cpp's qwen2 tokenizer applies no normalizer, and neither does
    # transformers' GGUF tokenizer: a GGUF loads without NFC, to match both.
    tokenizer = Tokenizer.from_gguf(qwen2_gguf)
    assert (tokenizer.pretokenizer, tokenizer.normalizer, tokenizer.add_bos) == ("qwen2", None, False)
    assert (tokenizer.bos_id, tokenizer.eos_id) == (None, ours.eos_id)
    text = unicodedata.normalize("NFC", UNICODE_TEXT)  # text NFC leaves alone: the same ids as tokenizer.json
    assert tokenizer.encode(text) == hf.encode(text, add_special_tokens=False).ids


def test_gguf_gives_transformers_gguf_ids(qwen2_gguf, ours):
    transformers = pytest.importorskip("transformers")
    loaded = transformers.AutoTokenizer.from_pretrained(str(qwen2_gguf.parent), gguf_file=qwen2_gguf.name)
    tokenizer = Tokenizer.from_gguf(qwen2_gguf)
    assert loaded.encode("e\u0301", add_special_tokens=False) != loaded.encode("é", add_special_tokens=False)
    for text in [*EDGE_TEXTS, UNICODE_TEXT]:
        assert tokenizer.encode(text) == loaded.encode(text, add_special_tokens=False), text
