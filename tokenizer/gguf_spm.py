"""SentencePiece vocabularies in GGUF (``tokenizer.ggml.model = "llama"``): Llama 1/2, TinyLlama, Mistral 7B, Gemma.

Such a file holds no merges. ``tokenizer.ggml.tokens`` spells each token as
SentencePiece does (``"▁the"``, ``"<0x0A>"``), ``tokenizer.ggml.scores`` gives
each a float score, and llama.cpp (``llm_tokenizer_spm_session`` in
``src/llama-vocab.cpp``) encodes the text between special tokens like this:

1. a space is put first when ``tokenizer.ggml.add_space_prefix`` (true when
   absent): before every such text, even one that starts with a space;
   then every space becomes ``▁``;
2. the symbols are the UTF-8 characters;
3. repeatedly, of all adjacent pairs of symbols whose concatenation is a
   token (of any type), merge the one whose token has the highest score,
   the leftmost among equal scores;
4. each final symbol is its token; one that is not a token (a character the
   vocabulary lacks) becomes the ``<0xNN>`` tokens of its UTF-8 bytes.

Special tokens: every control (3), user-defined (4) and unknown (2) token of
``tokenizer.ggml.token_type`` is matched in the text and kept whole, as
llama.cpp does when it parses special tokens (llama-server and llama-cli do).

:func:`gguf_spm_arguments` turns this into the rank-based engine of
:class:`~scratchlm.tokenizer.tokenizer.Tokenizer` in SentencePiece mode
(``metaspace="prepend"``, or ``"never"`` without the space prefix;
``byte_fallback=True``): the vocabulary is each token's text in UTF-8, and
:func:`spm_merges` lists every split of a token into two tokens, ordered by
the score of the token they make, highest first.

When the rank order is llama.cpp's rule
---------------------------------------
Give each merge the *score rank* of its token (equal scores, equal ranks).
The engine that merges the lowest rank first, leftmost among equal ranks
(:func:`~scratchlm.tokenizer.apply_merges.merge_by_rank`), then makes
llama.cpp's merges exactly, on any text whose characters are all tokens:
by induction both hold the same symbols, all of them tokens (a character
is one by assumption, a merge makes one); a pair is then a candidate in
llama.cpp (its concatenation is a token) exactly when it is a merge here;
the highest score is the lowest rank and the leftmost wins in both; and
llama.cpp's queue skips an entry exactly when a merge since has changed one
of its two symbols, so it always takes the best pair present.

``Tokenizer`` ranks merges by list position, so two merges of equal score
rank apart. That matters only when two *different* pairs of the top score
are candidates at once:

* pairs of two tokens with equal scores: ``"ab"`` and ``"bc"`` in ``"abc"``;
  llama.cpp merges the leftmost, a list the one it puts first. Real
  vocabularies give each normal token its own score (SentencePiece BPE
  scores by merge order); equal scores are left to control, byte, unused
  and user-defined tokens, which are kept whole or never built by merges.
* two splits of one token (``"▁▁▁"`` as ``▁ + ▁▁`` and ``▁▁ + ▁``). Between
  one pair's own occurrences the leftmost wins in both engines; no text
  was found where two splits of one token change the result: a search of
  over 50,000 random vocabularies with distinct scores over one to three
  letters (texts up to 40 letters; tests/tokenizer/test_gguf_spm.py runs
  200 of them) found none, while one with tied scores finds a difference
  within a few tries. Not proven.

The list is ordered as transformers' ``generate_merges`` orders it (score,
then the longer left part first, then ids), so it is the list of
transformers' GGUF tokenizer and of a Llama 2 ``tokenizer.json``, and the
ids equal theirs wherever their other steps do.

Where llama.cpp, transformers and HF ``tokenizers`` differ
----------------------------------------------------------
* Space prefix: llama.cpp prepends a space to every text between special
  tokens, even to one starting with a space (``" hi"`` -> ``▁▁hi``); a
  legacy Llama 2 ``tokenizer.json`` (normalizer ``Prepend("▁")``) does the
  same. transformers' GGUF tokenizer builds a Metaspace with
  ``prepend_scheme="first"``: only before the first text, not before one
  starting with a space, and not after a special token. It also ignores
  ``add_space_prefix = false`` for llama-architecture files.
* Ties, as above. transformers' GGUF tokenizer of a Gemma file orders merges
  by token position, not score; for scores ``-index`` that is the same.
  It also renames Gemma's user-defined tokens of spaces (``"  "``, written
  with real spaces) to ``"▁▁"`` and builds them by merges, where llama.cpp
  matches them in the text: ``" " * 7`` is ``"   ", "   ", "▁"`` here and
  in llama.cpp, not in transformers.
* ``tokenizer.ggml.merges``, which some files converted from a
  ``tokenizer.json`` carry (old TinyLlama files), is ignored, as llama.cpp
  ignores it; transformers uses it instead of the scores.
* A character the vocabulary lacks but that some token holds (``"▁x"``
  without ``"x"``): llama.cpp may merge it into that token; the rank engine
  and HF give its byte tokens. SentencePiece vocabularies hold every
  character of their tokens, so this needs a hand-made vocabulary.
* A character without a token whose bytes lack ``<0xNN>`` tokens: llama.cpp
  throws; here it becomes ``tokenizer.ggml.unknown_token_id`` when the
  file has one (a run of them one unk, as HF's BPE with ``fuse_unk``),
  else it is dropped. Llama 2, Mistral and Gemma hold all 256 byte tokens.
* Overlapping special tokens: llama.cpp matches the longest special token
  everywhere first, then the next longest; the Tokenizer (and HF) match
  leftmost, longest first there. They differ only when two special tokens
  overlap in the text (``"<a>"`` and ``"a><b>"``).
* An empty token is renamed ``"[EMPTY_<id>]"``, as llama.cpp renames it.

Other keys: ``bos_token_id``/``eos_token_id`` default to 1 and 2 as in
llama.cpp (when the vocabulary has them); ``add_bos_token`` defaults to
true; ``add_eos_token`` (default false) becomes ``add_eos``;
``padding_token_id`` becomes ``pad_id``; ``tokenizer.ggml.pre`` is not
used (llama.cpp ignores it for SentencePiece).
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping
from typing import Any

_PREFIX = "tokenizer.ggml."
TOKEN_TYPE_NORMAL, TOKEN_TYPE_UNKNOWN, TOKEN_TYPE_CONTROL = 1, 2, 3
TOKEN_TYPE_USER_DEFINED, TOKEN_TYPE_UNUSED, TOKEN_TYPE_BYTE = 4, 5, 6
# The types llama.cpp matches in the text and keeps whole (parse_special=true).
KEPT_WHOLE_TYPES = (TOKEN_TYPE_UNKNOWN, TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED)
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_MODEL_NEEDS = f"{_PREFIX}model 'llama' (SentencePiece) needs it"
# llama.cpp's default ids for a SentencePiece vocabulary that does not name them.
_DEFAULT_IDS = {"bos_token_id": 1, "eos_token_id": 2}


def refuse(source: str, key: str, value: Any, expected: str) -> ValueError:
    """The error for a GGUF metadata ``key`` whose ``value`` is not what was ``expected`` (long values cut)."""
    quoted = repr(value)
    if len(quoted) > 200:
        quoted = quoted[:200] + "..."
    return ValueError(f"{source}: {key} is {quoted}; {expected}")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def read_field(fields: Mapping[str, Any], name: str, kind: type, source: str, required: bool = True) -> Any:
    """``tokenizer.ggml.<name>`` from ``fields``, checked to be a ``kind`` (any integer type, not a bool,
    for int); None when it is absent and not ``required``."""
    key = _PREFIX + name
    if key not in fields:
        if required:
            raise ValueError(f"{source}: {key} is missing")
        return None
    value = fields[key]
    if kind is int:
        if not _is_int(value):
            raise refuse(source, key, value, "expected an integer")
        return int(value)
    if not isinstance(value, kind):
        raise refuse(source, key, value, f"expected a {kind.__name__}")
    return value


def _optional(fields: Mapping[str, Any], name: str, kind: type, source: str) -> Any:
    """:func:`read_field` of an optional key, a value of None counting as absent."""
    if fields.get(_PREFIX + name) is None:
        return None
    return read_field(fields, name, kind, source, required=False)


def read_spm_vocabulary(
    fields: Mapping[str, Any], source: str = "GGUF metadata"
) -> tuple[list[str], list[float], list[int]]:
    """``(tokens, scores, token_types)`` of a SentencePiece GGUF vocabulary, checked.

    One entry per id. ``token_type`` defaults to all normal (as in llama.cpp);
    ``scores`` is required (llama.cpp would merge leftmost-first without it).
    Errors name the key, the value and what was expected.
    """
    tokens = fields.get(_PREFIX + "tokens")
    if tokens is None:
        raise ValueError(f"{source}: {_PREFIX}tokens is missing; {_MODEL_NEEDS}")
    if not isinstance(tokens, list) or not tokens:
        raise refuse(source, _PREFIX + "tokens", tokens, "expected a non-empty list of strings")
    scores = fields.get(_PREFIX + "scores")
    if scores is None:
        raise ValueError(f"{source}: {_PREFIX}scores is missing; {_MODEL_NEEDS} (its merges are ordered by score)")
    types = fields.get(_PREFIX + "token_type")
    if types is None:
        types = [TOKEN_TYPE_NORMAL] * len(tokens)
    for name, values in (("scores", scores), ("token_type", types)):
        if not isinstance(values, list):
            raise refuse(source, _PREFIX + name, values, "expected a list, one per token")
        if len(values) != len(tokens):
            raise refuse(source, _PREFIX + name, f"{len(values)} values", f"expected {len(tokens)}, one per token")

    texts: list[str] = []
    seen: dict[str, int] = {}
    for token_id, (text, score, token_type) in enumerate(zip(tokens, scores, types)):
        if not isinstance(text, str):
            raise refuse(source, f"{_PREFIX}tokens[{token_id}]", text, "expected a string")
        if not text:
            text = f"[EMPTY_{token_id}]"  # llama.cpp's name for an empty token
        if text in seen:
            raise refuse(source, f"{_PREFIX}tokens[{token_id}]", text,
                          f"the same token is id {seen[text]} (llama.cpp refuses this too)")
        seen[text] = token_id
        if not isinstance(score, numbers.Real) or isinstance(score, bool) or math.isnan(score):
            raise refuse(source, f"{_PREFIX}scores[{token_id}]", score, "expected a number (not NaN)")
        if not _is_int(token_type) or not TOKEN_TYPE_NORMAL <= token_type <= TOKEN_TYPE_BYTE:
            raise refuse(source, f"{_PREFIX}token_type[{token_id}]", token_type, "expected 1 to 6")
        if token_type == TOKEN_TYPE_BYTE and not _BYTE_TOKEN.fullmatch(text):
            raise refuse(source, f"{_PREFIX}tokens[{token_id}]", text, "a byte token (type 6) must be '<0xNN>'")
        texts.append(text)
    return texts, [float(score) for score in scores], [int(token_type) for token_type in types]


def spm_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Every split of a token into two tokens, as ``(left, right)``, best first.

    Ordered by the score of ``left + right`` (highest first), then the longer
    ``left`` first, then by the ids of the token, ``left`` and ``right``: the
    order of transformers' ``generate_merges``. Splits fall between
    characters, as llama.cpp's symbols are characters.

    >>> spm_merges(["a", "b", "ab", "abb", "bb"], [0.0, 0.0, -1.0, -3.0, -2.0])
    [('a', 'b'), ('b', 'b'), ('ab', 'b'), ('a', 'bb')]
    """
    ids = {token: token_id for token_id, token in enumerate(tokens)}
    keyed = []
    for token_id, token in enumerate(tokens):
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ids and right in ids:
                key = (-scores[token_id], -len(left), -len(right), token_id, ids[left], ids[right])
                keyed.append((key, (left, right)))
    keyed.sort()
    return [pair for _, pair in keyed]


