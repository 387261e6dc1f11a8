"""SentencePiece GGUF vocabularies (tokenizer.ggml.model "llama"): llama.cpp's ids, and where transformers/HF differ.

The files are written with the ``gguf`` package as llama.cpp's converter
writes Llama 2 (and Mistral) and Gemma vocabularies; the reference is
:mod:`llama_cpp_spm`, a plain-Python reading of llama.cpp's tokenizer.
"""

from __future__ import annotations

import itertools
import random
import re
import sys
from pathlib import Path

import pytest

from scratchlm.tokenizer import Tokenizer
from scratchlm.tokenizer.apply_merges import merge_by_rank, merge_by_rank_heap
from scratchlm.tokenizer.gguf_spm import gguf_spm_arguments, spm_merges, spm_score_ranks

from hf_trained_tokenizers import write_gguf_metadata
from llama_cpp_spm import llama_cpp_tokenize, merge_like_llama_cpp, merge_naively
from sentencepiece_files import SYNTHETIC, train_vocab

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
UNK, BOS, EOS = "<unk>", "<s>", "</s>"
# Gemma-style extras: control tokens, and user-defined ones spelled as llama.cpp's
# converter writes Gemma's (runs of spaces as real spaces).
START, END = "<start_of_turn>", "<end_of_turn>"
GEMMA_EXTRAS = [(START, 3), (END, 3), ("  ", 4), ("   ", 4), ("\n\n", 4), ("<table>", 4), ("<unused0>", 5)]

EDGE_TEXTS = [
    "", " ", "  ", "   x", "x ", "x  ", " hello  world ", "\n", "\n\n\nx", "\t\tdef f():\n        return 1",
    "a\r\nb", "12345 67.89", "emoji 🦙🎉 and CJK 中文字 龍", "Größere Füße", "ẞ\u0301 combining",
    BOS, EOS, UNK, f"{BOS}hi{EOS}", f" {BOS} hi", f"x{BOS}{BOS} y", START, f"{START}user\nhi{END}", "<s", "s>",
    "  <table>  x", "<0x41>", "▁already▁metaspace", "a" * 40, " " * 37, "-" * 33, "=" * 20 + ">",
]


def _corpus() -> str:
    if SHARED_DATA.is_dir():
        docs = (SHARED_DATA / "python-docs.txt").read_bytes()[:150_000].decode("utf-8", errors="ignore")
        multilingual = (SHARED_DATA / "multilingual.txt").read_bytes()[:40_000].decode("utf-8", errors="ignore")
        return docs + multilingual
    return SYNTHETIC


def corpus_slices(count: int, size: int) -> list[str]:
    """``count`` slices of ``size`` characters from each shared corpus (text not trained on), or SYNTHETIC."""
    if not SHARED_DATA.is_dir():
        return [SYNTHETIC[:size]]
    slices = []
    for name in ("python-docs.txt", "multilingual.txt"):
        data = (SHARED_DATA / name).read_bytes()
        for index in range(count):
            start = len(data) * (index + 1) // (count + 1)
            slices.append(data[start : start + size].decode("utf-8", errors="ignore"))
    return slices


def spm_fields(style: str) -> dict:
    """GGUF tokenizer fields as llama.cpp's converter writes them for a Llama 2 or Gemma vocabulary.

    Types from SentencePiece (unknown, control, byte, normal), scores 0 for
    those and ``-index`` for the trained pieces (SentencePiece BPE scores by merge order).
    """
    vocab, _ = train_vocab(_corpus())
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    types = [2, 3, 3] + [6] * 256 + [1] * (len(tokens) - 259)
    scores = [0.0] * 259 + [-float(index) for index in range(len(tokens) - 259)]
    fields = {"model": "llama", "pre": "default", "bos_token_id": 1, "eos_token_id": 2, "unknown_token_id": 0}
    if style == "gemma":
        for token, kind in GEMMA_EXTRAS:  # a trained token keeps its id and score, takes the type
            if token in vocab:
                types[vocab[token]] = kind
            else:
                tokens.append(token)
                types.append(kind)
                scores.append(0.0)
        fields |= {"add_space_prefix": False, "add_bos_token": True, "add_eos_token": False, "padding_token_id": 0}
    fields |= {"tokens": tokens, "scores": scores, "token_type": types}
    return {"tokenizer.ggml." + name: value for name, value in fields.items()}


