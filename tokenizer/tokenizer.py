"""The BPE tokenizer: text <-> token ids with a trained vocabulary and merges.

Encoding, per pre-token (see :mod:`scratchlm.tokenizer.pretokenize`): start
from its UTF-8 bytes, then repeatedly merge the adjacent pair whose merge was
learned earliest (lowest rank; leftmost among equals), until no adjacent pair
has a merge.

>>> vocab = {i: bytes([i]) for i in range(256)}
>>> vocab |= {256: b"<|endoftext|>", 257: b"ab", 258: b"abc"}
>>> tokenizer = Tokenizer(vocab, [(b"a", b"b"), (b"ab", b"c")], ["<|endoftext|>"])
>>> tokenizer.encode("abc ab<|endoftext|>")
[258, 32, 257, 256]
>>> tokenizer.decode([258, 256])
'abc<|endoftext|>'

Saved tokenizers are JSON (never pickle, which would run code on load)::

    {
      "format": "scratchlm-bpe-tokenizer",
      "version": 1,
      "vocab": {"0": "00", ..., "257": "6162"},   # id -> token bytes in hex
      "merges": [["61", "62"], ["6162", "63"]],   # pairs of hex bytes, by rank
      "special_tokens": ["<|endoftext|>"]          # strings; ids are in vocab
    }

Version 2 adds what version 1 cannot say, and is written only when a
tokenizer needs it (version 1 files stay readable by older code, and every
version 1 file loads as before, with GPT-2's pre-tokenizer)::

      "version": 2,
      "special_tokens": {"<|begin_of_text|>": 128000},   # text -> id, exactly
      "pretokenizer": "llama3",                           # a preset name
      "ignore_merges": true,
      "bos_id": 128000, "eos_id": 128001, "add_bos": true # ids or null
      "normalizer": "nfc"                                 # only when set (Qwen2)

Version 3 is version 2 plus the SentencePiece settings, written only for a
tokenizer with ``metaspace`` set (see :mod:`scratchlm.tokenizer.saved_format`)::

      "version": 3,
      "metaspace": "prepend", "metaspace_split": false,
      "byte_fallback": true, "decoder": "sentencepiece-strip"

Tokenizers of the Llama family load from their own files:
:meth:`Tokenizer.from_hf` (Hugging Face ``tokenizer.json``) and
:meth:`Tokenizer.from_gguf` (llama.cpp's GGUF metadata).
"""

from __future__ import annotations

import json  # noqa: F401  (tests patch json.dump through this module)
import unicodedata
from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np
import regex

from scratchlm.tokenizer.apply_merges import merge_ids
from scratchlm.tokenizer.merge_batch import MAX_ID, MAX_PIECE_BYTES, BatchMerger
from scratchlm.tokenizer.pretokenize import (  # noqa: F401  (GPT2_PRETOKENIZE_REGEX: for callers of this module)
    GPT2_PRETOKENIZE_REGEX,
    last_safe_cut,
    special_token_regex,
    split_on_special_tokens,
)
from scratchlm.tokenizer.pretokenizers import DEFAULT_PRETOKENIZER, PreTokenizer, get_pretokenizer
from scratchlm.tokenizer.saved_format import SAVE_FORMAT, SAVE_FORMAT_VERSION, tokenizer_document  # noqa: F401
from scratchlm.tokenizer.sentencepiece import SentencePieceBPE, check_sentencepiece_settings
from scratchlm.tokenizer.tokenizer_files import TokenizerFiles
# Most text repeats its pre-tokens (" the", ",", " of" ...), so each distinct
# pre-token is merged once and remembered. The cache is emptied when it holds
# this many entries, which bounds memory (~30 MB) on endless distinct input.
_CACHE_MAX_ENTRIES = 1 << 17
# A long text whose first pre-tokens are often missing from the cache (a cold
# start, or a new kind of text) has all its missing pre-tokens merged in one
# batch by a BatchMerger before the main loop: for tens of thousands of
# pre-tokens that is ~3x faster than merging them one by one as they come.
# Finding them costs a set over all the text's pre-tokens (~25 ns each, about
# 6% of a warm encode), hence the sample: at least _SAMPLE_MIN_MISSES of the
# first _SAMPLE_PIECES must be missing.
_BATCH_MIN_PIECES = 1 << 16
# Unicode's White_Space characters: what HF's added tokens strip (Rust's
# char::is_whitespace); Python's str.isspace also holds U+001C..U+001F, which HF keeps.
_WHITE_SPACE = (
    "\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + "\u2028\u2029\u202f\u205f\u3000"
)
_SAMPLE_PIECES = 1 << 12
_SAMPLE_MIN_MISSES = 1 << 6
# A batch pays for its fixed cost (a few ms of array set-up and rounds) from
# about this many pre-tokens.
_BATCH_MIN_MISSES = 1 << 12
# Longer pre-tokens (rare: long runs of spaces or symbols) go through the heap
# merge one by one; in a batch they would make wide, mostly padded arrays.
_BATCH_MAX_BYTES = MAX_PIECE_BYTES
# encode_iterable gathers at least this many characters before looking for a
# cut, so the per-call overhead of encode is paid per 64K characters, not per line.
_STREAM_MIN_CHARS = 1 << 16
# The normalizers a Tokenizer applies: None, or Unicode NFC.
_NORMALIZERS = (None, "nfc")
# The id of a byte the vocabulary lacks, in _byte_ids (never a real id).
_MISSING_BYTE = -1
# repr shows at most this many special tokens.
_REPR_MAX_SPECIAL_TOKENS = 8


