"""The scratchlm tokenizer JSON document (``Tokenizer.save`` / ``Tokenizer.load``), both versions.

Version 1 holds a GPT-2-style tokenizer: vocab, merges and special tokens by
text. Version 2 adds the pre-tokenizer preset, ``ignore_merges``, bos/eos and
``add_bos``, and special tokens with their exact ids; ``unk_id`` and
``fuse_unk`` appear only when set (what a byte missing from the vocabulary
becomes), and so do ``normalizer`` (``"nfc"``), ``add_eos`` (true),
``pad_id``, ``nonspecial_tokens``, ``lstrip_tokens`` and ``rstrip_tokens``
(each when non-empty), and ``merge_ranks`` (SentencePiece merges of tied
rank, when set). Version 3 is version 2
plus the SentencePiece settings ``metaspace``, ``metaspace_split``,
``byte_fallback`` and ``decoder``; it is written only for a tokenizer with
``metaspace`` set, so every byte-level tokenizer is still written as version 1 or 2. A tokenizer is written as
version 1 whenever version 1 describes it completely, so such files stay
readable by code that only knows version 1; code that knows only version 1
refuses a version 2 file instead of encoding it with the wrong pre-tokenizer.
The layout is shown in :mod:`scratchlm.tokenizer.tokenizer`.
"""

from __future__ import annotations

from typing import Any

from scratchlm.tokenizer.pretokenizers import DEFAULT_PRETOKENIZER

SAVE_FORMAT = "scratchlm-bpe-tokenizer"
SAVE_FORMAT_VERSION = 3
_READABLE_VERSIONS = (1, 2, 3)
# Version 3 = version 2 plus these keys, for SentencePiece-style BPE (the
# Tokenizer keywords of the same names); written only when "metaspace" is set.
SENTENCEPIECE_KEYS = ("metaspace", "metaspace_split", "byte_fallback", "decoder")


def tokenizer_document(
    vocab: dict[int, bytes],
    merges: list[tuple[bytes, bytes]],
    special_token_ids: dict[str, int],
    *,
    pretokenizer: str,
    ignore_merges: bool,
    bos_id: int | None,
    eos_id: int | None,
    add_bos: bool,
    unk_id: int | None = None,
    fuse_unk: bool = False,
    normalizer: str | None = None,
    add_eos: bool = False,
    pad_id: int | None = None,
    nonspecial_tokens: tuple[str, ...] = (),
    lstrip_tokens: tuple[str, ...] = (),
    rstrip_tokens: tuple[str, ...] = (),
    merge_ranks: list[int] | None = None,
    metaspace: str | None = None,
    metaspace_split: bool = False,
    byte_fallback: bool = False,
    decoder: str | None = None,
) -> dict[str, Any]:
    """The JSON document of a tokenizer: version 1 when that is enough, else version 2, or 3 for SentencePiece."""
    # Version 1 reloads special tokens by text, each taking the lowest id that
    # holds its bytes; it is exact only when that is each one's id.
    lowest_ids: dict[bytes, int] = {}
    for token_id in sorted(vocab):
        lowest_ids.setdefault(vocab[token_id], token_id)
    version_1_is_enough = (
        pretokenizer == DEFAULT_PRETOKENIZER
        and not ignore_merges
        and bos_id is None
        and eos_id is None
        and not add_bos
        and not add_eos
        and pad_id is None
        and not nonspecial_tokens
        and not lstrip_tokens
        and not rstrip_tokens
        and unk_id is None
        and not fuse_unk
        and normalizer is None
        and metaspace is None
        and all(lowest_ids[token.encode("utf-8")] == token_id for token, token_id in special_token_ids.items())
    )
    document: dict[str, Any] = {
        "format": SAVE_FORMAT,
        "version": 1 if version_1_is_enough else 2 if metaspace is None else 3,
        "vocab": {str(token_id): token.hex() for token_id, token in sorted(vocab.items())},
        "merges": [[left.hex(), right.hex()] for left, right in merges],
    }
    if version_1_is_enough:
        document["special_tokens"] = list(special_token_ids)
    else:
        document |= {
            "special_tokens": dict(special_token_ids),
            "pretokenizer": pretokenizer,
            "ignore_merges": ignore_merges,
            "bos_id": bos_id,
            "eos_id": eos_id,
            "add_bos": add_bos,
        }
        # Written only when set: older readers of version 2 then see nothing new.
        if unk_id is not None or fuse_unk:
            document |= {"unk_id": unk_id, "fuse_unk": fuse_unk}
        if normalizer is not None:
            document["normalizer"] = normalizer
        if add_eos:
            document["add_eos"] = add_eos
        if pad_id is not None:
            document["pad_id"] = pad_id
        for key, tokens in (
            ("nonspecial_tokens", nonspecial_tokens), ("lstrip_tokens", lstrip_tokens), ("rstrip_tokens", rstrip_tokens)
        ):
            if tokens:
                document[key] = list(tokens)
        if merge_ranks is not None:
            document["merge_ranks"] = list(merge_ranks)
        if metaspace is not None:
            document |= {
                "metaspace": metaspace,
                "metaspace_split": metaspace_split,
                "byte_fallback": byte_fallback,
                "decoder": decoder,
            }
    return document


def tokenizer_arguments(document: Any, source: str) -> tuple[tuple, dict[str, Any]]:
    """``(args, kwargs)`` for ``Tokenizer`` from a document of either version.

    ``source`` names where the document came from, for error messages
    (``"path 'tok.json'"``). A malformed document raises ValueError.
    """
    if not isinstance(document, dict) or document.get("format") != SAVE_FORMAT:
        raise ValueError(f"{source} is not a saved tokenizer (expected \"format\": {SAVE_FORMAT!r})")
    version = document.get("version")
    if version not in _READABLE_VERSIONS:
        raise ValueError(
            f"{source} has tokenizer format version {version!r}; this code reads versions "
            f"{', '.join(map(str, _READABLE_VERSIONS))}"
        )
    try:
        vocab = {int(token_id): bytes.fromhex(token) for token_id, token in document["vocab"].items()}
        merges = [(bytes.fromhex(left), bytes.fromhex(right)) for left, right in document["merges"]]
        special_tokens = document["special_tokens"]
        if version == 1:
            return (vocab, merges, special_tokens), {}
        kwargs = {
            "pretokenizer": document["pretokenizer"],
            "ignore_merges": document["ignore_merges"],
            "bos_token": document["bos_id"],
            "eos_token": document["eos_id"],
            "add_bos": document["add_bos"],
            "unk_token": document.get("unk_id"),
            "fuse_unk": document.get("fuse_unk", False),
            "normalizer": document.get("normalizer"),
            "add_eos": document.get("add_eos", False),
            "pad_token": document.get("pad_id"),
            "nonspecial_tokens": document.get("nonspecial_tokens", ()),
            "lstrip_tokens": document.get("lstrip_tokens", ()),
            "rstrip_tokens": document.get("rstrip_tokens", ()),
            "merge_ranks": document.get("merge_ranks"),
        }
        if version == 3:
            kwargs |= {key: document[key] for key in SENTENCEPIECE_KEYS}
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ValueError(f"{source} is a malformed version {version} tokenizer: {type(error).__name__}: {error}") from None
    if not isinstance(special_tokens, dict):
        raise ValueError(f"{source}: version {version} \"special_tokens\" must be an object text -> id")
    return (vocab, merges, special_tokens), kwargs
