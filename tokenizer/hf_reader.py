"""Reading a Hugging Face ``tokenizer.json`` (and the ``tokenizer_config.json`` beside it).

Only what this package reproduces exactly loads; anything else is refused
before any work with a ValueError naming the file, the field and its value.
The files are only parsed as JSON: nothing in them is ever executed (a
config's ``auto_map`` of custom code is ignored, and so is ``chat_template``).

What loads: byte-level BPE, described below, and SentencePiece-style BPE
(Llama 2, TinyLlama, Mistral, Gemma), a file whose decoder and
pre-tokenizer have no ByteLevel step. For the latter the vocabulary and
merges are plain text, ``byte_fallback`` is kept, the normalizer,
pre-tokenizer and decoder must be one of the forms of
:mod:`scratchlm.tokenizer.hf_sentencepiece`, an ``unk_token`` missing from
``model.vocab`` is refused unless all 256 ``<0xNN>`` tokens are there (HF
fails on any character it would need it for), an added token with
``normalized`` true is refused with the Prepend normalizer and, with Gemma's
Replace, when it holds a space or ``▁`` (HF matches those in the normalized
text), and ``add_prefix_space`` in tokenizer_config.json is ignored (the
tokenizer.json already says it). The rest is as for byte-level BPE:

* ``model``: byte-level BPE (``"type": "BPE"``, or no type with vocab and
  merges, which HF also reads as BPE). Unigram, WordPiece and WordLevel are
  refused, and so are the BPE options that make it something else:
  ``byte_fallback`` (with a ByteLevel decoder),
  ``continuing_subword_prefix`` and ``end_of_word_suffix`` (word-piece-style
  markers) and a non-zero ``dropout`` (random merges). ``ignore_merges``,
  ``unk_token`` and ``fuse_unk`` are kept. The vocabulary must be spelled
  with GPT-2's byte -> character table; ids may have gaps, and single bytes
  may be missing, as in real files (SmolLM2 lacks ten): such a byte in the
  text becomes the unk token, or is dropped without one, as in HF. An
  ``unk_token`` that is not in ``model.vocab`` is refused when some byte is
  missing (HF fails on any text holding one) and ignored otherwise (HF never
  looks it up). Merges may be ``"a b"`` strings or ``["a", "b"]`` pairs; a
  pair listed twice takes its last rank, as in HF; a merge whose parts or
  result are not in the vocabulary is refused (HF refuses the file too).
* ``normalizer``: none (null, or an empty Sequence), or ``NFC`` (alone or as
  the one step of a Sequence; Qwen2), which loads as ``normalizer="nfc"``.
* ``pre_tokenizer``: a ``ByteLevel`` step last (``add_prefix_space`` false),
  after ``Split`` (regex, ``"Isolated"``, not inverted) and ``Digits``
  (``individual_digits``) steps, together exactly one of the presets of
  :mod:`scratchlm.tokenizer.pretokenizers`. A regex is matched by its text.
* ``decoder``: ``ByteLevel``.
* ``added_tokens``: kept whole like special tokens, at their ids, special or
  not; an id must be the one HF itself gives the token when it loads the
  file. ``lstrip``/``rstrip`` load as ``lstrip_tokens``/``rstrip_tokens``;
  ``single_word`` must be false. HF splits
  off the tokens with ``normalized`` false before those with it true; with no
  normalizer that differs from splitting all at once only where a token of
  one kind can overlap one of the other, which is refused. With NFC, every
  added token must have ``normalized`` false: HF would look for the others
  in the normalized text.
* ``post_processor``: none, ``ByteLevel`` (it only trims offsets), a
  ``TemplateProcessing`` whose single-text template is ``$A`` with at most
  one special token before it (bos: ``add_bos`` true) and one after it (eos:
  ``add_eos`` true), or a ``Sequence`` of these. A template adding anything
  else is refused: encode could not reproduce it.
* ``tokenizer_config.json``: ``bos_token``, ``eos_token`` and ``pad_token`` (a
  string or ``{"content": ...}``) and ``add_bos_token``/``add_eos_token``,
  which override the template's (as transformers' Llama tokenizers rebuild
  the template from them); a bos/eos token different from the template's is
  refused, and so is ``add_prefix_space`` true for byte-level BPE.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from scratchlm.tokenizer.gpt2_files import decode_gpt2_token
from scratchlm.tokenizer.hf_sentencepiece import is_sentencepiece_file, read_word_boundaries
from scratchlm.tokenizer.json_input import read_json
from scratchlm.tokenizer.pretokenizers import (
    DIGITS_PATTERN,
    GPT2_PRETOKENIZE_PATTERN,
    PRETOKENIZERS,
    find_pretokenizer,
)

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# Values quoted in error messages are cut to this many characters.
_MAX_QUOTED = 200


class _Source:
    """Names a file in error messages: ``refuse`` builds the ValueError for one field."""

    def __init__(self, path: Path):
        self.path = path

    def refuse(self, field: str, value: Any, expected: str) -> ValueError:
        quoted = repr(value)
        if len(quoted) > _MAX_QUOTED:
            quoted = quoted[:_MAX_QUOTED] + "..."
        return ValueError(f"{str(self.path)!r}: {field} is {quoted}; {expected}")


def read_hf_tokenizer(path: str | os.PathLike) -> tuple[dict[int, bytes], list, dict[str, int], dict[str, Any]]:
    """``(vocab, merges, special_tokens, settings)`` for ``Tokenizer`` from a tokenizer.json or its folder.

    ``special_tokens`` maps each added token to its id; ``settings`` holds the
    keyword arguments (pre-tokenizer, ignore_merges, bos/eos, add_bos).
    ``tokenizer_config.json`` is read from the folder, or from beside a file
    named ``tokenizer.json``.
    """
    tokenizer_path, config_path = _locate(Path(path))
    source = _Source(tokenizer_path)
    document = _read_json_object(tokenizer_path)
    config = _read_json_object(config_path) if config_path is not None else {}

    model = document.get("model")
    if not isinstance(model, dict):
        raise source.refuse("model", model, "expected an object")
    sentencepiece = is_sentencepiece_file(document)
    ignore_merges = _check_model(model, source, sentencepiece)
    if sentencepiece:
        # Tokens are plain text; spaces become ▁ (see hf_sentencepiece).
        settings = read_word_boundaries(document, source.refuse)
        normalizer = settings.pop("normalizer")
        settings["byte_fallback"] = model.get("byte_fallback", False)
        spelling = _plain_text
    else:
        normalizer = _normalizer_name(document.get("normalizer"), source)
        settings = {"pretokenizer": _pretokenizer_name(document.get("pre_tokenizer"), source), "normalizer": normalizer}
        decoder = document.get("decoder")
        if not isinstance(decoder, dict) or decoder.get("type") != "ByteLevel":
            raise source.refuse("decoder", decoder, "expected a ByteLevel decoder (a byte-level BPE tokenizer)")
        spelling = decode_gpt2_token

    if not isinstance(model.get("vocab"), dict):
        raise source.refuse("model.vocab", model.get("vocab"), "expected an object token -> id")
    added = _added_tokens(document.get("added_tokens", []), model["vocab"], normalizer, source)
    # Checked by _added_tokens: a list of objects. HF's decode skips only the special ones.
    entries = document.get("added_tokens", [])
    settings["nonspecial_tokens"] = tuple(entry["content"] for entry in entries if not entry.get("special", False))
    settings["lstrip_tokens"] = tuple(entry["content"] for entry in entries if entry.get("lstrip"))
    settings["rstrip_tokens"] = tuple(entry["content"] for entry in entries if entry.get("rstrip"))
    vocab = _vocab(model["vocab"], added, source, spelling)
    merges = _merges(model.get("merges"), source, spelling)
    template_bos, template_eos = _post_processor_bos(document.get("post_processor"), "post_processor", source)
    settings |= _bos_eos(config, config_path, template_bos, template_eos, added, vocab, sentencepiece)
    settings["ignore_merges"] = ignore_merges
    settings |= _unknown_token(model, vocab, source, sentencepiece)
    return vocab, merges, added, settings


def _plain_text(token: str) -> bytes:
    """A SentencePiece-style token's bytes: its text in UTF-8, as spelled."""
    return token.encode("utf-8")