class Tokenizer(TokenizerFiles):
    """Byte-level BPE tokenizer, or SentencePiece-style BPE with ``metaspace=...``.

    ``vocab`` maps id -> token bytes; ``merges`` lists merged pairs, earliest
    (highest priority) first. Ids need not be dense: ``vocab_size`` is one
    more than the largest. The vocabulary should hold all 256 single bytes,
    as :func:`~scratchlm.tokenizer.bpe.train_bpe` makes it; real pretrained
    ones often lack the bytes their training text never had (control
    characters, 0xC0, 0xC1, ...), listed in :attr:`missing_bytes`. Such a
    byte in the text becomes ``unk_token`` when there is one (a run of them
    one unk token with ``fuse_unk``) and is dropped otherwise, so that the
    bytes around it merge as if it were not there: what Hugging Face's BPE
    does, so ids stay HF's.
    ``special_tokens`` are strings kept whole and never merged with their
    neighbours; one whose bytes are already in ``vocab`` keeps that id, others
    get new ids after the largest one. They may instead be given as a mapping
    text -> id, which fixes each id (an id not in ``vocab`` is added to it;
    one holding other bytes is an error): that is how files with their own
    numbering load. When overlapping special tokens could match at one place,
    the longest wins. Without special tokens, a string such as
    ``"<|endoftext|>"`` is encoded as ordinary text.

    Keyword-only settings, for tokenizers of the Llama family:

    * ``pretokenizer``: the name of a preset of
      :mod:`scratchlm.tokenizer.pretokenizers` (``"gpt2"``, ``"llama3"``,
      ``"gpt2-digits"``, ``"qwen2"``); GPT-2's regex by default.
    * ``ignore_merges``: a pre-token whose bytes are a token of the vocabulary
      becomes that one token without merging (Hugging Face's BPE option of
      that name; Llama 3 sets it, since its vocabulary holds tokens that its
      merges never build).
    * ``bos_token``, ``eos_token``: the text or id of the begin and end of
      sequence tokens, kept as ``bos_id`` and ``eos_id`` (None when unset).
    * ``add_bos``: whether a model expects ``bos_id`` before every prompt.
      :meth:`encode` adds it only with ``add_special_tokens=True``; generation adds it.
    * ``add_eos``: whether ``eos_id`` ends every encoded text (HF's
      ``add_eos_token``); added by ``encode(text, add_special_tokens=True)``.
    * ``pad_token``: the text or id of the padding token, kept as ``pad_id``
      (None when unset); nothing here pads, it is for batching callers.
    * ``nonspecial_tokens``: those of ``special_tokens`` that are added tokens
      HF marks ``special: false`` (GGUF: user-defined): kept whole like the
      others, but kept by ``decode(ids, skip_special_tokens=True)``.
    * ``merge_ranks``: with ``metaspace`` only, each merge's rank, non-decreasing
      along ``merges``; merges of equal rank tie, and the leftmost pair among
      them merges first (llama.cpp's SentencePiece rule for equal scores; GGUF
      ``llama`` vocabularies with tied scores). None (the default): rank = position.
    * ``lstrip_tokens``, ``rstrip_tokens``: those of ``special_tokens`` that
      take with them (and so drop) all the whitespace before / after them (HF's
      added-token ``lstrip``/``rstrip``; whitespace as Unicode's White_Space).
    * ``unk_token`` (text or id, kept as ``unk_id``) and ``fuse_unk``: what a
      byte missing from the vocabulary becomes, as above (HF's BPE options of
      those names).
    * ``normalizer``: ``"nfc"`` puts the text between special tokens in
      Unicode NFC before pre-tokenizing (HF's ``NFC`` normalizer; Qwen2), so
      ``"e\\u0301"`` encodes as ``"\\xe9"``; None (the default) leaves it as is.

    SentencePiece-style BPE (Llama 2, TinyLlama, Mistral, Gemma; rules in
    :mod:`scratchlm.tokenizer.sentencepiece`): the vocabulary holds each
    token's text in UTF-8 as the file spells it (``"\u2581the"``, ``"<0x41>"``),
    merges start from characters, and these keywords choose the steps:

    * ``metaspace``: None (the default) for byte-level BPE; else how a space
      becomes ``"\u2581"`` and when one is put first in each text between
      special tokens: ``"prepend"`` (always: HF's Prepend normalizer, Llama 2
      legacy files), ``"always"`` (unless the text starts with a space),
      ``"first"`` (the same, only at the start of the whole text: Mistral),
      ``"never"`` (Gemma).
    * ``metaspace_split``: cut words before every ``"\u2581"`` (HF's Metaspace
      ``split=true``); only with ``"always"``, ``"first"`` or ``"never"``.
    * ``byte_fallback``: a character without a token becomes the ``<0xNN>``
      tokens of its UTF-8 bytes (when all are in ``vocab``), else ``unk_token``.
    * ``decoder``: ``"sentencepiece-strip"`` (``"\u2581"`` -> space, byte tokens
      -> bytes, one leading space dropped: Llama 2, Mistral; the default
      unless ``metaspace="never"``), ``"sentencepiece"`` (no strip: Gemma,
      the default with ``"never"``) or ``"metaspace"`` (HF's Metaspace decoder).

    ``pretokenizer`` and ``normalizer`` are not used with ``metaspace``.

    Reading and writing files (:meth:`save`, :meth:`load`, :meth:`from_hf`,
    :meth:`from_gguf`, ...) is in :class:`~scratchlm.tokenizer.tokenizer_files.TokenizerFiles`.
    """

    def __init__(
        self,
        vocab: dict[int, bytes],
        merges: Sequence[tuple[bytes, bytes]],
        special_tokens: Sequence[str] | Mapping[str, int] | None = None,
        *,
        pretokenizer: str = DEFAULT_PRETOKENIZER,
        ignore_merges: bool = False,
        bos_token: str | int | None = None,
        eos_token: str | int | None = None,
        add_bos: bool = False,
        unk_token: str | int | None = None,
        fuse_unk: bool = False,
        normalizer: str | None = None,
        add_eos: bool = False,
        pad_token: str | int | None = None,
        nonspecial_tokens: Sequence[str] = (),
        lstrip_tokens: Sequence[str] = (),
        rstrip_tokens: Sequence[str] = (),
        merge_ranks: Sequence[int] | None = None,
        metaspace: str | None = None,
        metaspace_split: bool = False,
        byte_fallback: bool = False,
        decoder: str | None = None,
    ):
        self.vocab: dict[int, bytes] = {}
        for token_id, token in vocab.items():
            if not isinstance(token_id, int) or token_id < 0 or not isinstance(token, bytes):
                raise ValueError(f"vocab must map non-negative int ids to bytes, got {token_id!r}: {token!r}")
            self.vocab[token_id] = token
        if special_tokens is not None and not isinstance(special_tokens, Mapping):
            # A str is iterable too, but each of its characters becoming a special token is never meant.
            if isinstance(special_tokens, (str, bytes)) or not isinstance(special_tokens, Iterable):
                raise ValueError(
                    f"special_tokens must be a list of strings, a mapping text -> id, or None; got {special_tokens!r}"
                )
            special_tokens = list(special_tokens)
        fixed_special_ids = self._add_fixed_special_ids(special_tokens) if isinstance(special_tokens, Mapping) else {}
        self._token_ids: dict[bytes, int] = {}
        for token_id in sorted(self.vocab):
            # If a token appears twice, the lower id encodes it.
            self._token_ids.setdefault(self.vocab[token_id], token_id)
        # Byte value -> its id (GPT-2's files number the bytes differently from
        # 0..255), or _MISSING_BYTE for a byte the vocabulary lacks.
        self._byte_ids: list[int] = [self._token_ids.get(bytes([b]), _MISSING_BYTE) for b in range(256)]
        self.missing_bytes: tuple[int, ...] = tuple(b for b in range(256) if self._byte_ids[b] == _MISSING_BYTE)

        # (left id, right id) -> (rank, merged id): what encoding consults.
        self.merges: list[tuple[bytes, bytes]] = []
        self._merge_ranks: dict[tuple[int, int], tuple[int, int]] = {}
        merges = list(merges)
        self.merge_ranks: list[int] | None = _checked_merge_ranks(merge_ranks, len(merges), metaspace)
        for rank, (left, right) in enumerate(merges):
            ids = (self._token_ids.get(left), self._token_ids.get(right), self._token_ids.get(left + right))
            if None in ids:
                raise ValueError(
                    f"merges[{rank}] = {(left, right)!r} needs {left!r}, {right!r} and {left + right!r} in vocab"
                )
            self.merges.append((left, right))
            shared_rank = rank if self.merge_ranks is None else self.merge_ranks[rank]
            self._merge_ranks.setdefault((ids[0], ids[1]), (shared_rank, ids[2]))

        self.special_token_ids: dict[str, int] = fixed_special_ids
        if not isinstance(special_tokens, Mapping):
            for token in special_tokens or ():
                if not isinstance(token, str) or not token:
                    raise ValueError(f"special_tokens must hold non-empty strings, got {token!r}")
                encoded = token.encode("utf-8")
                if encoded not in self._token_ids:
                    new_id = max(self.vocab) + 1
                    self.vocab[new_id] = encoded
                    self._token_ids[encoded] = new_id
                self.special_token_ids[token] = self._token_ids[encoded]
        self.special_tokens: list[str] = list(self.special_token_ids)
        self.nonspecial_tokens: tuple[str, ...] = self._special_subset("nonspecial_tokens", nonspecial_tokens)
        self.lstrip_tokens: tuple[str, ...] = self._special_subset("lstrip_tokens", lstrip_tokens)
        self.rstrip_tokens: tuple[str, ...] = self._special_subset("rstrip_tokens", rstrip_tokens)
        self._special_regex = (
            special_token_regex(self.special_tokens)
            if not (self.lstrip_tokens or self.rstrip_tokens)
            else _stripping_special_regex(self.special_tokens, self.lstrip_tokens, self.rstrip_tokens)
        )

        self._pretokenizer: PreTokenizer = get_pretokenizer(pretokenizer)
        if not isinstance(ignore_merges, bool):
            raise ValueError(f"ignore_merges must be a bool, got {ignore_merges!r}")
        self.ignore_merges = ignore_merges
        self.bos_id: int | None = self._resolve_token("bos_token", bos_token)
        self.eos_id: int | None = self._resolve_token("eos_token", eos_token)
        if not isinstance(add_bos, bool):
            raise ValueError(f"add_bos must be a bool, got {add_bos!r}")
        if add_bos and self.bos_id is None:
            raise ValueError("add_bos=True needs a bos_token")
        self.add_bos = add_bos
        if not isinstance(add_eos, bool):
            raise ValueError(f"add_eos must be a bool, got {add_eos!r}")
        if add_eos and self.eos_id is None:
            raise ValueError("add_eos=True needs an eos_token")
        self.add_eos = add_eos
        self.pad_id: int | None = self._resolve_token("pad_token", pad_token)
        self.unk_id: int | None = self._resolve_token("unk_token", unk_token)
        if not isinstance(fuse_unk, bool):
            raise ValueError(f"fuse_unk must be a bool, got {fuse_unk!r}")
        self.fuse_unk = fuse_unk
        if normalizer not in _NORMALIZERS:
            raise ValueError(f"normalizer must be one of {_NORMALIZERS}, got {normalizer!r}")
        self.normalizer: str | None = normalizer
        self.decoder: str | None = check_sentencepiece_settings(
            metaspace, metaspace_split, byte_fallback, decoder, pretokenizer=self.pretokenizer, normalizer=normalizer
        )
        self.metaspace: str | None = metaspace
        self.metaspace_split: bool = metaspace_split
        self.byte_fallback: bool = byte_fallback
        # The SentencePiece steps (None: byte-level BPE).
        self._sentencepiece: SentencePieceBPE | None = None
        if metaspace is not None:
            self._sentencepiece = SentencePieceBPE(
                self.vocab, self._token_ids, self.merges, self._merge_ranks,
                metaspace=metaspace, split=metaspace_split, byte_fallback=byte_fallback, decoder=self.decoder,
                unk_id=self.unk_id, fuse_unk=fuse_unk, ignore_merges=ignore_merges,
            )

        self._cache: dict[str, tuple[int, ...]] = {}
        self._batch_merger: BatchMerger | None = None  # built on first use (~20 ms for GPT-2)

    def _special_subset(self, name: str, tokens: Sequence[str]) -> tuple[str, ...]:
        """``tokens`` checked to be special tokens' texts, without repeats."""
        if isinstance(tokens, (str, bytes)) or not isinstance(tokens, Iterable):
            raise ValueError(f"{name} must be a list of special_tokens' texts, got {tokens!r}")
        subset = tuple(dict.fromkeys(tokens))
        for token in subset:
            if token not in self.special_token_ids:
                raise ValueError(f"{name} holds {token!r}, which is not one of special_tokens")
        return subset

    def _special_id(self, match: str) -> int:
        """The id of a special-token match, which may hold the whitespace an lstrip/rstrip token takes with it."""
        token_id = self.special_token_ids.get(match)
        if token_id is not None:
            return token_id
        left = len(match) - len(match.lstrip(_WHITE_SPACE))
        right = len(match) - len(match.rstrip(_WHITE_SPACE))
        for start, end in ((left, len(match)), (0, len(match) - right), (left, len(match) - right)):
            token = match[start:end]
            stripped_as_flagged = (start == 0 or token in self.lstrip_tokens) and (
                end == len(match) or token in self.rstrip_tokens
            )
            if token in self.special_token_ids and stripped_as_flagged:
                return self.special_token_ids[token]
        raise AssertionError(f"the special-token regex matched {match!r}, which is no special token")

    def _add_fixed_special_ids(self, special_tokens: Mapping[str, int]) -> dict[str, int]:
        """Check special tokens given as text -> id, adding to ``vocab`` the ids it lacks."""
        fixed: dict[str, int] = {}
        for token, token_id in special_tokens.items():
            if not isinstance(token, str) or not token:
                raise ValueError(f"special_tokens must have non-empty strings as keys, got {token!r}")
            if not isinstance(token_id, int) or isinstance(token_id, bool) or token_id < 0:
                raise ValueError(f"special_tokens[{token!r}] must be a non-negative int id, got {token_id!r}")
            encoded = token.encode("utf-8")
            held = self.vocab.setdefault(token_id, encoded)
            if held != encoded:
                raise ValueError(
                    f"special_tokens[{token!r}] = {token_id}, but vocab[{token_id}] is {held!r}, another token"
                )
            fixed[token] = token_id
        return fixed

    def _resolve_token(self, name: str, token: str | int | None) -> int | None:
        """The id of a bos/eos token given as its text (a special token or in vocab) or its id."""
        if token is None:
            return None
        if isinstance(token, int) and not isinstance(token, bool):
            if token not in self.vocab:
                raise ValueError(f"{name}={token} is not an id of the vocabulary (ids are 0..{self.vocab_size - 1})")
            return token
        if isinstance(token, str) and token:
            found = self.special_token_ids.get(token, self._token_ids.get(token.encode("utf-8")))
            if found is None:
                raise ValueError(f"{name}={token!r} is neither a special token nor a token of the vocabulary")
            return found
        raise ValueError(f"{name} must be a token's text, its id, or None; got {token!r}")

    @property
    def pretokenizer(self) -> str:
        """The name of the pre-tokenizer preset (see :mod:`scratchlm.tokenizer.pretokenizers`)."""
        return self._pretokenizer.name

    @property
    def vocab_size(self) -> int:
        """One more than the largest id: the size an embedding table needs."""
        return max(self.vocab) + 1

    # ----------------------------------------------------------------- encode

    def _merge_pretoken(self, piece: str) -> tuple[int, ...]:
        """BPE on one pre-token, from its bytes (rule in :mod:`scratchlm.tokenizer.apply_merges`).

        With ``ignore_merges``, a pre-token that is a token of the vocabulary
        is that token. Every encode path (the cache, the batch, streams and
        file workers) gets its ids from here or from :meth:`_batch_merge_missing`.
        """
        encoded = piece.encode("utf-8")
        if self.ignore_merges:
            # HF looks the piece up in its model's vocabulary, and so does this
            # in all of it: a special token is split off before pre-tokenizing,
            # so no piece ever holds one.
            whole = self._token_ids.get(encoded)
            if whole is not None:
                return (whole,)
        ids = [self._byte_ids[b] for b in encoded]
        if self.missing_bytes and _MISSING_BYTE in ids:
            ids = self._replace_missing_bytes(ids)
        return merge_ids(ids, self._merge_ranks)

    def _replace_missing_bytes(self, ids: list[int]) -> list[int]:
        """``ids`` with each missing byte made the unk token (a run of them one, with ``fuse_unk``) or dropped.

        >>> vocab = {0: b"a", 1: b"b", 2: b"ab", 3: b"<unk>"}
        >>> Tokenizer(vocab, [(b"a", b"b")]).encode("a\u00e9b")  # b"a\xc3\xa9b": dropped, then a and b merge
        [2]
        >>> Tokenizer(vocab, [(b"a", b"b")], unk_token="<unk>", fuse_unk=True).encode("a\u00e9b")
        [0, 3, 1]
        """
        kept: list[int] = []
        after_missing = False
        for token_id in ids:
            if token_id != _MISSING_BYTE:
                kept.append(token_id)
                after_missing = False
                continue
            if self.unk_id is not None and not (self.fuse_unk and after_missing):
                kept.append(self.unk_id)
            after_missing = True
        return kept

    def _batch_merge_missing(self, pieces: list[str]) -> None:
        """Merge every distinct pre-token of ``pieces`` not yet cached, in one batch, if they fit the cache."""
        cache = self._cache
        distinct = set(pieces)
        if len(distinct) > _CACHE_MAX_ENTRIES:
            return  # the main loop merges them one by one, emptying the cache as it fills
        missing = distinct.difference(cache)
        if len(missing) < _BATCH_MIN_MISSES:
            return
        if len(cache) + len(missing) > _CACHE_MAX_ENTRIES:
            cache.clear()
            missing = distinct
        short, encoded = [], []
        whole_ids = self._token_ids if self.ignore_merges else None
        # Pieces holding a byte the vocabulary lacks are left to the main loop.
        absent = bytes(self.missing_bytes)
        for piece in missing:
            data = piece.encode("utf-8")
            if whole_ids is not None and data in whole_ids:
                cache[piece] = (whole_ids[data],)
            elif len(data) <= _BATCH_MAX_BYTES and not (absent and len(data.translate(None, absent)) < len(data)):
                short.append(piece)
                encoded.append(data)
        if self._batch_merger is None:
            # A missing byte never reaches the batch; any id stands in for it.
            byte_ids = [0 if token_id == _MISSING_BYTE else token_id for token_id in self._byte_ids]
            self._batch_merger = BatchMerger(self._merge_ranks, byte_ids)
        for piece, ids in zip(short, self._batch_merger.merge(encoded)):
            cache[piece] = tuple(ids)

    def _encode_ordinary(self, text: str, out: list[int]) -> None:
        """Append the ids of ``text`` (no special tokens in it) to ``out``."""
        pieces = self._pretokenizer.regex.findall(text)
        cache = self._cache
        if len(pieces) >= _BATCH_MIN_PIECES and self.vocab_size <= MAX_ID:
            sample_misses = sum(1 for piece in pieces[:_SAMPLE_PIECES] if piece not in cache)
            if sample_misses >= _SAMPLE_MIN_MISSES:
                self._batch_merge_missing(pieces)
        # Bound methods held in locals: this loop runs once per pre-token
        # (~2.5M times for 11 MB), where each attribute lookup saved counts.
        cached, extend = cache.get, out.extend
        for piece in pieces:
            ids = cached(piece)
            if ids is None:
                ids = self._merge_pretoken(piece)
                if len(cache) >= _CACHE_MAX_ENTRIES:
                    cache.clear()
                cache[piece] = ids
            extend(ids)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``: special tokens by their ids.

        Nothing is added unless ``add_special_tokens`` is True; then ``bos_id``
        comes first when ``add_bos`` and ``eos_id`` last when ``add_eos``, as
        HF's ``encode`` does with the file's post-processor.

        >>> Tokenizer({i: bytes([i]) for i in range(256)}, []).encode("hi")
        [104, 105]
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if not isinstance(add_special_tokens, bool):
            raise ValueError(f"add_special_tokens must be a bool, got {add_special_tokens!r}")
        ids = self._encode(text)
        if add_special_tokens:
            if self.add_bos:
                ids.insert(0, self.bos_id)
            if self.add_eos:
                ids.append(self.eos_id)
        return ids

    def _encode(self, text: str, continuing: bool = False) -> list[int]:
        """:meth:`encode`; ``continuing``: ``text`` goes on a segment cut by a stream (SentencePiece only)."""
        ids: list[int] = []
        parts = split_on_special_tokens(text, self._special_regex)
        sentencepiece = self._sentencepiece
        try:
            for index, part in enumerate(parts):
                if index % 2:  # odd positions hold the special tokens themselves
                    ids.append(self._special_id(part))
                elif not part:
                    continue
                elif sentencepiece is not None:
                    at_start = index == 0
                    sentencepiece.encode_segment(
                        part, ids, at_text_start=at_start and not continuing, continuing=at_start and continuing
                    )
                else:
                    # Only the text between special tokens is normalized, as HF
                    # does for added tokens with "normalized": false.
                    self._encode_ordinary(unicodedata.normalize("NFC", part) if self.normalizer else part, ids)
        except UnicodeEncodeError as error:
            # Raised for one pre-token; say where in the whole text the unencodable character is.
            position = next(i for i, char in enumerate(text) if char == error.object[error.start])
            raise UnicodeEncodeError(error.encoding, text, position, position + 1, error.reason) from None
        return ids

    def encode_iterable(self, iterable: Iterable[str]) -> Iterator[int]:
        """Lazily encode an iterable of strings (e.g. an open text file).

        Yields exactly ``encode("".join(iterable))`` while holding only a
        bounded window of text: pieces are gathered until 64K characters, then
        encoded up to the last safe cut of the pre-tokenizer (see
        :func:`scratchlm.tokenizer.pretokenize.is_safe_cut`), and the rest is
        kept for the next round. A pre-token or special token split across two
        strings is therefore never cut. Memory grows beyond the window only
        for a long stretch of text with no cut candidate (for GPT-2's rule, no
        whitespace followed by a non-space; Llama 3's also cuts after line breaks).

        >>> with open("corpus.txt") as f:  # doctest: +SKIP
        ...     ids = list(tokenizer.encode_iterable(f))
        """
        # With NFC the cut rules stay exact, since every cut they allow is
        # also a place where NFC(whole) = NFC(first half) + NFC(second half):
        # a cut falls before a whitespace character or right after CR or LF.
        # Those are starters (combining class 0) that no canonical
        # composition takes as first or second character, so nothing before
        # the cut can reorder or compose with anything after it. NFC also
        # keeps what the rules read: whitespace stays whitespace (U+2000 and
        # U+2001 become U+2002 and U+2003), no other character decomposes to
        # one, CR and LF are unchanged, and no non-digit becomes a digit (the
        # gpt2-digits rule); so the rule holds at the same cut of the
        # normalized text. tests/tokenizer/test_qwen2.py checks these
        # facts over all code points, and the streaming with combining marks.
        pending: list[str] = []
        pending_chars = 0
        carried = ""
        # Cut candidates in the carried text were already tried, except the
        # last few, whose look-ahead was incomplete.
        recheck_chars = max((len(token) for token in self.special_tokens), default=0) + 2
        # SentencePiece cuts fall inside a segment, whose rest gets no ▁ put first.
        continuing = False
        for chunk in iterable:
            if not isinstance(chunk, str):
                raise TypeError(f"encode_iterable expects strings, got {type(chunk).__name__}")
            pending.append(chunk)
            pending_chars += len(chunk)
            if pending_chars < _STREAM_MIN_CHARS:
                continue
            # Joining here costs O(window), once per window, never quadratic.
            search_from = max(0, len(carried) - recheck_chars)
            text = carried + "".join(pending)
            pending, pending_chars = [], 0
            if self._sentencepiece is None:
                cut = last_safe_cut(text, self.special_tokens, search_from, self._pretokenizer)
            else:
                cut = self._sentencepiece.last_stream_cut(text, self.special_tokens, search_from)
            if cut and not self._cut_keeps_stripped_space(text, cut):
                cut = 0  # a later round finds a later cut
            if cut == 0:
                carried = text
                continue
            yield from self._encode(text[:cut], continuing)
            carried, continuing = text[cut:], self._sentencepiece is not None
        yield from self._encode(carried + "".join(pending), continuing)

    def _cut_keeps_stripped_space(self, text: str, cut: int) -> bool:
        """Whether cutting ``text`` at ``cut`` leaves whole the whitespace an lstrip/rstrip token would take."""
        if not (self.lstrip_tokens or self.rstrip_tokens):
            return True
        start = end = cut
        while start > 0 and text[start - 1] in _WHITE_SPACE:
            start -= 1
        while end < len(text) and text[end] in _WHITE_SPACE:
            end += 1
        if start == end:
            return True
        if end == len(text):  # what follows the whitespace is not known yet
            return False
        return not (
            any(text.startswith(token, end) for token in self.lstrip_tokens)
            or any(text.endswith(token, 0, start) for token in self.rstrip_tokens)
        )

    # ----------------------------------------------------------------- decode

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes of the tokens ``ids``, concatenated.

        With SentencePiece-style BPE, each token's decoded bytes (``▁`` as a
        space, a byte token as its byte), with no leading space stripped:
        :meth:`decode` strips it where the file's decoder does.

        >>> Tokenizer({i: bytes([i]) for i in range(256)}, []).decode_bytes([104, 105])
        b'hi'
        """
        ids = self._id_sequence(ids)
        if self._sentencepiece is not None:
            return self._sentencepiece.decode_bytes(self._checked_ids(ids))
        vocab = self.vocab
        try:
            return b"".join([vocab[token_id] for token_id in ids])
        except (KeyError, TypeError):
            raise self._bad_id_error(ids) from None

    @staticmethod
    def _id_sequence(ids: Iterable[int]) -> list[int] | tuple[int, ...]:
        """``ids`` as a list or tuple (a tensor or array becomes a list of Python ints)."""
        if hasattr(ids, "tolist"):  # a torch tensor or numpy array: its elements as Python ints
            ids = ids.tolist()
            if not isinstance(ids, list):
                raise ValueError(f"ids must be one-dimensional; got a single id {ids!r} (wrap it in a list)")
        elif not isinstance(ids, (list, tuple)):
            ids = list(ids)  # an iterator would be used up before an error could name the bad id
        return ids

    def _checked_ids(self, ids: list[int] | tuple[int, ...]) -> list[int] | tuple[int, ...]:
        """``ids`` unchanged if all are ids of the vocabulary; else a ValueError names the first bad one."""
        vocab = self.vocab
        try:
            if all([token_id in vocab for token_id in ids]):
                return ids
        except TypeError:  # an unhashable element
            pass
        raise self._bad_id_error(ids)

    def _bad_id_error(self, ids: list | tuple) -> ValueError:
        """The error naming the first element of ``ids`` that is not an id of the vocabulary."""
        vocab = self.vocab
        bad = next(i for i in ids if not (isinstance(i, (int, np.integer)) and i in vocab))
        if isinstance(bad, (int, np.integer)) and not isinstance(bad, bool):
            return ValueError(f"token id {bad!r} is not in the vocabulary (ids are 0..{self.vocab_size - 1})")
        return ValueError(f"ids must be a flat sequence of ints; got {bad!r} ({type(bad).__name__})")

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of the tokens ``ids``; bytes that are not valid UTF-8 become U+FFFD.

        A token can hold part of a character (the first byte of "é"), so a
        slice of ids may not decode cleanly; it is replaced, never an error.
        ``skip_special_tokens``: drop the ids of special tokens (but not of
        ``nonspecial_tokens``) and bos, eos and pad first (HF's option of that
        name; ids are still checked).

        >>> Tokenizer({i: bytes([i]) for i in range(256)}, []).decode([104, 0xC3])
        'h\\ufffd'
        """
        if not isinstance(skip_special_tokens, bool):
            raise ValueError(f"skip_special_tokens must be a bool, got {skip_special_tokens!r}")
        if skip_special_tokens:
            ids = self._checked_ids(self._id_sequence(ids))
            kept = {self.special_token_ids[token] for token in self.nonspecial_tokens}
            skipped = (set(self.special_token_ids.values()) - kept) | {self.bos_id, self.eos_id, self.pad_id}
            ids = [token_id for token_id in ids if token_id not in skipped]
        if self._sentencepiece is not None:
            return self._sentencepiece.decode(self._checked_ids(self._id_sequence(ids)))
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        specials = repr(self.special_tokens)
        if len(self.special_tokens) > _REPR_MAX_SPECIAL_TOKENS:  # Llama 3 has 256
            shown = ", ".join(map(repr, self.special_tokens[:_REPR_MAX_SPECIAL_TOKENS]))
            specials = f"[{shown}, ...] ({len(self.special_tokens)} in all)"
        settings = "" if self.pretokenizer == DEFAULT_PRETOKENIZER else f", pretokenizer={self.pretokenizer!r}"
        for name, value in self._sentencepiece_settings().items():  # in TokenizerFiles
            settings += f", {name}={value!r}"
        settings += ", ignore_merges=True" if self.ignore_merges else ""
        settings += f", normalizer={self.normalizer!r}" if self.normalizer else ""
        if self.missing_bytes and self._sentencepiece is None:
            settings += f", missing_bytes={len(self.missing_bytes)}"
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, "
            f"special_tokens={specials}{settings})"
        )