def write_gguf(fields: dict, path: Path, arch: str) -> Path:
    """A small .gguf holding ``fields`` (full keys) and one tensor, written with llama.cpp's gguf writer."""
    short = {key.removeprefix("tokenizer.ggml."): value for key, value in fields.items()}
    return write_gguf_metadata(short, path, arch)


STYLES = {"llama2": "llama", "gemma": "gemma2"}  # style -> general.architecture (transformers reads gemma2, not gemma)


@pytest.fixture(scope="module")
def fields() -> dict[str, dict]:
    pytest.importorskip("tokenizers")
    return {style: spm_fields(style) for style in STYLES}


@pytest.fixture(scope="module")
def gguf_paths(fields, tmp_path_factory) -> dict[str, Path]:
    pytest.importorskip("gguf")
    root = tmp_path_factory.mktemp("spm")
    paths = {}
    for style, arch in STYLES.items():
        folder = root / style
        folder.mkdir()
        paths[style] = write_gguf(fields[style], folder / f"{style}.gguf", arch)
    return paths


@pytest.fixture(scope="module")
def ours(gguf_paths) -> dict[str, Tokenizer]:
    return {style: Tokenizer.from_gguf(path) for style, path in gguf_paths.items()}


def reference(fields: dict, text: str, **options) -> list[int]:
    get = lambda name: fields["tokenizer.ggml." + name]  # noqa: E731
    add_space_prefix = fields.get("tokenizer.ggml.add_space_prefix", True)
    return llama_cpp_tokenize(text, get("tokens"), get("scores"), get("token_type"), add_space_prefix, **options)


# --------------------------------------------------------------- the settings


def test_settings_come_from_the_file(ours, fields):
    llama, gemma = ours["llama2"], ours["gemma"]
    assert (llama.metaspace, llama.metaspace_split, llama.byte_fallback, llama.decoder) == (
        "prepend", False, True, "sentencepiece-strip")
    assert (gemma.metaspace, gemma.decoder) == ("never", "sentencepiece")
    for tokenizer in (llama, gemma):
        assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id, tokenizer.add_bos) == (1, 2, 0, True)
    assert llama.special_token_ids == {UNK: 0, BOS: 1, EOS: 2}
    assert set(gemma.special_token_ids) == {UNK, BOS, EOS, START, END, "  ", "   ", "\n\n", "<table>"}
    tokens = fields["llama2"]["tokenizer.ggml.tokens"]
    assert llama.vocab == {token_id: token.encode() for token_id, token in enumerate(tokens)}


def test_merges_are_transformers_generate_merges(fields):
    """The same list, in the same order, as transformers derives for a GGUF (and a Llama 2 tokenizer.json)."""
    generate_merges = pytest.importorskip("transformers.tokenization_utils_base").generate_merges
    for style in STYLES:
        tokens = fields[style]["tokenizer.ggml.tokens"]
        scores = fields[style]["tokenizer.ggml.scores"]
        theirs = generate_merges({token: i for i, token in enumerate(tokens)}, dict(zip(tokens, scores)))
        assert spm_merges(tokens, scores) == [tuple(pair) for pair in theirs]


# ------------------------------------------------------- llama.cpp's merge rule


def _random_vocabulary(rng: random.Random, alphabet: str, size: int, tied: bool) -> tuple[list[str], list[float]]:
    tokens = list(alphabet)
    while len(tokens) < size:
        token = "".join(rng.choice(alphabet) for _ in range(rng.randint(2, 5)))
        if token not in tokens:
            tokens.append(token)
    order = list(range(size - len(alphabet)))
    rng.shuffle(order)
    scores = [0.0] * len(alphabet) + [-float(rng.randint(0, 3) if tied else index) for index in order]
    return tokens, scores


