"""SentencePiece-style BPE: merges over characters, with ``▁`` for spaces and ``<0xNN>`` byte tokens.

Llama 2, TinyLlama, Mistral 7B and Gemma ship a BPE that is not byte-level:
its symbols are Unicode characters, a space is written ``▁`` (U+2581, the
"metaspace"), and a character the vocabulary lacks becomes the tokens
``<0xNN>`` of its UTF-8 bytes ("byte fallback"). A :class:`~scratchlm.tokenizer.tokenizer.Tokenizer`
built with ``metaspace=...`` encodes this way; its vocabulary still maps
id -> bytes, each token's bytes being its text exactly as the file spells it
(``"▁the"``, ``"<0x41>"``), so merges and ranks work as in byte-level BPE.

Encoding the text between two special tokens (a *segment*), as HF ``tokenizers`` does:

1. Word boundaries. Spaces become ``▁``, and a ``▁`` may be put first, by
   ``metaspace``:

   ============  ==================================================================
   ``prepend``   always, even before a leading space (HF's normalizer
                 ``Sequence[Prepend("▁"), Replace(" ", "▁")]``: Llama 2 "legacy")
   ``always``    unless the segment already starts with ``▁`` (HF's Metaspace
                 pre-tokenizer, ``prepend_scheme="always"``)
   ``first``     the same, only for the segment at the very start of the text
                 (``prepend_scheme="first"``: Mistral, non-legacy Llama)
   ``never``     never (``prepend_scheme="never"``; Gemma's ``Replace(" ", "▁")``)
   ============  ==================================================================

   >>> to_metaspace(" hi there", "prepend", at_text_start=True)
   '▁▁hi▁there'
   >>> to_metaspace(" hi there", "always", at_text_start=True)
   '▁hi▁there'

2. Words. With ``metaspace_split`` the segment is cut before every ``▁``
   (``"▁hi▁▁x"`` -> ``"▁hi"``, ``"▁"``, ``"▁x"``), else it is one word.
3. Symbols. Each character of a word is its token if it has one; else, with
   ``byte_fallback``, the ``<0xNN>`` tokens of its UTF-8 bytes if the
   vocabulary holds all of them; else the unk token (one for a run of such
   characters with ``fuse_unk``), or nothing without one. HF keeps a pending
   unk until the next character that is a token, so byte-fallback tokens of
   the characters in between come *before* it; that order is reproduced.
4. Merges by rank, as in byte-level BPE
   (:func:`~scratchlm.tokenizer.apply_merges.merge_by_rank`).

Decoding maps each token to text: ``▁`` -> space and ``<0xNN>`` -> that byte
(a run of byte tokens that is not valid UTF-8 gives one U+FFFD per token, as
HF's ByteFallback decoder does), then ``decoder="sentencepiece-strip"`` drops
one leading space (HF's ``Strip(" ", 1, 0)``). ``decoder="metaspace"`` is HF's
Metaspace decoder instead: byte tokens stay text, and the ``▁`` of the first
token are dropped (all of them) unless ``metaspace="never"``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from scratchlm.tokenizer.apply_merges import merge_ids
from scratchlm.tokenizer.pretokenizers import DEFAULT_PRETOKENIZER

METASPACE = "\u2581"
METASPACE_SCHEMES = ("prepend", "always", "first", "never")
SENTENCEPIECE_DECODERS = ("sentencepiece", "sentencepiece-strip", "metaspace")
# The token text HF's ByteFallback decoder reads as one byte: two hex digits,
# or a sign and one (Rust's from_str_radix accepts "+A").
_BYTE_TOKEN = re.compile(r"<0x(?:[0-9A-Fa-f]{2}|\+[0-9A-Fa-f])>")
# Without metaspace_split a segment is one word; it is still cut into these
# pieces (a run of ▁, then a run of other characters) when that is exact,
# see SentencePieceBPE.cuts_before_spaces.
_PIECES = re.compile(f"{METASPACE}*[^{METASPACE}]+|{METASPACE}+")
# With metaspace_split, HF's words: cut before every ▁.
_SPLIT_WORDS = re.compile(f"{METASPACE}[^{METASPACE}]*|[^{METASPACE}]+")
# A token holding ▁ right after another character joins across a piece cut.
_JOINS_ACROSS_CUT = re.compile(f"[^{METASPACE}]{METASPACE}")
# Files are scanned for stream cuts in windows of this many bytes.
_SCAN_WINDOW_BYTES = 1 << 16
# Pieces cached (bounded like the byte-level cache).
_CACHE_MAX_ENTRIES = 1 << 17


def byte_token(byte: int) -> str:
    """The text of the byte-fallback token of ``byte``.

    >>> byte_token(10)
    '<0x0A>'
    """
    return f"<0x{byte:02X}>"


def check_sentencepiece_settings(
    metaspace: str | None, split: bool, byte_fallback: bool, decoder: str | None, *, pretokenizer: str,
    normalizer: str | None,
) -> str | None:
    """Check the ``Tokenizer`` keywords of SentencePiece-style BPE; return the decoder (None for byte-level).

    Without ``decoder``, the one a scheme's files use: strip the ``▁`` it may
    prepend, unless it never prepends.
    """
    for name, value in (("metaspace_split", split), ("byte_fallback", byte_fallback)):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be a bool, got {value!r}")
    if metaspace is None:
        for name, value, unset in (("metaspace_split", split, False), ("byte_fallback", byte_fallback, False),
                                   ("decoder", decoder, None)):
            if value != unset:
                raise ValueError(f"{name}={value!r} needs metaspace (SentencePiece-style BPE); got metaspace=None")
        return None
    if metaspace not in METASPACE_SCHEMES:
        raise ValueError(f"metaspace must be None or one of {METASPACE_SCHEMES}, got {metaspace!r}")
    if split and metaspace == "prepend":
        raise ValueError("metaspace_split=True needs metaspace 'always', 'first' or 'never', got 'prepend'")
    if decoder is None:
        decoder = "sentencepiece" if metaspace == "never" else "sentencepiece-strip"
    if decoder not in SENTENCEPIECE_DECODERS:
        raise ValueError(f"decoder must be None or one of {SENTENCEPIECE_DECODERS}, got {decoder!r}")
    if pretokenizer != DEFAULT_PRETOKENIZER or normalizer is not None:
        raise ValueError(
            f"metaspace={metaspace!r} splits text itself; expected the default pretokenizer and normalizer=None, "
            f"got pretokenizer={pretokenizer!r}, normalizer={normalizer!r}"
        )
    return decoder


def to_metaspace(segment: str, metaspace: str, *, at_text_start: bool, continuing: bool = False) -> str:
    """The segment with spaces as ``▁`` and, per ``metaspace``, one ``▁`` put first (step 1 above).

    ``continuing`` marks the rest of a segment cut by a stream (never prepended).
    """
    form = segment.replace(" ", METASPACE)
    if continuing or metaspace == "never":
        return form
    if metaspace == "prepend":
        return METASPACE + form
    if form.startswith(METASPACE) or (metaspace == "first" and not at_text_start):
        return form
    return METASPACE + form


class SentencePieceBPE:
    """The encoding and decoding steps of SentencePiece-style BPE for one vocabulary (see the module docstring).

    ``token_ids`` maps token bytes to ids (the model's vocabulary), and
    ``merge_ranks`` (left id, right id) -> (rank, merged id), both as
    :class:`~scratchlm.tokenizer.tokenizer.Tokenizer` builds them.
    """

    def __init__(
        self,
        vocab: dict[int, bytes],
        token_ids: dict[bytes, int],
        merges: Sequence[tuple[bytes, bytes]],
        merge_ranks: dict[tuple[int, int], tuple[int, int]],
        *,
        metaspace: str,
        split: bool,
        byte_fallback: bool,
        decoder: str,
        unk_id: int | None,
        fuse_unk: bool,
        ignore_merges: bool,
    ):
        self.metaspace, self.split, self.decoder, self.byte_fallback = metaspace, split, decoder, byte_fallback
        self.unk_id, self.fuse_unk, self.ignore_merges = unk_id, fuse_unk, ignore_merges
        self._token_ids = token_ids
        self._merge_ranks = merge_ranks
        # Byte -> its <0xNN> token id, or None; all None without byte_fallback.
        self._fallback_ids = [token_ids.get(byte_token(b).encode()) if byte_fallback else None for b in range(256)]
        # Cutting a word before a ▁ that follows another character changes
        # nothing when (a) no merge makes a token with ▁ after another
        # character: then no merge ever joins the symbols on the two sides,
        # and merges on one side never depend on the other (a pair never
        # straddles the cut); and (b) ▁ is a token, so a pending unk before
        # the cut is emitted at the ▁ in the whole word just as at the end of
        # the piece. By induction a merge result has ▁ after another
        # character only if some merge puts one there, so checking results suffices.
        self.cuts_before_spaces = METASPACE.encode() in token_ids and not any(
            _JOINS_ACROSS_CUT.search((left + right).decode("utf-8", "replace")) for left, right in merges
        )
        self._stream_cut = self.stream_cut_pattern()
        self._cache: dict[str, tuple[int, ...]] = {}
        self._vocab = vocab
        self._outputs = [self._output(token_id) for token_id in range(max(vocab) + 1)] if vocab else []

    # ------------------------------------------------------------- encode

    def encode_segment(self, segment: str, out: list[int], *, at_text_start: bool, continuing: bool = False) -> None:
        """Append the ids of one segment (text between special tokens, not empty) to ``out``."""
        form = to_metaspace(segment, self.metaspace, at_text_start=at_text_start, continuing=continuing)
        if self.split:
            words = _SPLIT_WORDS.findall(form)
        else:
            # The segment is HF's one word: ignore_merges looks it up whole, before any cut.
            if self.ignore_merges:
                whole = self._token_ids.get(form.encode("utf-8"))
                if whole is not None:
                    out.append(whole)
                    return
            words = _PIECES.findall(form) if self.cuts_before_spaces else [form]
        cache = self._cache
        for word in words:
            ids = cache.get(word)
            if ids is None:
                ids = self._merge_word(word)
                if len(cache) >= _CACHE_MAX_ENTRIES:
                    cache.clear()
                cache[word] = ids
            out.extend(ids)

    def _merge_word(self, word: str) -> tuple[int, ...]:
        """BPE on one word (or an exact piece of one), from its characters (steps 3 and 4)."""
        token_ids = self._token_ids
        if self.ignore_merges and self.split:
            whole = token_ids.get(word.encode("utf-8"))
            if whole is not None:
                return (whole,)
        symbols: list[int] = []
        unk_pending = False  # HF holds the unk back until the next character that is a token
        for char in word:
            encoded = char.encode("utf-8")
            token_id = token_ids.get(encoded)
            if token_id is not None:
                if unk_pending:
                    symbols.append(self.unk_id)
                    unk_pending = False
                symbols.append(token_id)
                continue
            fallback = [self._fallback_ids[b] for b in encoded]
            if None not in fallback:
                symbols.extend(fallback)
                continue
            if self.unk_id is not None:
                if unk_pending and not self.fuse_unk:
                    symbols.append(self.unk_id)
                unk_pending = True
        if unk_pending:
            symbols.append(self.unk_id)
        return merge_ids(symbols, self._merge_ranks)

    def stream_cut_pattern(self) -> re.Pattern | None:
        """Where a text may be cut so that its two halves encode to the ids of the whole; None: nowhere.

        Both halves are encoded on their own, the second as ``continuing``
        (no ▁ prepended). A cut falls on a space, which becomes ▁: with
        ``metaspace_split`` HF itself cuts the word there; without it the cut
        must be exact (:attr:`cuts_before_spaces`), so the character before
        the space must not become ▁ too. ignore_merges without split looks
        up whole segments, which a cut would change: no cut then. Special
        tokens are checked by the caller.
        """
        return self._stream_cut_regex(" ", f"(?<=[^ {METASPACE}]) ")

    def stream_cut_pattern_bytes(self) -> re.Pattern | None:
        """:meth:`stream_cut_pattern` on UTF-8 bytes (the character before a cut is not a space or ▁)."""
        return self._stream_cut_regex(b" ", b"(?<! )(?<!" + re.escape(METASPACE.encode()) + b") ")

    def _stream_cut_regex(self, at_any_space, after_other_character) -> re.Pattern | None:
        if self.split:
            return re.compile(at_any_space)
        if self.cuts_before_spaces and not self.ignore_merges:
            return re.compile(after_other_character)
        return None

    def last_stream_cut(self, text: str, special_tokens: Sequence[str], search_from: int = 0) -> int:
        """The largest cut of ``text`` allowed by :meth:`stream_cut_pattern` at or after ``search_from``, or 0.

        No special token may cover the space or the character before it (so
        both lie in one segment, split the same way in the halves as in the
        whole), and the ``longest`` characters after the space must be known.
        """
        pattern = self._stream_cut
        longest = max((len(token) for token in special_tokens), default=0)
        limit = len(text) - max(longest, 1)
        if pattern is None or limit <= 0:
            return 0
        candidates = [match.start() for match in pattern.finditer(text, max(search_from, 1), limit + 1)]
        for position in reversed(candidates):
            if not any(_occurs_over(text, token, position - 1, position + 1) for token in special_tokens):
                return position
        return 0

    # ------------------------------------------------------------- decode

    def _output(self, token_id: int) -> str | int:
        """What one token decodes to: its text with ▁ as a space, or the byte of a byte token (an int)."""
        token = self._vocab.get(token_id)
        if token is None:
            return ""
        text = token.decode("utf-8", "replace")
        if self.decoder != "metaspace" and _BYTE_TOKEN.fullmatch(text):
            return int(text[3:-1], 16)
        return text.replace(METASPACE, " ")

    def decode(self, ids: list[int]) -> str:
        """HF's decoding of ``ids`` (already checked to be in the vocabulary)."""
        outputs = self._outputs
        if self.decoder == "metaspace":
            parts = [outputs[token_id] for token_id in ids]
            if parts and self.metaspace != "never":
                parts[0] = self._vocab[ids[0]].decode("utf-8", "replace").replace(METASPACE, "")
            return "".join(parts)
        parts: list[str] = []
        run = bytearray()  # consecutive byte tokens, decoded together
        for token_id in ids:
            output = outputs[token_id]
            if isinstance(output, int):
                run.append(output)
                continue
            if run:
                parts.append(_decode_byte_run(run))
                run = bytearray()
            parts.append(output)
        if run:
            parts.append(_decode_byte_run(run))
        text = "".join(parts)
        if self.decoder == "sentencepiece-strip" and text.startswith(" "):
            text = text[1:]
        return text

    def decode_bytes(self, ids: list[int]) -> bytes:
        """Each token's output as bytes (byte tokens raw), concatenated, with nothing stripped.

        So ``decode_bytes(a + b) == decode_bytes(a) + decode_bytes(b)``, which
        streaming one token at a time needs; :meth:`decode` differs only at
        the start (the decoder's strip, the Metaspace decoder's first token)
        and in how invalid UTF-8 is replaced.
        """
        outputs = self._outputs
        return b"".join(
            bytes([output]) if isinstance(output, int) else output.encode("utf-8")
            for output in (outputs[token_id] for token_id in ids)
        )


def next_stream_cut_in_file(file, position: int, special_tokens: Sequence[bytes], pattern: re.Pattern) -> int | None:
    """The first cut of ``pattern`` (from :meth:`SentencePieceBPE.stream_cut_pattern_bytes`) at or after byte
    ``position`` of a binary file, with no special token over the space or the byte before it; or None.
    """
    longest = max((len(token) for token in special_tokens), default=0)
    behind = max(longest, len(METASPACE.encode()))  # what the look-behind and a special token ending there read
    window_start = max(position, 1)
    while True:
        read_start = max(0, window_start - behind)
        file.seek(read_start)
        want = (window_start - read_start) + _SCAN_WINDOW_BYTES + max(longest, 1)
        window = file.read(want)
        at_end = len(window) < want
        search_end = len(window) if at_end else len(window) - max(longest, 1)
        for match in pattern.finditer(window, window_start - read_start, search_end):
            cut = match.start()
            if not any(_occurs_over(window, token, cut - 1, cut + 1) for token in special_tokens):
                return read_start + cut
        if at_end:
            return None
        window_start = read_start + search_end


def _occurs_over(text, token, start: int, end: int) -> bool:
    """Whether an occurrence of ``token`` in ``text`` shares a character with ``[start, end)``."""
    return text.find(token, max(0, start - len(token) + 1), end + len(token) - 1) != -1


def _decode_byte_run(run: bytearray) -> str:
    """A run of byte tokens as text; if it is not valid UTF-8, one U+FFFD per token (HF's ByteFallback)."""
    try:
        return run.decode("utf-8")
    except UnicodeDecodeError:
        return "\ufffd" * len(run)
