"""Mistral's tekken (Mistral Nemo): a tokenizer.json of its structure, trained by HF, loads with HF's ids.

The structure, written here by hand from the published file: no normalizer;
pre-tokenizer a Sequence of Split(tekken's regex, Isolated) and ByteLevel
without a regex; ByteLevel decoder; a BPE model; a template putting ``<s>``
first; control tokens ``<unk>``, ``<s>``, ``</s>``, ``[INST]``, ``[/INST]``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scratchlm.tokenizer import PRETOKENIZERS, Tokenizer

from conftest import SHARED_DATA
from hf_trained_tokenizers import SYNTHETIC

tokenizers = pytest.importorskip("tokenizers")

SPECIALS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"]
EDGES = [
    "", " ", "  ", "\n", "\r\n", "\n\n", " \n", "\t", "camelCaseWords HTTPServer", "x = 12345;", "a.\n/b",
    "emoji \U0001f600 CJK \u4e2d\u6587", "caf\u00e9 e\u0301", "[INST] hi [/INST]", "</s><s>", "trailing  ",
]


@pytest.fixture(scope="module")
def tekken_folder(tmp_path_factory) -> Path:
    from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers

    folder = tmp_path_factory.mktemp("tekken")
    corpus = folder / "corpus.txt"
    if SHARED_DATA.is_dir():
        text = (SHARED_DATA / "python-docs.txt").read_bytes()[:150_000].decode("utf-8", errors="ignore")
        text += (SHARED_DATA / "multilingual.txt").read_bytes()[:40_000].decode("utf-8", errors="ignore")
    else:
        text = SYNTHETIC
    corpus.write_text(text, encoding="utf-8")
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZERS["tekken"].splits[0]), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1200, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train([str(corpus)], trainer)
    hf.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", hf.token_to_id("<s>"))]
    )
    hf.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "add_bos_token": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    (folder / "corpus.txt").write_text(text, encoding="utf-8")
    return folder


def test_tekken_file_gives_hfs_ids(tekken_folder, tmp_path):
    hf = tokenizers.Tokenizer.from_file(str(tekken_folder / "tokenizer.json"))
    ours = Tokenizer.from_hf(tekken_folder)
    assert (ours.pretokenizer, ours.bos_id, ours.add_bos) == ("tekken", hf.token_to_id("<s>"), True)
    text = (tekken_folder / "corpus.txt").read_text(encoding="utf-8")
    for sample in EDGES + [text[i:i + 3000] for i in range(0, len(text), len(text) // 6)]:
        assert ours.encode(sample) == hf.encode(sample, add_special_tokens=False).ids, sample[:80]
        assert ours.encode(sample, add_special_tokens=True) == hf.encode(sample).ids
        assert ours.decode(ours.encode(sample)) == hf.decode(hf.encode(sample).ids, skip_special_tokens=False)[
            len("<s>"):
        ]
    exported = tokenizers.Tokenizer.from_file(str(ours.save_hf(tmp_path / "tokenizer.json")))
    assert exported.encode(text[:20000]).ids == hf.encode(text[:20000]).ids
    assert Tokenizer.load(ours.save(tmp_path / "t.json")).encode(text[:20000]) == ours.encode(text[:20000])


def test_cli_tokenize_reads_a_tekken_folder_and_file(tekken_folder, tmp_path):
    import numpy as np

    from scratchlm.cli import main

    hf = tokenizers.Tokenizer.from_file(str(tekken_folder / "tokenizer.json"))
    text = (tekken_folder / "corpus.txt").read_text(encoding="utf-8")[:5000]
    (tmp_path / "in.txt").write_text(text, encoding="utf-8")
    for index, source in enumerate((tekken_folder, tekken_folder / "tokenizer.json")):
        output = tmp_path / f"out{index}.npy"
        argv = ["tokenize", "--tokenizer", str(source), "--input", str(tmp_path / "in.txt"), "--output", str(output)]
        assert main(argv) == 0
        assert np.load(output).tolist() == hf.encode(text, add_special_tokens=False).ids
