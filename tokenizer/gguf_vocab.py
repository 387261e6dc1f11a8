"""Reading the tokenizer in a llama.cpp GGUF file's metadata (the ``tokenizer.ggml.*`` keys).

:func:`read_gguf_tokenizer_fields` reads the keys with the ``gguf`` package
(llama.cpp's own reader, imported only when a file is read);
:func:`gguf_tokenizer_arguments` turns them into ``Tokenizer`` arguments,
following what llama.cpp's loader (``src/llama-vocab.cpp``) does with them:

* ``tokenizer.ggml.model`` is ``"gpt2"``, llama.cpp's byte-level BPE (the
  rules below), or ``"llama"``, SentencePiece (Llama 2, Mistral, Gemma),
  read by :mod:`scratchlm.tokenizer.gguf_spm`. ``"bert"`` (WordPiece),
  ``"t5"`` (Unigram) and the rest are refused.
* ``tokenizer.ggml.pre`` names the pre-tokenizer; :data:`GGUF_PRETOKENIZERS`
  maps llama.cpp's names to a preset, with the two flags llama.cpp sets with
  the name: ``ignore_merges`` (true for Llama 3's names, as HF's Llama 3 files
  say) and whether bos is added when ``tokenizer.ggml.add_bos_token`` is
  absent (never when ``bos_token_id`` is absent too). A missing or unknown name is refused (llama.cpp falls back to a
  generic regex that no model was trained with).
* ``tokenizer.ggml.tokens``: the token of each id, spelled with GPT-2's
  byte -> character table, except control (3), user-defined (4) and unknown
  (2) tokens of ``tokenizer.ggml.token_type``, which are plain text and are
  kept whole like special tokens (llama.cpp splits all three off when it
  parses special tokens). Normal (1) and unused (5) tokens are ordinary; a
  byte token (6) is SentencePiece's ``<0x..>`` and is refused. Without
  ``token_type`` every token is normal, as in llama.cpp.
* The vocabulary may lack single bytes (SmolLM2's lacks 21): such a byte in
  the text is dropped and its neighbours merge as if it were not there, what
  transformers' tokenizer of the same file does (its BPE has no unk token).
  ``tokenizer.ggml.unknown_token_id`` is not used for that: neither
  transformers nor llama.cpp's byte-level BPE emits it.
* ``tokenizer.ggml.merges``: ``"left right"`` strings by rank; a pair listed
  twice keeps its first rank (llama.cpp's merge table keeps the first).
* ``tokenizer.ggml.bos_token_id``, ``eos_token_id``, ``add_bos_token``,
  ``add_eos_token`` (``add_eos``) and ``padding_token_id`` (``pad_id``).

One difference from llama.cpp remains on purpose: llama.cpp spells Llama 3's
case-insensitive contractions as ``'[sS]`` and so on, which misses ``'ſ``
(U+017F, whose case folds to ``s``); the pattern here is the one in HF's
files, so GGUF and tokenizer.json give the same ids.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from scratchlm.tokenizer.gguf_spm import (
    KEPT_WHOLE_TYPES,
    TOKEN_TYPE_BYTE,
    TOKEN_TYPE_NORMAL,
    TOKEN_TYPE_UNUSED,
    TOKEN_TYPE_USER_DEFINED,
    gguf_spm_arguments,
    read_field,
    refuse,
)
from scratchlm.tokenizer.gpt2_files import decode_gpt2_token

_PREFIX = "tokenizer.ggml."
_ORDINARY_TYPES = (TOKEN_TYPE_NORMAL, TOKEN_TYPE_UNUSED)

# llama.cpp's tokenizer.ggml.pre names -> (preset, ignore_merges, add_bos when
# the file does not say), for the names whose tokenization is exactly a
# preset (llama_vocab::impl::load and llm_tokenizer_bpe in llama-vocab.cpp).
_LLAMA3 = ("llama3", True, True)
_LLAMA3_REGEX_ONLY = ("llama3", False, False)
_GPT2 = ("gpt2", False, False)
_GPT2_DIGITS = ("gpt2-digits", False, False)
# Qwen2's tokenizer.json normalizes to NFC; its GGUF loads without a normalizer,
# since llama.cpp applies none and neither does the tokenizer transformers
# builds from the file (tests/tokenizer/test_qwen2.py compares with the latter).
_QWEN2 = ("qwen2", False, False)
GGUF_PRETOKENIZERS: dict[str, tuple[str, bool, bool]] = {
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral"], _LLAMA3),
    **dict.fromkeys(["dbrx", "smaug-bpe"], _LLAMA3_REGEX_ONLY),
    **dict.fromkeys(["gpt-2", "phi-2", "mpt", "olmo", "jais", "trillion", "granite-docling", "exaone4"], _GPT2),
    **dict.fromkeys(
        ["starcoder", "smollm", "refact", "command-r", "codeshell", "exaone", "minerva-7b"], _GPT2_DIGITS
    ),
    "qwen2": _QWEN2,
}

_OTHER_MODELS = {
    "bert": "WordPiece",
    "t5": "Unigram (SentencePiece)",
}


def read_gguf_tokenizer_fields(path: str | os.PathLike) -> dict[str, Any]:
    """The ``tokenizer.ggml.*`` keys of a GGUF file, as plain Python values.

    Strings, ints, bools and lists of them, as :func:`gguf_tokenizer_arguments`
    takes them. A file the reader cannot parse (truncated, corrupt, not GGUF)
    raises ValueError naming it.

    >>> read_gguf_tokenizer_fields("model.gguf")["tokenizer.ggml.pre"]  # doctest: +SKIP
    'llama-bpe'
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist")
    try:
        import gguf
    except ImportError as error:
        raise ImportError("reading a GGUF file needs llama.cpp's gguf package: pip install gguf") from error
    try:
        reader = gguf.GGUFReader(path)
        return {name: field.contents() for name, field in reader.fields.items() if name.startswith(_PREFIX)}
    # The reader has no error type of its own: a truncated or corrupt file
    # surfaces as ValueError, IndexError, struct or numpy errors, or
    # UnicodeDecodeError, from wherever parsing stopped.
    except Exception as error:
        raise ValueError(
            f"GGUF file {str(path)!r} could not be read (truncated or corrupt?): {type(error).__name__}: {error}"
        ) from error


