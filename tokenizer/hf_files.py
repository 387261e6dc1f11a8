"""Writing a ``tokenizer.json`` that Hugging Face ``tokenizers`` loads.

HF's byte-level BPE is the same algorithm as ours: a pre-tokenizer splits the
text, each piece's bytes are written with GPT-2's byte -> character table,
and merges apply by rank. So the export is a change of spelling: tokens and
merges go through :func:`scratchlm.tokenizer.gpt2_files.encode_gpt2_token`,
special tokens become HF "added tokens", which HF, like us, splits off before
pre-tokenizing, and the pre-tokenizer preset becomes HF's pipeline of steps:

    gpt2          ByteLevel(use_regex=True)
    llama3        Sequence[Split(Llama 3's regex, "Isolated"), ByteLevel(use_regex=False)]
    gpt2-digits   Sequence[Digits(individual_digits=True), ByteLevel(use_regex=True)]

    qwen2         Sequence[Split(Qwen2's regex, "Isolated"), ByteLevel(use_regex=False)]

A SentencePiece-style tokenizer (``metaspace`` set) is written with its
tokens as text, ``byte_fallback`` in the model, and the normalizer,
pre-tokenizer and decoder of :mod:`scratchlm.tokenizer.hf_sentencepiece`.
``normalizer="nfc"`` becomes HF's ``{"type": "NFC"}`` normalizer (added tokens stay unnormalized).
``ignore_merges``, ``unk_token`` and ``fuse_unk`` are the BPE model's options of those names, and ``add_bos``
becomes a TemplateProcessing post-processor that puts the bos token first, as
Llama 3's own file does. :func:`save_hf_folder` adds the
``tokenizer_config.json`` that ``transformers.AutoTokenizer`` reads (bos/eos).
:mod:`scratchlm.tokenizer.hf_reader` reads all of this back.

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
from scratchlm.tokenizer.hf_sentencepiece import hf_word_boundary_sections
from scratchlm.tokenizer.pretokenizers import (
    DEFAULT_PRETOKENIZER,
    DIGITS_PATTERN,
    GPT2_PRETOKENIZE_PATTERN,
    get_pretokenizer,
)

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

# No space added before the text; with use_regex, GPT-2's regex. As a decoder
# only the byte -> character table matters.
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}


def hf_pre_tokenizer(pretokenizer: str) -> dict:
    """HF's ``pre_tokenizer`` section for a preset: its splits as HF steps, then ByteLevel.

    >>> hf_pre_tokenizer("gpt2-digits")["pretokenizers"][0]
    {'type': 'Digits', 'individual_digits': True}
    """
    splits = list(get_pretokenizer(pretokenizer).splits)
    # ByteLevel runs GPT-2's regex itself when it is the last split.
    use_regex = bool(splits) and splits[-1] == GPT2_PRETOKENIZE_PATTERN
    if use_regex:
        splits.pop()
    steps = []
    for pattern in splits:
        if pattern == DIGITS_PATTERN:
            steps.append({"type": "Digits", "individual_digits": True})
        else:
            steps.append({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False})
    byte_level = _BYTE_LEVEL | {"use_regex": use_regex}
    return {"type": "Sequence", "pretokenizers": [*steps, byte_level]} if steps else byte_level


def _token_text(vocab: dict[int, bytes], token_id: int, name: str) -> str:
    try:
        return vocab[token_id].decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{name} {token_id} is {vocab[token_id]!r}, not UTF-8 text; HF names tokens by text") from None


def _template(vocab: dict[int, bytes], bos_id: int | None, eos_id: int | None) -> dict:
    """A post-processor that puts bos before and/or eos after the text (each text of a pair), as Llama's does."""
    specials = {}
    before, after = [], []
    for token_id, name, where in ((bos_id, "bos_id", before), (eos_id, "eos_id", after)):
        if token_id is not None:
            text = _token_text(vocab, token_id, name)
            where.append(text)
            specials[text] = {"id": text, "ids": [token_id], "tokens": [text]}

    def part(sequence: str, type_id: int) -> list[dict]:
        return (
            [{"SpecialToken": {"id": text, "type_id": type_id}} for text in before]
            + [{"Sequence": {"id": sequence, "type_id": type_id}}]
            + [{"SpecialToken": {"id": text, "type_id": type_id}} for text in after]
        )

    return {"type": "TemplateProcessing", "single": part("A", 0), "pair": part("A", 0) + part("B", 1),
            "special_tokens": specials}


