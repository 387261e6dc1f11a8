"""The SentencePiece-style sections of a Hugging Face ``tokenizer.json``: reading and writing them.

A SentencePiece-style BPE file (Llama 2, TinyLlama, Mistral 7B, Gemma) says
how spaces become ``▁`` in one of three forms, each read as a
:class:`~scratchlm.tokenizer.tokenizer.Tokenizer` ``metaspace`` setting
(rules in :mod:`scratchlm.tokenizer.sentencepiece`)::

    normalizer                                        pre_tokenizer                     metaspace
    Sequence[Prepend("▁"), Replace(" ", "▁")]         null                              "prepend"
    null                                              Metaspace(scheme, split)          scheme
    Replace(" ", "▁") (or a one-step Sequence of it)  null or Split(" ", merged_with_   "never"
                                                      previous), a no-op once spaces
                                                      are ▁ (Gemma)

and its decoder as one of::

    Sequence[Replace("▁", " "), ByteFallback, Fuse, Strip(" ", 1, 0)]   "sentencepiece-strip"
    Sequence[Replace("▁", " "), ByteFallback, Fuse]                     "sentencepiece"
    Metaspace(scheme)                                                   "metaspace"

Anything else is refused, naming the field. A Metaspace step without
``prepend_scheme`` has HF's default, ``"always"`` (``add_prefix_space: true``
says the same), and without ``split`` HF's default, true.
"""

from __future__ import annotations

from typing import Any, Callable

from scratchlm.tokenizer.sentencepiece import METASPACE