def _rank_engine(tokens, scores, text, exact_ties: bool) -> list[str]:
    """Merge ``text`` with the merge list, ranked by list position or by score rank (ties shared)."""
    ids = {token: token_id for token_id, token in enumerate(tokens)}
    merges = spm_merges(tokens, scores)
    score_ranks = spm_score_ranks(tokens, scores, merges)
    ranks = {}
    for position, (left, right) in enumerate(merges):
        rank = score_ranks[position] if exact_ties else position
        ranks.setdefault((ids[left], ids[right]), (rank, ids[left + right]))
    merge = merge_by_rank_heap if len(text) > 8 else merge_by_rank
    return [tokens[token_id] for token_id in merge([ids[char] for char in text], ranks)]


def test_llama_cpps_queue_is_its_rule():
    """The reference's priority queue (as llama.cpp codes it) equals the rule stated plainly."""
    rng = random.Random(0)
    for _ in range(300):
        tokens, scores = _random_vocabulary(rng, "ab▁", 12, tied=rng.random() < 0.5)
        ids = {token: token_id for token_id, token in enumerate(tokens)}
        for _ in range(20):
            text = "".join(rng.choice("ab▁") for _ in range(rng.randint(0, 16)))
            assert merge_like_llama_cpp(text, ids, scores) == merge_naively(text, ids, scores)


def test_score_ranks_reproduce_llama_cpp_exactly_and_list_ranks_without_ties():
    """Ranks = score ranks (ties shared) give llama.cpp's merges on every text; list ranks do when scores differ.

    The first is proven in gguf_spm's docstring; the second is what this search finds.
    """
    rng = random.Random(1)
    for trial in range(400):
        tied = trial % 2 == 1
        tokens, scores = _random_vocabulary(rng, "ab" if trial % 4 < 2 else "abc", rng.randint(4, 14), tied)
        ids = {token: token_id for token_id, token in enumerate(tokens)}
        for _ in range(25):
            text = "".join(rng.choice(tokens[:3] if len(tokens) > 3 else "ab") for _ in range(rng.randint(1, 14)))
            text = "".join(char for char in text if char in ids)
            expected = merge_naively(text, ids, scores)
            assert _rank_engine(tokens, scores, text, exact_ties=True) == expected
            if not tied:
                assert _rank_engine(tokens, scores, text, exact_ties=False) == expected


def test_list_ranks_differ_from_llama_cpp_when_different_tokens_tie():
    """Equal scores for different tokens: llama.cpp takes the leftmost pair, a list the one it puts first."""
    tokens, scores = ["a", "b", "c", "bc", "ab"], [0.0, 0.0, 0.0, -1.0, -1.0]
    ids = {token: token_id for token_id, token in enumerate(tokens)}
    assert spm_merges(tokens, scores) == [("b", "c"), ("a", "b")]  # equal scores and lengths: id order
    assert merge_naively("abc", ids, scores) == ["ab", "c"]  # "ab" is leftmost
    assert _rank_engine(tokens, scores, "abc", exact_ties=True) == ["ab", "c"]
    assert _rank_engine(tokens, scores, "abc", exact_ties=False) == ["a", "bc"]


# ---------------------------------------------------- ids against llama.cpp's


@pytest.mark.parametrize("style", list(STYLES))
def test_ids_equal_llama_cpps_on_the_corpora(fields, ours, style):
    for text in corpus_slices(count=2, size=40_000):
        assert ours[style].encode(text) == reference(fields[style], text)


@pytest.mark.parametrize("style", list(STYLES))
def test_ids_equal_llama_cpps_on_edge_texts(fields, ours, style):
    for text in EDGE_TEXTS + [a + b for a, b in itertools.product(EDGE_TEXTS[:12], EDGE_TEXTS[10:24])]:
        expected = reference(fields[style], text)
        assert ours[style].encode(text) == expected, text
        assert reference(fields[style], text, naive=True) == expected


def test_byte_fallback_fires_for_characters_outside_the_vocabulary(ours, fields):
    tokenizer = ours["llama2"]
    assert "🦙".encode() not in tokenizer._token_ids
    ids = tokenizer.encode("🦙")
    assert [tokenizer.vocab[i] for i in ids][-4:] == [b"<0xF0>", b"<0x9F>", b"<0xA6>", b"<0x99>"]
    assert tokenizer.decode(ids) == "🦙"