def _locate(path: Path) -> tuple[Path, Path | None]:
    """The tokenizer.json to read and the tokenizer_config.json beside it, if any."""
    if path.is_dir():
        tokenizer_path = path / TOKENIZER_FILE
        if not tokenizer_path.is_file():
            raise FileNotFoundError(f"folder {str(path)!r} holds no {TOKENIZER_FILE}")
    elif path.is_file():
        tokenizer_path = path
    else:
        raise FileNotFoundError(f"path {str(path)!r} is neither a {TOKENIZER_FILE} file nor a folder holding one")
    config_path = tokenizer_path.parent / TOKENIZER_CONFIG_FILE
    if tokenizer_path.name != TOKENIZER_FILE or not config_path.is_file():
        config_path = None
    return tokenizer_path, config_path


def _read_json_object(path: Path) -> dict:
    document = read_json(path, repr(str(path)))
    if not isinstance(document, dict):
        raise ValueError(f"{str(path)!r} holds JSON {type(document).__name__}, not an object")
    return document


# ------------------------------------------------------------------- model


def _check_model(model: dict, source: _Source, sentencepiece: bool) -> bool:
    """Refuse anything but plain byte-level BPE (or SentencePiece-style BPE); return ``ignore_merges``."""
    model_type = model.get("type", "BPE" if "merges" in model and "vocab" in model else None)
    if model_type != "BPE":
        raise source.refuse(
            "model.type", model_type,
            "only byte-level BPE (\"BPE\") loads; Unigram (SentencePiece), WordPiece and WordLevel do not",
        )
    if not isinstance(model.get("byte_fallback", False), bool):
        raise source.refuse("model.byte_fallback", model["byte_fallback"], "expected true or false")
    if model.get("byte_fallback") and not sentencepiece:
        raise source.refuse(
            "model.byte_fallback", model["byte_fallback"],
            "byte fallback (<0x..> tokens) is SentencePiece-style BPE, not byte-level",
        )
    for field in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(field) not in (None, ""):
            raise source.refuse(f"model.{field}", model[field], "word-piece markers are not byte-level BPE")
    if model.get("dropout") not in (None, 0, 0.0):
        raise source.refuse("model.dropout", model["dropout"], "BPE dropout merges at random; expected null")
    ignore_merges = model.get("ignore_merges", False)
    if not isinstance(ignore_merges, bool):
        raise source.refuse("model.ignore_merges", ignore_merges, "expected true or false")
    return ignore_merges