_REPLACE_SPACE = {"type": "Replace", "pattern": {"String": " "}, "content": METASPACE}
_PREPEND = {"type": "Prepend", "prepend": METASPACE}
_DECODE_STEPS = [
    {"type": "Replace", "pattern": {"String": METASPACE}, "content": " "},
    {"type": "ByteFallback"},
    {"type": "Fuse"},
]
_STRIP = {"type": "Strip", "content": " ", "start": 1, "stop": 0}
# Gemma's pre-tokenizer: splits on spaces, of which the normalizer left none.
_GEMMA_SPLIT = {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": False}
_SCHEMES = ("always", "first", "never")

Refuse = Callable[[str, Any, str], ValueError]


def is_sentencepiece_file(document: dict) -> bool:
    """Whether a tokenizer.json is SentencePiece-style: neither its decoder nor a pre-tokenizer step is ByteLevel.

    (A byte-level file is read, and refused when it must be, by the byte-level rules.)
    """
    decoder = document.get("decoder")
    if isinstance(decoder, dict) and decoder.get("type") == "ByteLevel":
        return False
    steps = _steps(document.get("pre_tokenizer"), "Sequence", "pretokenizers")
    return not any(isinstance(step, dict) and step.get("type") == "ByteLevel" for step in steps)


def _steps(node: Any, kind: str, key: str) -> list:
    """A Sequence's steps, or the node as a one-step list ([] for null)."""
    if node is None:
        return []
    if isinstance(node, dict) and node.get("type") == "Sequence" and isinstance(node.get(key), list):
        return node[key]
    return [node]


def _metaspace_step(node: dict, field: str, refuse: Refuse) -> tuple[str, bool]:
    """(prepend scheme, split) of a Metaspace pre-tokenizer or decoder, checked."""
    if node.get("replacement") != METASPACE:
        raise refuse(f"{field}.replacement", node.get("replacement"), f"expected {METASPACE!r}")
    scheme = node.get("prepend_scheme", "always")
    if scheme not in _SCHEMES:
        raise refuse(f"{field}.prepend_scheme", scheme, f"expected one of {_SCHEMES}")
    if node.get("add_prefix_space") is False and scheme != "never":
        raise refuse(f"{field}.add_prefix_space", False, f"it contradicts prepend_scheme {scheme!r} (HF refuses it)")
    split = node.get("split", True)
    if not isinstance(split, bool):
        raise refuse(f"{field}.split", split, "expected true or false")
    return scheme, split


def read_word_boundaries(document: dict, refuse: Refuse) -> dict[str, Any]:
    """``metaspace``, ``metaspace_split`` and ``decoder`` from the normalizer, pre-tokenizer and decoder.

    Also ``"normalizer"``: ``"prepend"``, ``"replace"`` or None, the normalizer
    the file has, which decides what added tokens with ``normalized`` true do.
    """
    normalizer = _steps(document.get("normalizer"), "Sequence", "normalizers")
    pre_tokenizer = _steps(document.get("pre_tokenizer"), "Sequence", "pretokenizers")
    if normalizer == [_PREPEND, _REPLACE_SPACE]:
        normalizer_kind, metaspace, split = "prepend", "prepend", False
        if pre_tokenizer:
            raise refuse("pre_tokenizer", document.get("pre_tokenizer"), "expected null with a Prepend normalizer")
    elif normalizer == [_REPLACE_SPACE]:
        normalizer_kind, metaspace, split = "replace", "never", False
        if pre_tokenizer not in ([], [_GEMMA_SPLIT]):
            raise refuse(
                "pre_tokenizer", document.get("pre_tokenizer"),
                "with a Replace(\" \", \"▁\") normalizer expected null or "
                "Split(\" \", \"MergedWithPrevious\") (Gemma)",
            )
    elif not normalizer:
        normalizer_kind = None
        single = pre_tokenizer[0] if len(pre_tokenizer) == 1 else None
        if not isinstance(single, dict) or single.get("type") != "Metaspace":
            raise refuse(
                "pre_tokenizer", document.get("pre_tokenizer"),
                "a SentencePiece-style file needs a Metaspace pre-tokenizer, or a normalizer that writes spaces as ▁",
            )
        metaspace, split = _metaspace_step(pre_tokenizer[0], "pre_tokenizer", refuse)
    else:
        raise refuse(
            "normalizer", document.get("normalizer"),
            "SentencePiece-style files load with no normalizer, Sequence[Prepend(\"▁\"), Replace(\" \", \"▁\")] "
            "(Llama 2) or Replace(\" \", \"▁\") (Gemma); others (e.g. Precompiled, NFKC) are not reproduced",
        )
    return {
        "metaspace": metaspace,
        "metaspace_split": split,
        "decoder": _decoder(document.get("decoder"), metaspace, refuse),
        "normalizer": normalizer_kind,
    }


def _decoder(node: Any, metaspace: str, refuse: Refuse) -> str:
    steps = _steps(node, "Sequence", "decoders")
    if steps == _DECODE_STEPS + [_STRIP]:
        return "sentencepiece-strip"
    if steps == _DECODE_STEPS:
        return "sentencepiece"
    if len(steps) == 1 and isinstance(steps[0], dict) and steps[0].get("type") == "Metaspace":
        scheme, _ = _metaspace_step(steps[0], "decoder", refuse)
        # Its first token loses its ▁ unless its scheme is "never"; ours follows the encoder's scheme.
        if (scheme == "never") != (metaspace == "never"):
            raise refuse("decoder.prepend_scheme", scheme, f"expected it to prepend like the encoder ({metaspace!r})")
        return "metaspace"
    raise refuse(
        "decoder", node,
        "expected Sequence[Replace(\"▁\", \" \"), ByteFallback, Fuse] (+ Strip(\" \", 1, 0)) or a Metaspace decoder",
    )


def hf_word_boundary_sections(metaspace: str, split: bool, decoder: str) -> dict[str, Any]:
    """The ``normalizer``, ``pre_tokenizer`` and ``decoder`` sections of a tokenizer.json for these settings."""
    if metaspace == "prepend":
        normalizer, pre_tokenizer = {"type": "Sequence", "normalizers": [_PREPEND, _REPLACE_SPACE]}, None
    else:
        normalizer = None
        pre_tokenizer = {"type": "Metaspace", "replacement": METASPACE, "prepend_scheme": metaspace, "split": split}
    if decoder == "metaspace":
        scheme = "always" if metaspace == "prepend" else metaspace
        decoder_section = {"type": "Metaspace", "replacement": METASPACE, "prepend_scheme": scheme, "split": split}
    else:
        steps = _DECODE_STEPS + ([_STRIP] if decoder == "sentencepiece-strip" else [])
        decoder_section = {"type": "Sequence", "decoders": steps}
    return {"normalizer": normalizer, "pre_tokenizer": pre_tokenizer, "decoder": decoder_section}
