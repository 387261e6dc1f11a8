"""Pre-tokenizers as data: named presets, each a short pipeline of regex splits.

A pre-tokenizer cuts text into the pieces that BPE merges inside. Hugging Face
``tokenizers`` describes one as a pipeline of steps, each cutting every piece
it receives a little further. The byte-level steps used by the Llama family
are all one operation, a regex split in which both the matches and the gaps
between them become pieces (HF's ``Split`` with behavior ``"Isolated"``):

    ============================================  ===========================
    HF step                                       split on
    ============================================  ===========================
    ``ByteLevel(use_regex=True)``                 GPT-2's regex
    ``ByteLevel(use_regex=False)``                nothing (only respells bytes)
    ``Split(Regex(p), behavior="Isolated")``      ``p``
    ``Digits(individual_digits=True)``            ``\\p{N}`` (each digit alone)
    ============================================  ===========================

A preset is such a pipeline (:attr:`PreTokenizer.splits`, its definition,
used to recognise and to write tokenizer files) plus two things derived from
it and proven equal to it:

* ``regex``: one pattern whose ``findall`` gives the pipeline's pieces in a
  single pass (running a pipeline piece by piece in Python costs ~2x);
* a *cut rule* (``cut_regex``, ``cut_regex_bytes``): where a long text may be
  cut so that its two halves give exactly the pieces of the whole, which lets
  ``encode_iterable`` stream and ``encode_file`` work in parallel. Each rule is
  argued next to its preset below; ``tests/tokenizer`` checks every one with
  hypothesis.

>>> PRETOKENIZERS["llama3"].regex.findall("It's 12345 dollars!\\n\\n  ok")
['It', "'s", ' ', '123', '45', ' dollars', '!\\n\\n', ' ', ' ok']
>>> pipeline_pieces("ab12 c", PRETOKENIZERS["gpt2-digits"].splits)
['ab', '1', '2', ' c']

Python's ``regex`` module and HF's Oniguruma agree on every character that
Unicode 14.0 had assigned (checked over all code points); characters first
assigned later (Unicode 15 and up) may be classed as letters or digits by
one library and not the other, so text containing them can split differently.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import regex

# GPT-2's pre-tokenizer, alternative by alternative: English contractions,
# a run of letters, a run of digits, a run of other symbols (each optionally
# led by one space, so " the" is one piece), then whitespace. `\s+(?!\S)`
# takes a whitespace run but leaves its last character when a word follows,
# so that character can lead the next piece (" word").
GPT2_PRETOKENIZE_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# The same pieces, found 18% faster (0.84 s -> 0.69 s on the 11 MB Python
# docs): the regex engine tries alternatives in order at every position, so
# the most common one goes first. Why the pieces are identical, position by
# position (the engine takes the first alternative that matches there):
# * At most one of ` ?\p{L}+`, ` ?\p{N}+`, ` ?[^\s\p{L}\p{N}]+` can match at a
#   position: which one is decided by the class of its first character, or
#   of the second when the first is a space, and the three classes are
#   disjoint. Their order among themselves is free.
# * A contraction starts with an apostrophe, which only the symbol
#   alternative can also match, so contractions need only come before that
#   one (and `'(?:[st]|re|ve|m|ll|d)` is the seven contractions, same order).
# * The whitespace alternatives stay last: where a space leads a letter, digit
#   or symbol run, that run's alternative must win. GPT-2's final `\s+` only
#   runs when `\s+(?!\S)` failed, which happens only for a single whitespace
#   character followed by a non-space (a longer run backs off by one), so it
#   always matches exactly one character: `\s`.
# tests/tokenizer/test_pretokenize.py checks the two on arbitrary Unicode and
# the shared corpora.
_GPT2_PRETOKENIZE_PATTERN_REORDERED = (
    r""" ?\p{L}+|'(?:[st]|re|ve|m|ll|d)| ?[^\s\p{L}\p{N}]+| ?\p{N}+|\s+(?!\S)|\s"""
)
GPT2_PRETOKENIZE_REGEX = regex.compile(_GPT2_PRETOKENIZE_PATTERN_REORDERED)

