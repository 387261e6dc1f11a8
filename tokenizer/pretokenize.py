"""Pre-tokenization: cutting text into the pieces that BPE works inside.

Byte-level BPE never merges across a pre-token boundary, so "dog." and "dog!"
share the token for "dog" instead of learning two near-duplicates. The pieces
come from a pre-tokenizer (GPT-2's regular expression unless another preset
of :mod:`scratchlm.tokenizer.pretokenizers` is named), applied to the text
*between* special tokens (a special token such as ``<|endoftext|>`` is never
pre-tokenized or merged with its neighbours)::

    >>> pretokenize("Hello, world! It's 2024.")
    ['Hello', ',', ' world', '!', ' It', "'s", ' 2024', '.']

Long inputs are processed in pieces (by worker processes, or as a stream).
A cut is only made where it cannot change the result; see
:func:`is_safe_cut` for GPT-2's rule and why it is exact, and
:mod:`scratchlm.tokenizer.pretokenizers` for the other presets' rules.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import regex

# GPT-2's patterns live with the other presets; they are imported here too
# for the callers that have always found them in this module.
from scratchlm.tokenizer.pretokenizers import (  # noqa: F401
    DEFAULT_PRETOKENIZER,
    GPT2_PRETOKENIZE_PATTERN,
    GPT2_PRETOKENIZE_REGEX,
    PreTokenizer,
    get_pretokenizer,
)

# Files are scanned for cut points in windows of this many bytes.
_SCAN_WINDOW_BYTES = 1 << 16


def special_token_regex(special_tokens: Sequence[str]) -> regex.Pattern | None:
    """A regex matching any special token, longest first; None when there are none.

    Trying longer tokens first means that with both ``<|eot|>`` and
    ``<|eot|><|eot|>`` special, the doubled form is one token:

    >>> split_on_special_tokens("a<|eot|><|eot|>b", special_token_regex(["<|eot|>", "<|eot|><|eot|>"]))
    ['a', '<|eot|><|eot|>', 'b']
    """
    if not special_tokens:
        return None
    ordered = sorted(set(special_tokens), key=lambda token: (-len(token), token))
    # The capturing group makes `split` keep the special tokens in its output.
    return regex.compile("(" + "|".join(regex.escape(token) for token in ordered) + ")")


def split_on_special_tokens(text: str, special_regex: regex.Pattern | None) -> list[str]:
    """Split ``text`` into alternating ordinary text and special tokens.

    The result always has odd length: even indices are ordinary text (maybe
    empty), odd indices are special tokens.

    >>> split_on_special_tokens("a<|endoftext|>b", special_token_regex(["<|endoftext|>"]))
    ['a', '<|endoftext|>', 'b']
    """
    if special_regex is None:
        return [text]
    return special_regex.split(text)


def pretokenize(
    text: str, special_tokens: Sequence[str] = (), pretokenizer: str | PreTokenizer = DEFAULT_PRETOKENIZER
) -> list[str]:
    """The ordinary pre-tokens of ``text``, with special tokens removed.

    >>> pretokenize("one<|endoftext|>two", ["<|endoftext|>"])
    ['one', 'two']
    >>> pretokenize("x = 1234", pretokenizer="llama3")
    ['x', ' =', ' ', '123', '4']
    """
    findall = get_pretokenizer(pretokenizer).regex.findall
    pieces = split_on_special_tokens(text, special_token_regex(special_tokens))
    return [piece for segment in pieces[::2] for piece in findall(segment)]


def _overlaps_special_token(text, start: int, end: int, special_tokens: Sequence) -> bool:
    """Whether any occurrence of a special token in ``text`` overlaps ``[start, end)``.

    Works on ``str`` with ``str`` tokens or on ``bytes`` with ``bytes`` tokens.
    Any occurrence counts, not just those a left-to-right scan would pick,
    which can only make the answer more cautious.
    """
    for token in special_tokens:
        window_start = max(0, start - len(token) + 1)
        position = text.find(token, window_start, end + len(token) - 1)
        if position != -1:
            return True
    return False


def is_safe_cut(
    text: str,
    position: int,
    special_tokens: Sequence[str] = (),
    pretokenizer: str | PreTokenizer = DEFAULT_PRETOKENIZER,
) -> bool:
    """Whether encoding ``text[:position]`` and ``text[position:]`` separately
    gives the same pre-tokens as encoding ``text`` whole.

    Each preset has its own rule (its ``cut_regex``, argued in
    :mod:`scratchlm.tokenizer.pretokenizers`); GPT-2's is proven here.
    The rule: ``text[position]`` is whitespace, ``text[position + 1]`` is not,
    and no special token occurs over those two characters. Why it is exact:

    * The regex has no look-behind, so matching from ``position`` depends only
      on the text from there on; it suffices that a piece ends exactly at
      ``position`` in both cases and that everything before matches the same.
    * Let W be the whitespace run ending at ``position``. Followed by a
      non-space, ``\\s+(?!\\S)`` gives W minus its last character as one piece,
      and that last character starts the next piece (it is ``" "`` of
      ``" word"``, or a lone ``"\\n"``). Cut at ``position``, the first half
      ends with W minus its last character, which ``\\s+(?!\\S)`` again takes
      whole since end-of-text also satisfies the look-ahead. When W is a
      single character, the piece before it ends with a non-space, and no
      alternative runs a non-space piece into whitespace.
    * Every other test the regex can make at ``position`` (a letter, a digit,
      a symbol, a contraction's letter) fails on whitespace just as it fails
      at end-of-text, so pieces before the cut are unchanged.
    * Special tokens split the text before the regex runs; with no special
      token touching the two characters, both halves are split the same way
      as the whole, and both characters lie in one ordinary segment (so W is
      not at the end of a segment, where it would stay whole).

    Callers must know at least ``longest special token + 1`` characters after
    ``position`` for the special-token check to be final.

    >>> is_safe_cut("Hello world", 5)
    True
    >>> is_safe_cut("Hello  ", 5)
    False
    >>> is_safe_cut("a \\nb", 2), is_safe_cut("a \\nb", 2, pretokenizer="llama3")
    (True, False)
    """
    if not 0 < position < len(text):
        return False
    preset = get_pretokenizer(pretokenizer)
    if not preset.cut_regex.match(text, position):
        return False
    return not _overlaps_special_token(text, position - preset.cut_chars_before, position + 2, special_tokens)


def last_safe_cut(
    text: str,
    special_tokens: Sequence[str] = (),
    search_from: int = 0,
    pretokenizer: str | PreTokenizer = DEFAULT_PRETOKENIZER,
) -> int:
    """The largest safe cut position in ``text`` (see :func:`is_safe_cut`), or 0.

    Only positions whose special-token check is final (enough text after them)
    and which are at least ``search_from`` are considered.

    >>> last_safe_cut("one two three")
    7
    """
    longest = max((len(token) for token in special_tokens), default=0)
    # A position p needs text[p + 1] and the `longest` characters after p
    # (a special token could still start at p + 1); endpos = limit + 1 lets the
    # look-ahead see text[limit] for the last candidate, limit - 1.
    limit = len(text) - max(longest, 1)
    if limit <= 0:
        return 0
    start = max(search_from, 1)
    preset = get_pretokenizer(pretokenizer)
    candidates = [match.start() for match in preset.cut_regex.finditer(text, start, limit + 1)]
    for position in reversed(candidates):
        if is_safe_cut(text, position, special_tokens, preset):
            return position
    return 0


def next_safe_byte_cut(
    file,
    position: int,
    special_tokens: Sequence[bytes] = (),
    pretokenizer: str | PreTokenizer = DEFAULT_PRETOKENIZER,
) -> int | None:
    """The first safe cut at or after byte ``position`` of a binary file, or None.

    Same rule as :func:`is_safe_cut`, on bytes, never inside a multi-byte
    UTF-8 character (see the byte rules in
    :mod:`scratchlm.tokenizer.pretokenizers`). ``file`` is open in binary
    mode; its position is changed.
    """
    preset = get_pretokenizer(pretokenizer)
    before = preset.cut_chars_before  # the bytes a rule looks behind at are ASCII: one byte each
    longest = max((len(token) for token in special_tokens), default=0)
    # A candidate at p needs byte p + 1 and `longest` bytes after p (a special
    # token starting at p + 1), and `longest - 1 + before` bytes before p (one
    # ending at p - before, and the bytes its rule reads there); windows
    # overlap by that much.
    context = max(longest, 1)
    window_start = max(position, 1)
    while True:
        read_start = max(0, window_start - longest - before)
        offset = window_start - read_start
        file.seek(read_start)
        want = offset + _SCAN_WINDOW_BYTES + context
        window = file.read(want)
        at_end_of_file = len(window) < want
        search_end = len(window) if at_end_of_file else len(window) - context
        # endpos one past search_end lets the look-ahead see the byte after
        # the last candidate.
        endpos = min(search_end + 1, len(window))
        for match in preset.cut_regex_bytes.finditer(window, offset, endpos):
            if not _overlaps_special_token(window, match.start() - before, match.start() + 2, special_tokens):
                return read_start + match.start()
        if at_end_of_file:
            return None
        window_start = read_start + search_end


def safe_byte_ranges(
    path: str | os.PathLike,
    target_bytes: int,
    special_tokens: Sequence[str] = (),
    pretokenizer: str | PreTokenizer = DEFAULT_PRETOKENIZER,
) -> Iterator[tuple[int, int]]:
    """Split a UTF-8 file into ``(start, end)`` byte ranges at safe cuts.

    Each range is about ``target_bytes`` long (longer when no safe cut is near);
    pre-tokenizing the ranges one by one gives exactly the pre-tokens of the
    whole file, so they can go to different worker processes.
    """
    if target_bytes < 1:
        raise ValueError(f"target_bytes must be a positive int, got {target_bytes!r}")
    size = os.path.getsize(path)
    encoded_tokens = [token.encode("utf-8") for token in special_tokens]
    preset = get_pretokenizer(pretokenizer)
    start = 0
    with open(path, "rb") as file:
        while start < size:
            cut = None
            if start + target_bytes < size:
                cut = next_safe_byte_cut(file, start + target_bytes, encoded_tokens, preset)
            end = size if cut is None else cut
            yield start, end
            start = end


def read_text_range(path: str | os.PathLike, start: int, end: int) -> str:
    """Bytes ``[start, end)`` of a UTF-8 file as text (a range from ``safe_byte_ranges``).

    Invalid UTF-8 raises ValueError naming the file and the absolute byte offset.
    """
    with open(path, "rb") as file:
        file.seek(start)
        data = file.read(end - start)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"input_path {str(path)!r} is not valid UTF-8 at byte {start + error.start}: {error.reason}"
        ) from None