def _unknown_token(model: dict, vocab: dict[int, bytes], source: _Source, sentencepiece: bool) -> dict[str, Any]:
    """``unk_token`` (an id) and ``fuse_unk``: what HF's BPE makes of a byte (or character) the vocabulary lacks."""
    text, fuse_unk = model.get("unk_token"), model.get("fuse_unk", False)
    if not isinstance(fuse_unk, bool):
        raise source.refuse("model.fuse_unk", fuse_unk, "expected true or false")
    if text is None:
        return {"unk_token": None, "fuse_unk": fuse_unk}
    if not isinstance(text, str) or not text:
        raise source.refuse("model.unk_token", text, "expected a token of model.vocab, or null")
    unk_id = model["vocab"].get(text)
    if unk_id is None and sentencepiece:
        present = set(model["vocab"])
        if not (model.get("byte_fallback") and all(f"<0x{byte:02X}>" in present for byte in range(256))):
            raise source.refuse(
                "model.unk_token", text,
                "it is not in model.vocab, and without all 256 <0xNN> byte tokens HF fails on a character "
                "missing from the vocabulary",
            )
    elif unk_id is None:
        present = set(vocab.values())
        missing = [byte for byte in range(256) if bytes([byte]) not in present]
        if missing:
            raise source.refuse(
                "model.unk_token", text,
                f"it is not in model.vocab, and the vocabulary lacks bytes {missing[:10]}: HF fails on any text "
                "holding one of them",
            )
    return {"unk_token": unk_id, "fuse_unk": fuse_unk}


def _normalizer_name(normalizer: Any, source: _Source) -> str | None:
    """None for no normalizer, "nfc" for HF's NFC (alone or the one step of a Sequence)."""
    steps = [normalizer]
    if isinstance(normalizer, dict) and normalizer.get("type") == "Sequence":
        steps = normalizer.get("normalizers") or []
    if normalizer is None or not steps:
        return None
    if len(steps) == 1 and isinstance(steps[0], dict) and steps[0].get("type") == "NFC":
        return "nfc"
    raise source.refuse(
        "normalizer", normalizer, "only tokenizers without a normalizer (null) or with NFC ({\"type\": \"NFC\"}) load"
    )