def spm_score_ranks(tokens: list[str], scores: list[float], merges: list[tuple[str, str]]) -> list[int]:
    """For each merge of :func:`spm_merges`, the rank of its token's score (0 = best; equal scores share one).

    With these ranks, lowest first and leftmost among equals, merging is
    llama.cpp's rule exactly (module docstring); the list order breaks
    their ties.
    """
    score_of = dict(zip(tokens, scores))
    distinct = sorted({score_of[left + right] for left, right in merges}, reverse=True)
    rank_of = {score: rank for rank, score in enumerate(distinct)}
    return [rank_of[score_of[left + right]] for left, right in merges]


def gguf_spm_arguments(
    fields: Mapping[str, Any], source: str = "GGUF metadata"
) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]], dict[str, int], dict[str, Any]]:
    """``(vocab, merges, special_tokens, settings)`` for ``Tokenizer`` from a SentencePiece GGUF vocabulary.

    ``fields`` maps full keys (``"tokenizer.ggml.tokens"``) to plain values;
    ``source`` names them in errors. Rules in the module docstring.
    """
    tokens, scores, types = read_spm_vocabulary(fields, source)
    vocab = {token_id: text.encode("utf-8") for token_id, text in enumerate(tokens)}
    special_tokens = {
        text: token_id for token_id, (text, token_type) in enumerate(zip(tokens, types))
        if token_type in KEPT_WHOLE_TYPES
    }
    text_merges = spm_merges(tokens, scores)
    merges = [(left.encode("utf-8"), right.encode("utf-8")) for left, right in text_merges]
    score_ranks = spm_score_ranks(tokens, scores, text_merges)

    ids: dict[str, int | None] = {}
    for name in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id"):
        token_id = _optional(fields, name, int, source)
        if token_id is not None and not 0 <= token_id < len(tokens):
            raise refuse(source, _PREFIX + name, token_id, f"ids are 0..{len(tokens) - 1}")
        if token_id is None and _DEFAULT_IDS.get(name, len(tokens)) < len(tokens):
            token_id = _DEFAULT_IDS[name]
        ids[name] = token_id
    add_space_prefix = _optional(fields, "add_space_prefix", bool, source)
    add_bos = _optional(fields, "add_bos_token", bool, source)
    if add_bos is None:
        add_bos = ids["bos_token_id"] is not None
    if add_bos and ids["bos_token_id"] is None:
        raise refuse(source, _PREFIX + "add_bos_token", add_bos, f"but {_PREFIX}bos_token_id is missing")
    add_eos = bool(_optional(fields, "add_eos_token", bool, source))
    if add_eos and ids["eos_token_id"] is None:
        raise refuse(source, _PREFIX + "add_eos_token", add_eos, f"but {_PREFIX}eos_token_id is missing")
    settings = {
        "metaspace": "never" if add_space_prefix is False else "prepend",
        "byte_fallback": True,
        "bos_token": ids["bos_token_id"],
        "eos_token": ids["eos_token_id"],
        "add_bos": add_bos,
        "add_eos": add_eos,
        "pad_token": ids["padding_token_id"],
        # transformers' tokenizer of a GGUF marks user-defined tokens not special, as HF files do.
        "nonspecial_tokens": tuple(
            text for token_id, (text, token_type) in enumerate(zip(tokens, types))
            if token_type == TOKEN_TYPE_USER_DEFINED and special_tokens.get(text) == token_id
        ),
        "unk_token": ids["unknown_token_id"],
        "fuse_unk": True,
        # Only where scores tie does a rank differ from the merge's position in the list.
        "merge_ranks": None if len(set(score_ranks)) == len(score_ranks) else score_ranks,
    }
    return vocab, merges, special_tokens, settings