def hf_tokenizer_document(
    vocab: dict[int, bytes],
    merges: list[tuple[bytes, bytes]],
    special_token_ids: dict[str, int],
    *,
    pretokenizer: str = DEFAULT_PRETOKENIZER,
    ignore_merges: bool = False,
    bos_id: int | None = None,
    add_bos: bool = False,
    unk_id: int | None = None,
    fuse_unk: bool = False,
    normalizer: str | None = None,
    eos_id: int | None = None,
    add_eos: bool = False,
    nonspecial_tokens: tuple[str, ...] = (),
    lstrip_tokens: tuple[str, ...] = (),
    rstrip_tokens: tuple[str, ...] = (),
    metaspace: str | None = None,
    metaspace_split: bool = False,
    byte_fallback: bool = False,
    decoder: str | None = None,
) -> dict:
    """The ``tokenizer.json`` contents, as a dict ready for ``json.dump``.

    With ``metaspace`` (SentencePiece-style BPE) tokens are written as their
    text, and the normalizer, pre-tokenizer and decoder are those of
    :func:`scratchlm.tokenizer.hf_sentencepiece.hf_word_boundary_sections`.
    """
    if metaspace is None:
        spell = encode_gpt2_token
        sections = {
            "normalizer": {"type": "NFC"} if normalizer == "nfc" else None,
            "pre_tokenizer": hf_pre_tokenizer(pretokenizer),
            "decoder": _BYTE_LEVEL,
        }
    else:
        def spell(token: bytes) -> str:
            try:
                return token.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"token {token!r} is not UTF-8; a SentencePiece-style vocabulary is text") from None

        sections = hf_word_boundary_sections(metaspace, metaspace_split, decoder)
    model_vocab: dict[str, int] = {}
    for token_id, token in sorted(vocab.items()):
        # A token held twice keeps its lower id, as in Tokenizer.
        model_vocab.setdefault(spell(token), token_id)
    added_tokens = [
        {
            "id": token_id,
            "content": token,
            "single_word": False,
            "lstrip": token in lstrip_tokens,
            "rstrip": token in rstrip_tokens,
            "normalized": False,
            "special": token not in nonspecial_tokens,
        }
        for token, token_id in special_token_ids.items()
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added_tokens,
        "normalizer": sections["normalizer"],
        "pre_tokenizer": sections["pre_tokenizer"],
        "post_processor": _template(vocab, bos_id if add_bos else None, eos_id if add_eos else None)
        if (add_bos and bos_id is not None) or (add_eos and eos_id is not None)
        else None,
        "decoder": sections["decoder"],
        "model": {
            "type": "BPE",
            "dropout": None,
            # HF looks the unk token up in this model's vocab, by its spelling there.
            "unk_token": None if unk_id is None else spell(vocab[unk_id]),
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": fuse_unk,
            "byte_fallback": byte_fallback,
            # False: a piece found whole in the vocab is still merged step by step.
            "ignore_merges": ignore_merges,
            "vocab": model_vocab,
            # "left right" strings: GPT-2's table never yields a space, and every HF version reads this form;
            # SentencePiece-style tokens may hold a space, so they are written as pairs.
            "merges": [f"{spell(left)} {spell(right)}" for left, right in merges]
            if metaspace is None
            else [[spell(left), spell(right)] for left, right in merges],
        },
    }


def save_hf_tokenizer(
    path: str | os.PathLike,
    vocab: dict[int, bytes],
    merges: list[tuple[bytes, bytes]],
    special_token_ids: dict[str, int],
    **settings,
) -> Path:
    """Write :func:`hf_tokenizer_document` to ``path`` as JSON, atomically.

    ``settings`` are its keyword arguments (pre-tokenizer, ignore_merges, bos).
    """
    path = Path(path)
    document = hf_tokenizer_document(vocab, merges, special_token_ids, **settings)
    with atomic_write(path, "w", encoding="utf-8") as file:
        json.dump(document, file, ensure_ascii=False)
    return path


def hf_tokenizer_config(
    vocab: dict[int, bytes],
    special_token_ids: dict[str, int],
    bos_id: int | None,
    eos_id: int | None,
    add_bos: bool,
    add_eos: bool = False,
    pad_id: int | None = None,
) -> dict:
    """The ``tokenizer_config.json`` contents: the generic fast tokenizer, with bos/eos.

    ``transformers`` makes a bos/eos token that is not an added token into a
    new one, which would then be split off the text; so they must be special
    tokens here.
    """
    specials = set(special_token_ids.values())
    names = {}
    for name, token_id in (("bos_id", bos_id), ("eos_id", eos_id), ("pad_id", pad_id)):
        if token_id is not None and token_id not in specials:
            raise ValueError(
                f"{name}={token_id} is not a special token; transformers would turn it into one, "
                "changing how text splits"
            )
        names[name] = None if token_id is None else _token_text(vocab, token_id, name)
    return {
        # The generic fast tokenizer runs tokenizer.json exactly as written.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": names["bos_id"],
        "eos_token": names["eos_id"],
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
    } | ({} if pad_id is None else {"pad_token": names["pad_id"]})


def save_hf_folder(
    directory: str | os.PathLike,
    vocab: dict[int, bytes],
    merges: list[tuple[bytes, bytes]],
    special_token_ids: dict[str, int],
    *,
    pretokenizer: str = DEFAULT_PRETOKENIZER,
    ignore_merges: bool = False,
    bos_id: int | None = None,
    eos_id: int | None = None,
    add_bos: bool = False,
    unk_id: int | None = None,
    fuse_unk: bool = False,
    normalizer: str | None = None,
    add_eos: bool = False,
    pad_id: int | None = None,
    **sentencepiece_settings,
) -> Path:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``directory`` (created if needed).

    Each file is written atomically; the config is checked before either is written.
    """
    directory = Path(directory)
    config = hf_tokenizer_config(vocab, special_token_ids, bos_id, eos_id, add_bos, add_eos, pad_id)
    directory.mkdir(parents=True, exist_ok=True)
    save_hf_tokenizer(
        directory / TOKENIZER_FILE,
        vocab,
        merges,
        special_token_ids,
        pretokenizer=pretokenizer,
        ignore_merges=ignore_merges,
        bos_id=bos_id,
        add_bos=add_bos,
        unk_id=unk_id,
        fuse_unk=fuse_unk,
        normalizer=normalizer,
        eos_id=eos_id,
        add_eos=add_eos,
        **sentencepiece_settings,
    )
    with atomic_write(directory / TOKENIZER_CONFIG_FILE, "w", encoding="utf-8") as file:
        json.dump(config, file, ensure_ascii=False, indent=1)
    return directory