def _pretokenizer_steps(node: Any, field: str, source: _Source) -> list[tuple[str, Any]]:
    """The pipeline as ``("split", pattern)`` and ``("byte_level", use_regex)`` steps, Sequences flattened."""
    kind = node.get("type") if isinstance(node, dict) else None
    if kind == "Sequence":
        steps = []
        for index, step in enumerate(node.get("pretokenizers") or []):
            steps += _pretokenizer_steps(step, f"{field}.pretokenizers[{index}]", source)
        return steps
    if kind == "ByteLevel":
        if node.get("add_prefix_space") is not False:
            raise source.refuse(f"{field}.add_prefix_space", node.get("add_prefix_space"), "expected false")
        return [("byte_level", node.get("use_regex", True))]
    if kind == "Split":
        pattern = node.get("pattern")
        if not (isinstance(pattern, dict) and isinstance(pattern.get("Regex"), str)):
            raise source.refuse(f"{field}.pattern", pattern, "expected {\"Regex\": ...}")
        if node.get("behavior") != "Isolated":
            raise source.refuse(f"{field}.behavior", node.get("behavior"), "only \"Isolated\" splits load")
        if node.get("invert"):
            raise source.refuse(f"{field}.invert", node.get("invert"), "expected false")
        return [("split", pattern["Regex"])]
    if kind == "Digits":
        if node.get("individual_digits") is not True:
            raise source.refuse(f"{field}.individual_digits", node.get("individual_digits"), "expected true")
        return [("split", DIGITS_PATTERN)]
    if node is None:
        raise source.refuse(field, None, "a byte-level tokenizer needs a ByteLevel pre-tokenizer")
    raise source.refuse(f"{field}.type", kind, "supported steps are ByteLevel, Split, Digits and Sequence")


def _pretokenizer_name(node: Any, source: _Source) -> str:
    """The preset whose pipeline the file's pre_tokenizer is."""
    steps = _pretokenizer_steps(node, "pre_tokenizer", source)
    if not steps or steps[-1][0] != "byte_level" or any(kind == "byte_level" for kind, _ in steps[:-1]):
        raise source.refuse("pre_tokenizer", node, "expected exactly one ByteLevel step, the last")
    splits = [pattern for kind, pattern in steps[:-1]]
    if steps[-1][1]:
        splits.append(GPT2_PRETOKENIZE_PATTERN)
    preset = find_pretokenizer(splits)
    if preset is None:
        known = "; ".join(f"{name}: {list(preset.splits)}" for name, preset in PRETOKENIZERS.items())
        raise source.refuse(
            "pre_tokenizer", splits, f"the regex splits must be those of a preset ({known}); no other is known exact"
        )
    return preset.name


# ------------------------------------------------------ tokens and merges


def _added_tokens(entries: Any, model_vocab: dict, normalizer: str | None, source: _Source) -> dict[str, int]:
    """Added tokens, content -> id, checked; see the module docstring for the rules.

    HF does not take an added token's id from the file: it adds the tokens
    in order, each taking the id of the same text in the model's vocabulary,
    or else the next id after the vocabulary and the tokens added so far
    (and only warns when the file said otherwise). A file whose ids disagree
    with that is refused, since it would mean different ids here and in HF.
    """
    if not isinstance(entries, list):
        raise source.refuse("added_tokens", entries, "expected a list")
    model_size = len(model_vocab)
    added: dict[str, int] = {}
    by_normalized: dict[bool, list[str]] = {False: [], True: []}
    for index, entry in enumerate(entries):
        field = f"added_tokens[{index}]"
        if not isinstance(entry, dict):
            raise source.refuse(field, entry, "expected an object")
        content, token_id = entry.get("content"), entry.get("id")
        if not isinstance(content, str) or not content:
            raise source.refuse(f"{field}.content", content, "expected a non-empty string")
        if not isinstance(token_id, int) or isinstance(token_id, bool) or token_id < 0:
            raise source.refuse(f"{field}.id", token_id, "expected a non-negative integer")
        if entry.get("single_word"):
            raise source.refuse(f"{field}.single_word", entry["single_word"], f"({content!r}) only false is supported")
        if content in added:
            hf_id = added[content]
        elif content in model_vocab:
            hf_id = model_vocab[content]
        elif not added:
            hf_id = model_size
        else:
            largest = max(added.values())
            hf_id = largest + 1 if largest >= model_size or model_size == 0 else model_size
        if token_id != hf_id:
            raise source.refuse(
                f"{field}.id", token_id, f"HF gives {content!r} id {hf_id} when it loads this file (the file is inconsistent)"
            )
        added[content] = token_id
        normalized = bool(entry.get("normalized", not entry.get("special", False)))
        # Gemma's normalizer only writes spaces as ▁, one character for one:
        # a token without either is found at the same places before and after it.
        unchanged = normalizer == "replace" and " " not in content and "\u2581" not in content
        if normalized and normalizer is not None and not unchanged:
            raise source.refuse(
                f"{field}.normalized", entry.get("normalized"),
                f"({content!r}) with a normalizer, only false loads (HF would match it in the normalized text)",
            )
        by_normalized[normalized].append(content)
    for first in by_normalized[False]:
        for second in by_normalized[True]:
            if _can_overlap(first, second):
                raise source.refuse(
                    "added_tokens", [first, second],
                    "HF splits off non-normalized tokens first, then normalized ones; these two can overlap, "
                    "so that order could matter, and it is not reproduced",
                )
    return added