@pytest.mark.parametrize("style", list(STYLES))
def test_decode_gives_the_text_back(ours, style):
    tokenizer = ours[style]
    for text in corpus_slices(count=1, size=5_000) + ["x  y", "中文 🦙", "a\n\tb"]:
        assert tokenizer.decode(tokenizer.encode(text)) == text


# ------------------------------------------------ transformers and HF tokenizers


def _transformers_tokenizer(path: Path):
    transformers = pytest.importorskip("transformers")
    _import_hub_kernels()
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _import_hub_kernels() -> None:
    """Import transformers' hub_kernels with the venv's HF ``kernels`` package, not this repository's ``kernels/``.

    Both are named ``kernels``; with the repository on sys.path (``python -m
    pytest``) transformers' model configs fail to import. Once imported, the
    names it took stay bound, and ``kernels`` is put back as it was.
    """
    if "transformers.integrations.hub_kernels" in sys.modules:
        return
    repository = Path(__file__).resolve().parents[2]
    saved_path, saved_module = list(sys.path), sys.modules.pop("kernels", None)
    sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != repository]
    try:
        import transformers.integrations.hub_kernels  # noqa: F401
    finally:
        sys.path[:] = saved_path
        sys.modules.pop("kernels", None)
        if saved_module is not None:
            sys.modules["kernels"] = saved_module


def test_transformers_gguf_tokenizer_agrees_where_its_space_prefix_does(gguf_paths, ours, fields):
    """transformers prepends ▁ only at the start and only to text not starting with a space ("first")."""
    theirs = _transformers_tokenizer(gguf_paths["llama2"])
    tokenizer = ours["llama2"]
    for text in corpus_slices(count=1, size=20_000) + ["hello  world", "a\n\tb 12", "中文 🦙 x", f"x{EOS}"]:
        text = text.lstrip(" ")
        assert theirs(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(text)
    assert theirs("hi")["input_ids"][0] == tokenizer.bos_id
    # Where they differ: a leading space, and text after a special token.
    assert tokenizer.encode(" hi") == reference(fields["llama2"], " hi")  # ▁▁hi, as llama.cpp
    assert theirs(" hi", add_special_tokens=False)["input_ids"] == tokenizer.encode("hi")  # ▁hi
    after = f"{BOS}hi"
    assert tokenizer.encode(after) == reference(fields["llama2"], after) == [1, *tokenizer.encode("hi")]
    assert theirs(after, add_special_tokens=False)["input_ids"] != tokenizer.encode(after)


def test_transformers_gguf_tokenizer_ignores_add_space_prefix_false_for_llama_files(tmp_path, fields, ours):
    no_prefix = dict(fields["llama2"]) | {"tokenizer.ggml.add_space_prefix": False}
    path = write_gguf(no_prefix, tmp_path / "noprefix.gguf", "llama")
    tokenizer = Tokenizer.from_gguf(path)
    assert tokenizer.metaspace == "never"
    assert tokenizer.encode("hi there") == reference(no_prefix, "hi there") == ours["gemma"].encode("hi there")
    theirs = _transformers_tokenizer(path)
    assert theirs("hi there", add_special_tokens=False)["input_ids"] == ours["llama2"].encode("hi there")


def test_transformers_gemma_tokenizer_agrees_but_on_runs_of_spaces(gguf_paths, ours, fields):
    """GemmaTokenizer (positions as scores, no prefix): the same ids, special tokens included, except spaces.

    It renames the user-defined tokens of spaces ("  " -> "▁▁") and builds them
    by merges; llama.cpp matches them in the text, longest first, as SentencePiece does.
    """
    theirs = _transformers_tokenizer(gguf_paths["gemma"])
    tokenizer = ours["gemma"]
    for text in corpus_slices(count=1, size=20_000) + EDGE_TEXTS:
        text = re.sub("  +", " ", text)
        assert theirs(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(text), text
    spaces = " " * 7 + "x"
    assert tokenizer.encode(spaces) == reference(fields["gemma"], spaces)
    assert [tokenizer.vocab[i] for i in tokenizer.encode(spaces)][:3] == [b"   ", b"   ", "▁".encode()]
    assert theirs(spaces, add_special_tokens=False)["input_ids"] != tokenizer.encode(spaces)


def _llama2_tokenizer_json(fields: dict):
    """The Llama 2 (legacy) tokenizer.json of the vocabulary, merges by transformers' generate_merges."""
    tokenizers = pytest.importorskip("tokenizers")
    generate_merges = pytest.importorskip("transformers.tokenization_utils_base").generate_merges
    from tokenizers import AddedToken, decoders, models, normalizers

    tokens, scores = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.scores"]
    vocab = {token: token_id for token_id, token in enumerate(tokens)}
    merges = generate_merges(vocab, dict(zip(tokens, scores)))
    hf = tokenizers.Tokenizer(models.BPE(vocab, merges, unk_token=UNK, fuse_unk=True, byte_fallback=True))
    hf.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    hf.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    hf.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in (UNK, BOS, EOS)])
    return hf