def gguf_tokenizer_arguments(
    fields: Mapping[str, Any], source: str = "GGUF metadata"
) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]], dict[str, int], dict[str, Any]]:
    """``(vocab, merges, special_tokens, settings)`` for ``Tokenizer`` from GGUF tokenizer metadata.

    ``fields`` maps full keys (``"tokenizer.ggml.tokens"``) to plain values;
    ``source`` names them in errors. Rules in the module docstring.
    """
    model = read_field(fields, "model", str, source)
    if model == "llama":
        return gguf_spm_arguments(fields, source)
    if model != "gpt2":
        kind = _OTHER_MODELS.get(model, "not a tokenizer this package reads")
        raise refuse(
            source, _PREFIX + "model", model,
            f"that is {kind}; byte-level BPE (\"gpt2\") and SentencePiece (\"llama\") load",
        )
    pre = read_field(fields, "pre", str, source, required=False)
    if pre not in GGUF_PRETOKENIZERS:
        raise refuse(
            source, _PREFIX + "pre", pre, f"known pre-tokenizers are {sorted(GGUF_PRETOKENIZERS)}"
        )
    pretokenizer, ignore_merges, default_add_bos = GGUF_PRETOKENIZERS[pre]

    tokens = read_field(fields, "tokens", list, source)
    token_types = read_field(fields, "token_type", list, source, required=False)
    if token_types is None:
        token_types = [TOKEN_TYPE_NORMAL] * len(tokens)
    if len(token_types) != len(tokens):
        raise refuse(
            source, _PREFIX + "token_type", f"{len(token_types)} types", f"expected {len(tokens)}, one per token"
        )
    vocab, special_tokens = _vocab(tokens, token_types, source)
    merges = _merges(read_field(fields, "merges", list, source), source)

    ids = {}
    for name in ("bos_token_id", "eos_token_id", "padding_token_id"):
        token_id = read_field(fields, name, int, source, required=False)
        if token_id is not None and not 0 <= token_id < len(tokens):
            raise refuse(source, _PREFIX + name, token_id, f"ids are 0..{len(tokens) - 1}")
        ids[name] = token_id
    add_bos = read_field(fields, "add_bos_token", bool, source, required=False)
    if add_bos is None:
        # The pre name's default, when there is a bos to add: without one,
        # transformers' tokenizer of the file adds nothing, and neither does this.
        add_bos = default_add_bos and ids["bos_token_id"] is not None
    if add_bos and ids["bos_token_id"] is None:
        raise refuse(source, _PREFIX + "add_bos_token", add_bos, f"but {_PREFIX}bos_token_id is missing")
    add_eos = bool(read_field(fields, "add_eos_token", bool, source, required=False))
    if add_eos and ids["eos_token_id"] is None:
        raise refuse(source, _PREFIX + "add_eos_token", add_eos, f"but {_PREFIX}eos_token_id is missing")
    settings = {
        "pretokenizer": pretokenizer,
        "ignore_merges": ignore_merges,
        "bos_token": ids["bos_token_id"],
        "eos_token": ids["eos_token_id"],
        "add_bos": add_bos,
        "add_eos": add_eos,
        "pad_token": ids["padding_token_id"],
        "nonspecial_tokens": tuple(
            text for token_id, (text, token_type) in enumerate(zip(tokens, token_types))
            if token_type == TOKEN_TYPE_USER_DEFINED and special_tokens.get(text) == token_id
        ),
    }
    return vocab, merges, special_tokens, settings