def _stripping_special_regex(
    special_tokens: Sequence[str], lstrip_tokens: Sequence[str], rstrip_tokens: Sequence[str]
) -> regex.Pattern:
    """:func:`special_token_regex` where an lstrip/rstrip token's match takes the whitespace before/after it."""
    space = "[" + regex.escape(_WHITE_SPACE) + "]*"
    ordered = sorted(set(special_tokens), key=lambda token: (-len(token), token))
    alternatives = [
        (space if token in lstrip_tokens else "") + regex.escape(token) + (space if token in rstrip_tokens else "")
        for token in ordered
    ]
    return regex.compile("(" + "|".join(alternatives) + ")")


def _checked_merge_ranks(merge_ranks: Sequence[int] | None, count: int, metaspace: str | None) -> list[int] | None:
    """``merge_ranks`` as a list, checked (None stays None); see the ``Tokenizer`` docstring."""
    if merge_ranks is None:
        return None
    if metaspace is None:
        raise ValueError("merge_ranks is only supported with SentencePiece-style BPE (metaspace set)")
    if isinstance(merge_ranks, (str, bytes)) or not isinstance(merge_ranks, Iterable):
        raise ValueError(f"merge_ranks must be a list of ints, got {merge_ranks!r}")
    ranks = list(merge_ranks)
    if len(ranks) != count:
        raise ValueError(f"merge_ranks must hold one rank per merge ({count}), got {len(ranks)}")
    for index, rank in enumerate(ranks):
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
            raise ValueError(f"merge_ranks[{index}] must be a non-negative int, got {rank!r}")
        if index and rank < ranks[index - 1]:
            raise ValueError(f"merge_ranks must not decrease along merges, but merge_ranks[{index}] = {rank} < "
                             f"merge_ranks[{index - 1}] = {ranks[index - 1]}")
    return ranks