def test_hf_tokenizers_llama2_legacy_file_agrees(fields, ours):
    hf = _llama2_tokenizer_json(fields["llama2"])
    tokenizer = ours["llama2"]
    for text in corpus_slices(count=2, size=40_000) + EDGE_TEXTS:
        ids = tokenizer.encode(text)
        assert hf.encode(text, add_special_tokens=False).ids == ids, text
        assert hf.decode(ids, skip_special_tokens=False) == tokenizer.decode(ids)


# ------------------------------------------------------------------ refusals


def _set(fields: dict, name: str, value) -> dict:
    changed = dict(fields)
    key = "tokenizer.ggml." + name
    if value is None:
        changed.pop(key)
    else:
        changed[key] = value(changed[key]) if callable(value) else value
    return changed


def _at(index: int, value):
    return lambda values: [*values[:index], value, *values[index + 1 :]]


REFUSED = [
    ("tokens", None, r"tokenizer\.ggml\.tokens is missing; tokenizer\.ggml\.model 'llama'"),
    ("scores", None, r"tokenizer\.ggml\.scores is missing; .*ordered by score"),
    ("scores", lambda values: values[:-1], r"tokenizer\.ggml\.scores is '\d+ values'; expected \d+, one per token"),
    ("token_type", lambda values: values[:-2], r"tokenizer\.ggml\.token_type is '\d+ values'; expected \d+"),
    ("scores", _at(300, float("nan")), r"tokenizer\.ggml\.scores\[300\] is nan; expected a number \(not NaN\)"),
    ("scores", _at(300, "high"), r"tokenizer\.ggml\.scores\[300\] is 'high'; expected a number"),
    ("token_type", _at(300, 7), r"tokenizer\.ggml\.token_type\[300\] is 7; expected 1 to 6"),
    ("token_type", _at(300, 0), r"tokenizer\.ggml\.token_type\[300\] is 0; expected 1 to 6"),
    ("token_type", _at(300, 6), r"tokenizer\.ggml\.tokens\[300\] is '.*'; a byte token \(type 6\) must be '<0xNN>'"),
    ("tokens", _at(301, "<s>"), r"tokenizer\.ggml\.tokens\[301\] is '<s>'; the same token is id 1"),
    ("tokens", _at(301, 5), r"tokenizer\.ggml\.tokens\[301\] is 5; expected a string"),
    ("tokens", [], r"tokenizer\.ggml\.tokens is \[\]; expected a non-empty list"),
    ("bos_token_id", 10**6, r"tokenizer\.ggml\.bos_token_id is 1000000; ids are 0\.\."),
    ("unknown_token_id", -1, r"tokenizer\.ggml\.unknown_token_id is -1; ids are 0\.\."),
    ("eos_token_id", "2", r"tokenizer\.ggml\.eos_token_id is '2'; expected an integer"),
    ("add_space_prefix", 1, r"tokenizer\.ggml\.add_space_prefix is 1; expected a bool"),
    ("padding_token_id", 10**6, r"tokenizer\.ggml\.padding_token_id is 1000000; ids are 0\.\."),
]