def _vocab(tokens: list, token_types: list, source: str) -> tuple[dict[int, bytes], dict[str, int]]:
    vocab: dict[int, bytes] = {}
    special_tokens: dict[str, int] = {}
    seen: dict[str, int] = {}
    for token_id, (text, token_type) in enumerate(zip(tokens, token_types)):
        key = f"{_PREFIX}tokens[{token_id}]"
        if not isinstance(text, str):
            raise refuse(source, key, text, "expected a string")
        if text in seen:
            raise refuse(source, key, text, f"the same token is id {seen[text]} (llama.cpp refuses this too)")
        seen[text] = token_id
        if token_type in KEPT_WHOLE_TYPES and text:
            vocab[token_id] = text.encode("utf-8")
            special_tokens[text] = token_id
        elif token_type in _ORDINARY_TYPES or (token_type in KEPT_WHOLE_TYPES and not text):
            try:
                vocab[token_id] = decode_gpt2_token(text)
            except ValueError:
                raise refuse(
                    source, key, text, "not spelled with GPT-2's byte -> character table: not a byte-level vocabulary"
                ) from None
        elif token_type == TOKEN_TYPE_BYTE:
            raise refuse(
                source, f"{_PREFIX}token_type[{token_id}]", token_type,
                f"byte tokens ({text!r}) are SentencePiece's byte fallback, not byte-level BPE",
            )
        else:
            raise refuse(source, f"{_PREFIX}token_type[{token_id}]", token_type, "expected 1 to 6")
    return vocab, special_tokens


def _merges(entries: list, source: str) -> list[tuple[bytes, bytes]]:
    merges: list[tuple[bytes, bytes]] = []
    seen: set[tuple[bytes, bytes]] = set()
    for index, entry in enumerate(entries):
        parts = entry.split(" ") if isinstance(entry, str) else None
        if parts is None or len(parts) != 2 or not all(parts):
            raise refuse(source, f"{_PREFIX}merges[{index}]", entry, "expected \"left right\"")
        try:
            pair = (decode_gpt2_token(parts[0]), decode_gpt2_token(parts[1]))
        except ValueError as error:
            raise refuse(source, f"{_PREFIX}merges[{index}]", entry, str(error)) from None
        if pair not in seen:
            seen.add(pair)
            merges.append(pair)
    return merges
