"""Small SentencePiece-style BPE tokenizers made with Hugging Face ``tokenizers``, one per family's form.

Nothing is downloaded. One BPE over characters is trained with HF's trainer
(words cut before ``▁``, as SentencePiece trains), then laid out like Llama
2's vocabulary: ``<unk>``, ``<s>``, ``</s>`` at ids 0-2, the 256 ``<0xNN>``
byte tokens at 3-258, then the trained tokens. Each form sets the
normalizer, pre-tokenizer and decoder with HF's own objects, as
transformers' converters (``LlamaConverter``, ``GemmaConverter``, Metaspace
from ``SpmConverter``) build them, and HF writes the tokenizer.json.
"""

from __future__ import annotations

import json
from pathlib import Path

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
VOCAB_SIZE = 900
# Few enough characters that CJK, emoji and rare symbols fall back to bytes.
LIMIT_ALPHABET = 120
SYNTHETIC = (
    "def function(x):\n    return x ** 2  # 12345 values\n\n"
    "The Python module's object holds a value.\r\n\tGrößere Füße, 中文的字。\n"
) * 200


def train_vocab(corpus: str) -> tuple[dict[str, int], list[list[str]]]:
    """(vocab, merges) in Llama 2's layout: specials, 256 byte tokens, then the trained tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, limit_alphabet=LIMIT_ALPHABET, show_progress=False)
    hf.train_from_iterator([corpus], trainer)
    model = json.loads(hf.to_str())["model"]
    vocab = {UNK: 0, BOS: 1, EOS: 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for token, _ in sorted(model["vocab"].items(), key=lambda item: item[1]):
        vocab.setdefault(token, len(vocab))
    merges = [m.split(" ") if isinstance(m, str) else list(m) for m in model["merges"]]
    return vocab, merges


def _decoder(strip: bool):
    from tokenizers import decoders

    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    return decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if strip else []))


def _set_form(hf, form: str) -> None:
    """Normalizer, pre-tokenizer and decoder of ``form`` (see FORMS)."""
    from tokenizers import decoders, normalizers, pre_tokenizers

    if form == "llama2-legacy":  # LlamaConverter, legacy=True
        hf.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        hf.decoder = _decoder(strip=True)
    elif form == "gemma":  # GemmaConverter
        hf.normalizer = normalizers.Replace(" ", "▁")
        hf.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
        hf.decoder = _decoder(strip=False)
    else:  # "metaspace-<scheme>[-split][-msdecoder]": LlamaConverter legacy=False, or SpmConverter's Metaspace
        parts = form.split("-")
        scheme, split = parts[1], "split" in parts
        hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=split)
        if "msdecoder" in parts:
            hf.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=scheme, split=split)
        else:
            hf.decoder = _decoder(strip=scheme != "never")


# form -> the Tokenizer settings it should load as (metaspace, metaspace_split, decoder)
FORMS = {
    "llama2-legacy": ("prepend", False, "sentencepiece-strip"),
    "metaspace-first": ("first", False, "sentencepiece-strip"),
    "metaspace-always": ("always", False, "sentencepiece-strip"),
    "metaspace-never": ("never", False, "sentencepiece"),
    "metaspace-first-split": ("first", True, "sentencepiece-strip"),
    "metaspace-always-split-msdecoder": ("always", True, "metaspace"),
    "metaspace-never-split-msdecoder": ("never", True, "metaspace"),
    "gemma": ("never", False, "sentencepiece"),
}


def build_hf(
    vocab: dict[str, int],
    merges: list[list[str]],
    form: str,
    *,
    unk: str | None = UNK,
    fuse_unk: bool = True,
    byte_fallback: bool = True,
    drop_tokens: tuple[str, ...] = (),
    extra_merges: tuple[tuple[str, str], ...] = (),
    extra_tokens: tuple[str, ...] = (),
    ignore_merges: bool = False,
):
    """HF's tokenizer of one form. ``drop_tokens`` are left out of the vocabulary (ids stay dense);
    ``extra_tokens`` are added to it without merges that build them."""
    from tokenizers import AddedToken, Tokenizer, models, processors

    kept = [token for token in sorted(vocab, key=vocab.get) if token not in drop_tokens]
    for left, right in extra_merges:
        for token in (left, right, left + right, *extra_tokens):
            if token not in kept:
                kept.append(token)
    kept += [token for token in extra_tokens if token not in kept]
    dense = {token: index for index, token in enumerate(kept)}
    # Extra merges come first, so that they fire.
    all_merges = list(extra_merges) + [tuple(m) for m in merges if all(p in dense for p in (*m, "".join(m)))]
    hf = Tokenizer(
        models.BPE(
            vocab=dense, merges=all_merges, unk_token=unk, fuse_unk=fuse_unk, byte_fallback=byte_fallback,
            ignore_merges=ignore_merges,
        )
    )
    _set_form(hf, form)
    hf.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in (UNK, BOS, EOS)])
    hf.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, dense[BOS])]
    )
    return hf


def write_folder(hf, folder: Path) -> Path:
    """``tokenizer.json`` as HF writes it, and a Llama 2-style ``tokenizer_config.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    hf.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": BOS,
        "eos_token": {"content": EOS, "lstrip": False, "rstrip": False, "normalized": False, "special": True},
        "unk_token": UNK,
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": True,
        "add_prefix_space": True,
        "clean_up_tokenization_spaces": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder
