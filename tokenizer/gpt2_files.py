"""Reading and writing GPT-2's tokenizer files (``encoder.json`` and ``vocab.bpe``/merges).

GPT-2 stores tokens as printable strings: each byte is mapped to one Unicode
character so that spaces and control bytes survive a text file. The printable
ASCII and Latin-1 bytes (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) stand for
themselves; the other 68 bytes are mapped, in order, to U+0100, U+0101, ...
That is why GPT-2's token for " the" is written ``Ġthe``: byte 0x20 is the
33rd unprintable byte, and U+0100 + 32 = U+0120 = ``Ġ``.

>>> gpt2_bytes_to_unicode()[ord(" ")]
'Ġ'
>>> decode_gpt2_token("Ġthe")
b' the'
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

from scratchlm.atomic import atomic_write
from scratchlm.tokenizer.json_input import read_json

# Bytes GPT-2 keeps as the character with the same code point.
_PRINTABLE_BYTE_RANGES = ((ord("!"), ord("~")), (ord("¡"), ord("¬")), (ord("®"), ord("ÿ")))
# The first code point given to the remaining (unprintable) bytes.
_FIRST_SUBSTITUTE_CODE_POINT = 256
# Merges files written by GPT-2's tools start with a line like "#version: 0.2".
_VERSION_HEADER = "#version"


@lru_cache(maxsize=1)
def gpt2_bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte value 0..255 to one printable character."""
    kept = {b for low, high in _PRINTABLE_BYTE_RANGES for b in range(low, high + 1)}
    mapping: dict[int, str] = {}
    substitute = _FIRST_SUBSTITUTE_CODE_POINT
    for byte in range(256):
        if byte in kept:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(substitute)
            substitute += 1
    return mapping


@lru_cache(maxsize=1)
def _unicode_to_bytes() -> dict[str, int]:
    return {char: byte for byte, char in gpt2_bytes_to_unicode().items()}


def decode_gpt2_token(token: str) -> bytes:
    """Turn a GPT-2 token string (``"Ġthe"``) into its bytes (``b" the"``)."""
    table = _unicode_to_bytes()
    try:
        return bytes(table[char] for char in token)
    except KeyError as error:
        raise ValueError(f"token {token!r} holds {error.args[0]!r}, which is not a GPT-2 byte character") from None


def load_gpt2_files(
    vocab_filepath: str | os.PathLike, merges_filepath: str | os.PathLike
) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    """Read GPT-2's ``encoder.json`` (token -> id) and merges file into bytes.

    Returns ``(vocab, merges)`` in the form :class:`Tokenizer` takes. A
    ``#version`` first line and blank lines in the merges file are skipped.
    """
    encoder = read_json(vocab_filepath, f"vocab_filepath {str(vocab_filepath)!r}")
    if not isinstance(encoder, dict):
        raise ValueError(f"vocab_filepath {str(vocab_filepath)!r} must hold a JSON object token -> id")
    vocab = {int(token_id): decode_gpt2_token(token) for token, token_id in encoder.items()}

    merges: list[tuple[bytes, bytes]] = []
    with open(merges_filepath, encoding="utf-8") as file:
        for line_number, line in enumerate(file, start=1):
            line = line.rstrip("\r\n")
            if not line.strip() or (line_number == 1 and line.startswith(_VERSION_HEADER)):
                continue
            parts = line.split(" ")
            if len(parts) != 2:
                raise ValueError(
                    f"merges_filepath {str(merges_filepath)!r} line {line_number} must be two tokens "
                    f"separated by one space, got {line!r}"
                )
            merges.append((decode_gpt2_token(parts[0]), decode_gpt2_token(parts[1])))
    return vocab, merges


def encode_gpt2_token(token: bytes) -> str:
    """Turn token bytes (``b" the"``) into GPT-2's printable string (``"Ġthe"``).

    >>> encode_gpt2_token(b" the")
    'Ġthe'
    """
    table = gpt2_bytes_to_unicode()
    return "".join(table[byte] for byte in token)


def save_gpt2_files(
    vocab: dict[int, bytes],
    merges: list[tuple[bytes, bytes]],
    vocab_filepath: str | os.PathLike,
    merges_filepath: str | os.PathLike,
) -> None:
    """Write ``encoder.json`` (token -> id) and a merges file that :func:`load_gpt2_files` reads back.

    Every token, special tokens included, goes through GPT-2's byte -> character
    table, so ``<|endoftext|>`` is written as itself and ``b" the"`` as ``Ġthe``.
    The merges file starts with GPT-2's ``#version: 0.2`` line.
    """
    encoder: dict[str, int] = {}
    for token_id, token in sorted(vocab.items()):
        name = encode_gpt2_token(token)
        if name in encoder:
            raise ValueError(
                f"vocab holds {token!r} twice (ids {encoder[name]} and {token_id}); "
                "encoder.json maps each token to one id"
            )
        encoder[name] = token_id
    with atomic_write(Path(vocab_filepath), "w", encoding="utf-8") as file:
        json.dump(encoder, file, ensure_ascii=False)
    with atomic_write(Path(merges_filepath), "w", encoding="utf-8") as file:
        file.write(f"{_VERSION_HEADER}: 0.2\n")
        for left, right in merges:
            file.write(f"{encode_gpt2_token(left)} {encode_gpt2_token(right)}\n")
