"""Small byte-level BPE tokenizers trained with Hugging Face ``tokenizers``, one per pre-tokenizer style.

Nothing is downloaded: each is trained on a slice of the shared Python docs
corpus, with Llama-3-like special tokens, a TemplateProcessing that adds bos,
and a tokenizer_config.json naming bos and eos. ``STYLES`` maps a name to
(HF pre-tokenizer, preset it should load as, ignore_merges, GGUF pre name).
"""

from __future__ import annotations

import json
from pathlib import Path

from scratchlm.tokenizer import LLAMA3_PRETOKENIZE_PATTERN
from scratchlm.tokenizer.gpt2_files import encode_gpt2_token

BOS, EOS, USER = "<|begin_of_text|>", "<|end_of_text|>", "<|user|>"
TRAIN_BYTES = 250_000
VOCAB_SIZE = 1500
# Training text when the shared corpora are absent.
SYNTHETIC = (
    "def function(x):\n    return x ** 2  # 12345 values\n\n"
    "The Python module's object holds a value.\r\n\tGrößere Füße, 中文的字。\n"
) * 400
# Whole words added to the vocabulary without merges that build them, as
# Llama 3's vocabulary has: only ignore_merges ever produces them.
UNREACHABLE_WORDS = [" function", " return", " module", " object", " the", " value", "Python", " ü", " 的"]


def _byte_level(use_regex: bool):
    from tokenizers import pre_tokenizers

    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)


def hf_pre_tokenizer(style: str):
    from tokenizers import Regex, pre_tokenizers

    if style == "gpt2":
        return _byte_level(True)
    if style.startswith("llama3"):
        split = pre_tokenizers.Split(Regex(LLAMA3_PRETOKENIZE_PATTERN), behavior="isolated", invert=False)
        return pre_tokenizers.Sequence([split, _byte_level(False)])
    if style == "gpt2-digits":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _byte_level(True)])
    raise ValueError(style)


# style -> (preset it loads as, ignore_merges, llama.cpp's tokenizer.ggml.pre name)
STYLES = {
    "gpt2": ("gpt2", False, "gpt-2"),
    "llama3": ("llama3", False, "dbrx"),  # Llama 3's regex without ignore_merges
    "llama3-ignore-merges": ("llama3", True, "llama-bpe"),
    "gpt2-digits": ("gpt2-digits", False, "smollm"),
}


def train_hf_folder(style: str, corpus: Path, folder: Path) -> Path:
    """Train, then write ``folder/tokenizer.json`` and ``folder/tokenizer_config.json``; returns ``folder``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    _, ignore_merges, _ = STYLES[style]
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = hf_pre_tokenizer(style)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train([str(corpus)], trainer)
    document = json.loads(hf.to_str())
    model = document["model"]
    model["ignore_merges"] = ignore_merges
    next_id = max(model["vocab"].values()) + 1
    for word in UNREACHABLE_WORDS:
        spelled = encode_gpt2_token(word.encode("utf-8"))
        if spelled not in model["vocab"]:
            model["vocab"][spelled] = next_id
            next_id += 1
    hf = Tokenizer.from_str(json.dumps(document))
    hf.add_tokens([USER])  # an added token that is not special; HF numbers it after the vocabulary
    bos_id = hf.token_to_id(BOS)
    hf.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    document = json.loads(hf.to_str())
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(document, ensure_ascii=False), encoding="utf-8")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": {"content": EOS, "lstrip": False, "rstrip": False, "normalized": False, "special": True},
        "add_bos_token": True,
        "clean_up_tokenization_spaces": False,
        "chat_template": "{{ never run }}",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def _token_content(token) -> str | None:
    return token["content"] if isinstance(token, dict) else token


def write_gguf_tokenizer(hf_folder: Path, path: Path, pre: str, arch: str = "llama", **overrides) -> Path:
    """The tokenizer of ``hf_folder`` as llama.cpp writes GGUF metadata, into a small .gguf file.

    ``overrides`` replace fields by key suffix (``model="llama"``), or drop
    them when None.
    """
    import gguf
    import numpy as np

    document = json.loads((hf_folder / "tokenizer.json").read_text(encoding="utf-8"))
    config = json.loads((hf_folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    spelled = {token_id: token for token, token_id in document["model"]["vocab"].items()}
    types = {token_id: 1 for token_id in spelled}
    for entry in document["added_tokens"]:
        spelled[entry["id"]] = entry["content"]
        types[entry["id"]] = 3 if entry["special"] else 4  # control / user-defined
    count = max(spelled) + 1
    assert sorted(spelled) == list(range(count)), "GGUF ids are list positions: no gaps"
    ids = {token: token_id for token_id, token in spelled.items()}
    merges = [m if isinstance(m, str) else " ".join(m) for m in document["model"]["merges"]]
    fields = {
        "model": "gpt2",
        "pre": pre,
        "tokens": [spelled[i] for i in range(count)],
        "token_type": [types[i] for i in range(count)],
        "merges": merges,
        "bos_token_id": ids.get(_token_content(config.get("bos_token"))),
        "eos_token_id": ids.get(_token_content(config.get("eos_token"))),
        "add_bos_token": True,
    } | overrides
    return write_gguf_metadata(fields, path, arch)


def write_gguf_metadata(fields: dict, path: Path, arch: str) -> Path:
    """A small .gguf holding ``fields`` (``tokenizer.ggml.*`` keys by their last part; None: left out)
    and one tensor, written with llama.cpp's gguf writer."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch=arch)
    adders = {
        "model": writer.add_tokenizer_model,
        "pre": writer.add_tokenizer_pre,
        "tokens": writer.add_token_list,
        "scores": writer.add_token_scores,
        "token_type": writer.add_token_types,
        "merges": writer.add_token_merges,
        "bos_token_id": writer.add_bos_token_id,
        "eos_token_id": writer.add_eos_token_id,
        "unknown_token_id": writer.add_unk_token_id,
        "padding_token_id": writer.add_pad_token_id,
        "add_space_prefix": writer.add_add_space_prefix,
        "add_bos_token": writer.add_add_bos_token,
        "add_eos_token": writer.add_add_eos_token,
    }
    for name, value in fields.items():
        if value is not None:
            adders[name](value)
    # A model file always has tensors; one tiny one makes this a realistic file.
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