# Llama 3's pre-tokenizer, as its tokenizer.json writes it (a Split step,
# then ByteLevel without a regex); llama.cpp's "llama-bpe" is the same
# pattern with the case-insensitive group spelled out ('[sS] ...). Unlike
# GPT-2: contractions in any case; a letter run may be led by any one
# character that is not a CR, LF, letter or digit ("(word", "\tword");
# digits come in runs of at most three; a symbol run keeps the line breaks
# that follow it; and `\s*[\r\n]+` makes a whitespace run that contains line
# breaks one piece up to and including its last line break.
LLAMA3_PRETOKENIZE_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen2's pre-tokenizer (Qwen2, Qwen2.5, Qwen3), as its tokenizer.json writes
# it: Llama 3's pattern with every digit a piece of its own (`\p{N}` where
# Llama 3 has `\p{N}{1,3}`); the rest is the same text.
QWEN2_PRETOKENIZE_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# HF's Digits(individual_digits=True): every character of class \p{N} is a
# piece of its own (a Split on \p{N}, "Isolated").
DIGITS_PATTERN = r"\p{N}"

# Mistral's "tekken" (Mistral Nemo, Pixtral, Ministral: tokenizer.json's Split
# pattern; llama.cpp's tekken): Llama 3's shape without contractions, letter
# runs cut at case changes (camelCase -> "camel", "Case"), marks kept with
# letters, single digits, and a slash kept after a symbol run's line breaks.
TEKKEN_PRETOKENIZE_PATTERN = (
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"""
    r"""|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"""
    r"""|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Digits, then GPT-2's regex on each stretch between digits (SmolLM,
# StarCoder), found in one pass. GPT-2's alternatives never consume a digit
# once ` ?\p{N}+` is gone, so no match can cross a digit, and a digit is
# matched by `\p{N}` alone, as a piece of its own. Within a stretch the
# engine behaves as on the stretch by itself, because the regex has no
# look-behind and its only look-ahead, `(?!\S)`, becomes `(?![^\s\p{N}])`:
# a digit after a whitespace run now satisfies it, exactly as the end of
# the stretch did (" 1" is " " then "1", and "a  1" is "a", "  ", "1").
# Order and the final `\s` follow the GPT-2 reordering argument above.
_GPT2_DIGITS_PATTERN_FUSED = (
    r""" ?\p{L}+|'(?:[st]|re|ve|m|ll|d)| ?[^\s\p{L}\p{N}]+|\p{N}|\s+(?![^\s\p{N}])|\s"""
)

# ---------------------------------------------------------------- cut rules
#
# A cut at position p (the halves text[:p] and text[p:]) is exact when the
# whole text has a piece boundary at p and the first half's pieces are the
# whole's pieces before p. The second half is then matched exactly as the
# whole is from p on, since none of these patterns looks behind. For the
# first half, a match that ends by p in the whole text is found again: an
# alternative that failed there also fails on a shorter text, except where
# reaching the end of the text lets a negative look-ahead succeed, so only
# `(?!\S)`-style look-aheads that see text[p] need an argument.
#
# GPT-2: text[p] is whitespace and text[p+1] is not; the proof is in
# scratchlm.tokenizer.pretokenize.is_safe_cut.
#
# Llama 3 has two rules. (a) text[p] is whitespace other than CR or LF, and
# text[p+1] is not whitespace. Let R be the whitespace run ending with
# text[p], less the line breaks a symbol run before it took
# (` ?[^\s\p{L}\p{N}]+[\r\n]*`).
# * No alternative starts inside R before its last character and runs past
#   it: a letter run needs a letter within one character, a symbol run a
#   symbol, and both see only whitespace; the piece before R ends in a
#   non-space (or a line break a symbol run took) and never grows into text[p].
# * If R holds line breaks, `\s*[\r\n]+` takes R up to and including its last
#   one, which is before p (text[p] is not a line break); the first half,
#   where R stops before text[p], finds the same match by the same
#   backtracking. Call what is left of R after it Q (all of R otherwise).
# * Q ends with text[p]. If Q is text[p] alone, a piece ends at p. If it is
#   longer, it holds no line break and is followed by a non-space, so
#   `\s+(?!\S)` takes Q less its last character, ending at p, and in the
#   first half, where Q less text[p] ends the text, takes it whole: the same.
# * From p, in both texts, text[p] leads the next piece (" word", " .") or is
#   a piece alone.
# Cutting before a CR or LF would be wrong: "a \nb" is "a", " \n", "b".
# (b) text[p-1] is CR or LF and text[p] is not whitespace: the cut comes
# after the line break. The piece holding text[p-1] is either a symbol run,
# whose `[\r\n]*` stops at text[p], or `\s*[\r\n]+` over the whitespace run
# ending there (nothing else can start inside that run: a letter or symbol
# run needs one within a character, and `\s*[\r\n]+` comes before
# `\s+(?!\S)`), whose backtracking ends it at its last line break, text[p-1].
# Both end at p, in the whole text and in the first half alike, with no
# look-ahead involved. Rule (b) is what cuts text without spaces, such as
# Chinese lines. (It would be wrong for GPT-2, whose `\s+(?!\S)` leaves the
# line break before a word as a piece of its own.)
#
# Qwen2 takes Llama 3's two rules unchanged. The argument above never uses
# the digit alternative: a digit piece starts with a digit (it is never led
# by a space or a line break), so at and after a cut it is found the same
# way in both halves, and `\p{N}` versus `\p{N}{1,3}` only changes how a
# digit run is cut inside, where no rule cuts (digits are not whitespace).
#
# Tekken takes Llama 3's rules, with rule (b) not cutting before "/": a
# symbol run's `[\r\n/]*` takes a slash right after its line breaks
# (".\n/" is one piece). Otherwise the argument is Llama 3's: every letter
# alternative is led by at most one non-letter, non-digit character other
# than CR/LF and then needs a letter or mark, so none starts inside a
# whitespace run before its last character; a letter run's case split falls
# between letters, never at whitespace; digits are single, as in Qwen2.
#
# Digits then GPT-2: text[p] is whitespace and text[p+1] is neither
# whitespace nor a digit. That is GPT-2's rule inside one stretch between
# digits; with a digit at p+1 the whitespace run ends its stretch, where it
# stays whole ("a  1" is "a", "  ", "1", but its halves "a " and " 1" give
# "a", " ", " ", "1").
#
# For all three, special tokens are split off first; a cut must not touch
# one (scratchlm.tokenizer.pretokenize.is_safe_cut checks that over the
# characters a rule reads, from `cut_chars_before` before p to p + 2), so
# that both halves see the same ordinary text on either side of p.
#
# The byte rules are the same, restricted so that a cut never falls inside a
# multi-byte UTF-8 character and every byte class is exact: one of the six
# ASCII bytes `\s` matches (not CR or LF for Llama 3's rule (a)) followed by
# a printable non-space ASCII byte (not 0-9 for the digit variant). Llama 3's
# rule (b) cuts right after an ASCII line break, so the character after it
# may be multi-byte; it is taken when its first bytes show it is no space:
# lead bytes C3-DF and E4-F4 start no whitespace character, and E3 starts
# one (U+3000) only when followed by 80. (C2, E1 and E2 start the others:
# U+0085, U+00A0, U+1680, U+2000-U+205F.)


@dataclass(frozen=True)
class PreTokenizer:
    """A named pre-tokenizer: its pipeline, a one-pass regex for it, and its cut rule."""

    name: str
    description: str
    splits: tuple[str, ...]  # the pipeline: regex splits applied in order, each "Isolated"
    regex: regex.Pattern  # findall gives the pipeline's pieces in one pass
    cut_regex: regex.Pattern  # matches at p where text[:p] | text[p:] is an exact cut
    cut_regex_bytes: regex.Pattern  # the same on UTF-8 bytes
    cut_chars_before: int = 0  # characters before p the cut rule reads (its look-behind)

    def pieces(self, text: str) -> list[str]:
        """The pieces of ``text`` (no special tokens in it)."""
        return self.regex.findall(text)


def _preset(
    name: str, description: str, splits: Sequence[str], pattern: str, cut: str, cut_bytes: bytes, chars_before: int = 0
) -> PreTokenizer:
    compiled = [regex.compile(pattern), regex.compile(cut), regex.compile(cut_bytes)]
    return PreTokenizer(name, description, tuple(splits), *compiled, chars_before)


PRETOKENIZERS: dict[str, PreTokenizer] = {
    preset.name: preset
    for preset in (
        _preset(
            "gpt2",
            "GPT-2's regex (HF ByteLevel with use_regex=True)",
            [GPT2_PRETOKENIZE_PATTERN],
            _GPT2_PRETOKENIZE_PATTERN_REORDERED,
            r"\s(?=\S)",
            rb"[\t\n\x0b\x0c\r ](?=[\x21-\x7e])",
        ),
        _preset(
            "llama3",
            "Llama 3's regex (HF Split, then ByteLevel without a regex; llama.cpp's llama-bpe)",
            [LLAMA3_PRETOKENIZE_PATTERN],
            LLAMA3_PRETOKENIZE_PATTERN,
            r"[^\S\r\n](?=\S)|(?<=[\r\n])\S",
            rb"[\t\x0b\x0c ](?=[\x21-\x7e])|(?<=[\r\n])(?:[\x21-\x7e\xc3-\xdf\xe4-\xf4]|\xe3[\x81-\xbf])",
            chars_before=1,
        ),
        _preset(
            "qwen2",
            "Qwen2's regex, Llama 3's with single digits (HF Split, then ByteLevel without a regex; "
            "Qwen2, Qwen2.5, Qwen3; llama.cpp's qwen2)",
            [QWEN2_PRETOKENIZE_PATTERN],
            QWEN2_PRETOKENIZE_PATTERN,
            r"[^\S\r\n](?=\S)|(?<=[\r\n])\S",
            rb"[\t\x0b\x0c ](?=[\x21-\x7e])|(?<=[\r\n])(?:[\x21-\x7e\xc3-\xdf\xe4-\xf4]|\xe3[\x81-\xbf])",
            chars_before=1,
        ),
        _preset(
            "tekken",
            "Mistral's tekken regex (HF Split, then ByteLevel without a regex; Mistral Nemo, Pixtral; llama.cpp's "
            "tekken)",
            [TEKKEN_PRETOKENIZE_PATTERN],
            TEKKEN_PRETOKENIZE_PATTERN,
            r"[^\S\r\n](?=\S)|(?<=[\r\n])[^\s/]",
            rb"[\t\x0b\x0c ](?=[\x21-\x7e])|(?<=[\r\n])(?:[\x21-\x2e\x30-\x7e\xc3-\xdf\xe4-\xf4]|\xe3[\x81-\xbf])",
            chars_before=1,
        ),
        _preset(
            "gpt2-digits",
            "each digit alone, then GPT-2's regex (HF Digits(individual_digits=True), then ByteLevel; "
            "SmolLM, StarCoder; llama.cpp's smollm, starcoder)",
            [DIGITS_PATTERN, GPT2_PRETOKENIZE_PATTERN],
            _GPT2_DIGITS_PATTERN_FUSED,
            r"\s(?=[^\s\p{N}])",
            rb"[\t\n\x0b\x0c\r ](?=[\x21-\x2f\x3a-\x7e])",
        ),
    )
}
DEFAULT_PRETOKENIZER = "gpt2"


def get_pretokenizer(pretokenizer: str | PreTokenizer) -> PreTokenizer:
    """The preset called ``pretokenizer`` (a preset itself is returned as is).

    >>> get_pretokenizer("llama3").name
    'llama3'
    """
    if isinstance(pretokenizer, PreTokenizer):
        return pretokenizer
    try:
        return PRETOKENIZERS[pretokenizer]
    except (KeyError, TypeError):
        raise ValueError(
            f"pretokenizer must be one of {sorted(PRETOKENIZERS)}, got {pretokenizer!r}"
        ) from None


def find_pretokenizer(splits: Sequence[str]) -> PreTokenizer | None:
    """The preset whose pipeline is exactly ``splits`` (pattern texts, in order), or None."""
    for preset in PRETOKENIZERS.values():
        if preset.splits == tuple(splits):
            return preset
    return None


def pipeline_pieces(text: str, splits: Sequence[str]) -> list[str]:
    """Run a pipeline of "Isolated" regex splits the slow, literal way: the definition.

    Each step cuts every current piece into its matches and the non-empty
    gaps between them, in order.

    >>> pipeline_pieces("a1b", [DIGITS_PATTERN])
    ['a', '1', 'b']
    """
    pieces = [text] if text else []
    for pattern in splits:
        compiled = regex.compile(pattern)
        next_pieces = []
        for piece in pieces:
            end = 0
            for match in compiled.finditer(piece):
                if match.start() > end:
                    next_pieces.append(piece[end : match.start()])
                if match.end() > match.start():
                    next_pieces.append(match.group())
                end = match.end()
            if end < len(piece):
                next_pieces.append(piece[end:])
        pieces = next_pieces
    return pieces