def _can_overlap(a: str, b: str) -> bool:
    """Whether occurrences of ``a`` and ``b`` in some text can share a character."""
    if a in b or b in a:
        return True
    return any(a.endswith(b[:k]) for k in range(1, len(b))) or any(b.endswith(a[:k]) for k in range(1, len(a)))


def _vocab(
    model_vocab: dict, added: dict[str, int], source: _Source, spelling: Callable[[str], bytes]
) -> dict[int, bytes]:
    """id -> bytes for the model's vocabulary (spelled as ``spelling`` reads) and the added tokens."""
    added_at = {token_id: content for content, token_id in added.items()}
    vocab: dict[int, bytes] = {}
    for spelled, token_id in model_vocab.items():
        if not isinstance(token_id, int) or isinstance(token_id, bool) or token_id < 0:
            raise source.refuse(f"model.vocab[{spelled!r}]", token_id, "expected a non-negative integer id")
        if token_id in vocab:
            raise source.refuse(f"model.vocab[{spelled!r}]", token_id, "that id is given to two tokens")
        try:
            vocab[token_id] = spelling(spelled)
        except ValueError:
            # An added token listed in the vocabulary too is written as plain text.
            if added_at.get(token_id) != spelled:
                raise source.refuse(
                    "model.vocab key", spelled,
                    "it is not spelled with GPT-2's byte -> character table, so this is not a byte-level vocabulary",
                ) from None
            vocab[token_id] = spelled.encode("utf-8")
    for content, token_id in added.items():
        held = vocab.setdefault(token_id, content.encode("utf-8"))
        if held != content.encode("utf-8"):
            raise source.refuse(
                f"added token {content!r}'s id", token_id, f"model.vocab gives that id to {held!r}"
            )
    return vocab


def _merges(entries: Any, source: _Source, spelling: Callable[[str], bytes]) -> list[tuple[bytes, bytes]]:
    """Merges by rank; a pair listed twice keeps only its last position, as HF's merge table does."""
    if not isinstance(entries, list):
        raise source.refuse("model.merges", entries, "expected a list")
    pairs: list[tuple[bytes, bytes]] = []
    for index, entry in enumerate(entries):
        parts = entry.split(" ") if isinstance(entry, str) else entry
        if not (isinstance(parts, (list, tuple)) and len(parts) == 2 and all(isinstance(p, str) and p for p in parts)):
            raise source.refuse(f"model.merges[{index}]", entry, "expected \"left right\" or [\"left\", \"right\"]")
        try:
            pairs.append((spelling(parts[0]), spelling(parts[1])))
        except ValueError as error:
            raise source.refuse(f"model.merges[{index}]", entry, str(error)) from None
    last = {pair: index for index, pair in enumerate(pairs)}
    return [pair for index, pair in enumerate(pairs) if last[pair] == index]


# ----------------------------------------------------------------- bos/eos