@pytest.mark.parametrize("name, value, message", REFUSED)
def test_bad_fields_are_named_with_their_values(fields, name, value, message):
    with pytest.raises(ValueError, match=message) as error:
        Tokenizer.from_gguf_fields(_set(fields["llama2"], name, value), source="spm.gguf")
    assert str(error.value).startswith("spm.gguf: ")


def test_llama_cpps_defaults_for_missing_keys(fields):
    bare = {key: value for key, value in fields["llama2"].items()
            if key.rsplit(".", 1)[1] in ("model", "tokens", "scores")}
    tokenizer = Tokenizer.from_gguf_fields(bare)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.add_bos, tokenizer.unk_id) == (1, 2, True, None)
    # Without token types every token is normal: "<s>" is then text, merged from characters.
    assert tokenizer.special_tokens == []
    text = "say <s> twice"
    types = [1] * len(bare["tokenizer.ggml.tokens"])
    expected = llama_cpp_tokenize(text, bare["tokenizer.ggml.tokens"], bare["tokenizer.ggml.scores"], types)
    assert tokenizer.encode(text) == expected


def test_an_empty_token_is_renamed_as_llama_cpp_renames_it(fields):
    vocab, _, _, _ = gguf_spm_arguments(_set(fields["llama2"], "tokens", _at(400, "")))
    assert vocab[400] == b"[EMPTY_400]"


def test_a_character_only_inside_tokens_is_where_llama_cpp_merges_more(fields):
    """"▁x" without "x": llama.cpp merges ▁ and x into "▁x"; the rank engine (and HF) take x's byte token."""
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), "▁", "▁x"]
    scores = [0.0] * 259 + [-1.0, -2.0]
    types = [2, 3, 3] + [6] * 256 + [1, 1]
    fields = {"tokenizer.ggml." + name: value for name, value in
              {"model": "llama", "tokens": tokens, "scores": scores, "token_type": types}.items()}
    tokenizer = Tokenizer.from_gguf_fields(fields)
    assert llama_cpp_tokenize("x", tokens, scores, types) == [260]
    assert tokenizer.encode("x") == [259, 3 + ord("x")]


def test_save_load_and_streams_keep_the_ids(tmp_path, ours):
    text = "".join(corpus_slices(count=1, size=30_000))
    for style, tokenizer in ours.items():
        loaded = Tokenizer.load(tokenizer.save(tmp_path / f"{style}.json"))
        assert loaded.encode(text) == tokenizer.encode(text)
        assert list(tokenizer.encode_iterable(text.splitlines(keepends=True))) == tokenizer.encode(text)


def test_overlapping_special_tokens_match_leftmost_here_and_longest_first_in_llama_cpp(fields):
    changed = dict(fields["llama2"])
    changed["tokenizer.ggml.tokens"] = [*changed["tokenizer.ggml.tokens"], "<a>", "a><b>"]
    changed["tokenizer.ggml.scores"] = [*changed["tokenizer.ggml.scores"], 0.0, 0.0]
    changed["tokenizer.ggml.token_type"] = [*changed["tokenizer.ggml.token_type"], 3, 3]
    first, second = len(changed["tokenizer.ggml.tokens"]) - 2, len(changed["tokenizer.ggml.tokens"]) - 1
    tokenizer = Tokenizer.from_gguf_fields(changed)
    assert tokenizer.encode("<a><b>")[0] == first
    assert second in reference(changed, "<a><b>")
    assert tokenizer.encode("x <a> y") == reference(changed, "x <a> y")


PIECES = [" ", "  ", "\n", "\t", "▁", "the", " the", "def", "(", "):", "0", "42", "é", "ß", "中文", "🦙", "\u200d",
          BOS, EOS, UNK, START, END, "<table>", "<", "s>", "x", "ab", "'s", "\r\n", "\x00", "\U0010fffd"]


@pytest.mark.parametrize("style", list(STYLES))
def test_ids_equal_llama_cpps_on_random_texts(fields, ours, style):
    rng = random.Random(7)
    for _ in range(400):
        text = "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 25)))
        assert ours[style].encode(text) == reference(fields[style], text), text
