"""Writing a ``tokenizer.json`` that Hugging Face ``tokenizers`` loads.

HF's byte-level BPE is the same algorithm as ours: GPT-2's regex splits the
text (its ``ByteLevel`` pre-tokenizer with ``use_regex``), each piece's bytes
are written with GPT-2's byte -> character table, and merges apply by rank.
So the export is a change of spelling: tokens and merges go through
:func:`scratchlm.tokenizer.gpt2_files.encode_gpt2_token`, and special tokens
become HF "added tokens", which HF, like us, splits off before pre-tokenizing.

>>> tokenizer.save_hf("tokenizer.json")  # doctest: +SKIP
>>> tokenizers.Tokenizer.from_file("tokenizer.json").encode("Hello world").ids  # doctest: +SKIP
[15496, 995]
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from scratchlm.atomic import atomic_write
from scratchlm.tokenizer.gpt2_files import encode_gpt2_token

# GPT-2's settings: no space added before the text, GPT-2's regex.
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}


def hf_tokenizer_document(
    vocab: dict[int, bytes], merges: list[tuple[bytes, bytes]], special_token_ids: dict[str, int]
) -> dict:
    """The ``tokenizer.json`` contents, as a dict ready for ``json.dump``."""
    model_vocab: dict[str, int] = {}
    for token_id, token in sorted(vocab.items()):
        # A token held twice keeps its lower id, as in Tokenizer.
        model_vocab.setdefault(encode_gpt2_token(token), token_id)
    added_tokens = [
        {
            "id": token_id,
            "content": token,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for token, token_id in special_token_ids.items()
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added_tokens,
        "normalizer": None,
        "pre_tokenizer": _BYTE_LEVEL,
        "post_processor": None,
        "decoder": _BYTE_LEVEL,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            # False: a piece found whole in the vocab is still merged step by step, as here.
            "ignore_merges": False,
            "vocab": model_vocab,
            # "left right" strings: GPT-2's table never yields a space, and every HF version reads this form.
            "merges": [f"{encode_gpt2_token(left)} {encode_gpt2_token(right)}" for left, right in merges],
        },
    }


def save_hf_tokenizer(
    path: str | os.PathLike,
    vocab: dict[int, bytes],
    merges: list[tuple[bytes, bytes]],
    special_token_ids: dict[str, int],
) -> Path:
    """Write :func:`hf_tokenizer_document` to ``path`` as JSON, atomically."""
    path = Path(path)
    with atomic_write(path, "w", encoding="utf-8") as file:
        json.dump(hf_tokenizer_document(vocab, merges, special_token_ids), file, ensure_ascii=False)
    return path