def _post_processor_bos(node: Any, field: str, source: _Source) -> tuple[int | bool, int | bool]:
    """The bos and eos ids a TemplateProcessing adds around the text; False for each that nothing adds."""
    if node is None:
        return False, False
    kind = node.get("type") if isinstance(node, dict) else None
    if kind == "ByteLevel":
        return False, False
    if kind == "Sequence":
        found: tuple[int | bool, int | bool] = (False, False)
        for index, step in enumerate(node.get("processors") or []):
            added = _post_processor_bos(step, f"{field}.processors[{index}]", source)
            if added != (False, False):
                if found != (False, False):
                    raise source.refuse(field, node, "expected at most one TemplateProcessing that adds a token")
                found = added
        return found
    if kind != "TemplateProcessing":
        raise source.refuse(f"{field}.type", kind, "supported post-processors are ByteLevel and TemplateProcessing")
    single = node.get("single")
    # Each item is {"SpecialToken": {"id": text, ...}} or {"Sequence": {"id": "A", ...}}.
    items = []
    for item in single if isinstance(single, list) else [None]:
        kind_and_value = next(iter(item.items())) if isinstance(item, dict) and len(item) == 1 else (None, None)
        value = kind_and_value[1]
        items.append((kind_and_value[0], value.get("id") if isinstance(value, dict) else None))
    if ("Sequence", "A") not in items:
        raise source.refuse(f"{field}.single", single, "expected a template holding $A")
    at = items.index(("Sequence", "A"))
    before, after = items[:at], items[at + 1:]
    if len(before) > 1 or len(after) > 1 or any(kind != "SpecialToken" for kind, _ in before + after):
        raise source.refuse(
            f"{field}.single", single,
            "only a template of $A with at most one special token before it (bos) and one after it (eos) is reproduced",
        )

    def special_id(name: str) -> int:
        entry = (node.get("special_tokens") or {}).get(name)
        ids = entry.get("ids") if isinstance(entry, dict) else None
        if not (isinstance(ids, list) and len(ids) == 1 and isinstance(ids[0], int) and not isinstance(ids[0], bool)):
            raise source.refuse(f"{field}.special_tokens[{name!r}].ids", ids, "expected a list of one id")
        return ids[0]

    return (special_id(before[0][1]) if before else False, special_id(after[0][1]) if after else False)


def _config_token(config: dict, name: str, config_source: _Source) -> str | None:
    value = config.get(name)
    if isinstance(value, dict):
        value = value.get("content")
    if value is not None and (not isinstance(value, str) or not value):
        raise config_source.refuse(name, config.get(name), "expected a token's text or {\"content\": text}")
    return value


def _bos_eos(
    config: dict,
    config_path: Path | None,
    template_bos: int | bool,
    template_eos: int | bool,
    added: dict[str, int],
    vocab: dict[int, bytes],
    sentencepiece: bool,
) -> dict[str, Any]:
    """bos/eos/pad tokens and ``add_bos``/``add_eos`` from the config and the post-processor's template."""
    config_source = _Source(config_path or Path(TOKENIZER_CONFIG_FILE))
    # A SentencePiece-style tokenizer.json already says whether a ▁ is put
    # first; the config's add_prefix_space (and legacy) only told the converter that made it.
    if not sentencepiece and config.get("add_prefix_space"):
        raise config_source.refuse("add_prefix_space", config["add_prefix_space"], "only false is supported")
    lowest_ids: dict[bytes, int] = {}
    for token_id in sorted(vocab):
        lowest_ids.setdefault(vocab[token_id], token_id)
    ids, texts = {}, {}
    for name in ("bos_token", "eos_token", "pad_token"):
        texts[name] = text = _config_token(config, name, config_source)
        ids[name] = None if text is None else added.get(text, lowest_ids.get(text.encode("utf-8")))
        if text is not None and ids[name] is None:
            raise config_source.refuse(name, text, "it is not a token of the tokenizer.json beside it")
    found = {}
    for name, flag, template_id, where in (
        ("bos_token", "add_bos_token", template_bos, "first"), ("eos_token", "add_eos_token", template_eos, "last")
    ):
        token_id = ids[name]
        if template_id is not False:
            if token_id is not None and token_id != template_id:
                raise config_source.refuse(
                    name, texts[name],
                    f"that is id {token_id}, but the post-processor's template adds id {template_id} {where}",
                )
            token_id = template_id
        # HF's Llama tokenizers rebuild the template from these flags; without them the template decides.
        add = config.get(flag, template_id is not False)
        if not isinstance(add, bool):
            raise config_source.refuse(flag, add, "expected true or false")
        if add and token_id is None:
            raise config_source.refuse(flag, add, f"but no {name} is given")
        found[name] = token_id
        found["add_" + name.split("_")[0]] = add
    return found | {"pad_token": ids["pad_token"]}
