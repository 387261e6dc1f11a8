"""SentencePiece BPE models trained by the real ``sentencepiece`` library: our ids equal its own.

Each model goes to the Tokenizer as llama.cpp's ``convert_hf_to_gguf.py``
writes an SPM vocabulary into GGUF (``_create_vocab_sentencepiece``): every
piece in id order, its score, and its type from the processor (unknown,
control, unused, byte, else normal; user-defined pieces from the model
proto), ``add_space_prefix`` from the normalizer's ``add_dummy_prefix``.

The models are trained as Llama 2's was: normalization ``identity`` and
``remove_extra_whitespaces`` false. llama.cpp (and HF's converted
tokenizer.json) apply neither sentencepiece's default ``nmt_nfkc`` rules nor
its whitespace folding, so with sentencepiece's defaults the ids differ
wherever those change the text (runs of spaces, leading/trailing spaces,
tabs, NFKC-changed characters): there sentencepiece is not reproduced.

User-defined symbols differ too: sentencepiece finds them inside the
normalized text (one ``▁`` put first in the whole text, so
``"<mask> x"`` is ``▁ <mask> ▁x``), while llama.cpp splits them off
first and puts a ``▁`` first in each text after one (``<mask> ▁▁x``),
as the Tokenizer does; texts holding them are left out of the comparison.
"""

from __future__ import annotations

import pytest

from scratchlm.tokenizer import Tokenizer

from sentencepiece_files import SYNTHETIC

spm = pytest.importorskip(
    "sentencepiece", reason="the real sentencepiece library is not installed (pip install sentencepiece)"
)
model_pb2 = pytest.importorskip(
    "sentencepiece.sentencepiece_model_pb2", reason="sentencepiece's model proto needs protobuf"
)

# llama.cpp's SentencePieceTokenTypes
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

CONFIGS = {
    "byte-fallback": dict(byte_fallback=True),
    "no-byte-fallback": dict(byte_fallback=False),
    "no-dummy-prefix": dict(byte_fallback=True, add_dummy_prefix=False),
    "split-digits": dict(byte_fallback=True, split_digits=True),
    "user-symbols": dict(byte_fallback=True, user_defined_symbols=["<mask>", "[INST]"]),
}

TEXTS = [
    "", " ", "  ", "hello world", " leading space", "trailing  ", "a\nb", "tab\there", "digits 12345 and 3.14",
    "emoji \U0001f600 and CJK \u4e2d\u6587\u5b57", "<mask> x [INST] y", "mixed\u00e9 caf\u00e9", SYNTHETIC[:2000],
]


def _corpus() -> list[str]:
    return [line for line in SYNTHETIC.splitlines() if line.strip()] * 2


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def trained(request, tmp_path_factory):
    """(processor, model proto) of a small BPE model trained with one configuration."""
    import io

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()), model_writer=model, model_type="bpe", vocab_size=400,
        character_coverage=1.0, hard_vocab_limit=False, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
        minloglevel=2, normalization_rule_name="identity", remove_extra_whitespaces=False, **CONFIGS[request.param],
    )
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    proto = model_pb2.ModelProto()
    proto.ParseFromString(model.getvalue())
    return request.param, processor, proto


def gguf_fields(processor, proto) -> dict:
    """The tokenizer fields llama.cpp's converter writes for this model."""
    tokens, scores, types = [], [], []
    for token_id in range(processor.vocab_size()):
        tokens.append(processor.IdToPiece(token_id))
        scores.append(processor.GetScore(token_id))
        if processor.IsUnknown(token_id):
            kind = UNKNOWN
        elif processor.IsControl(token_id):
            kind = CONTROL
        elif processor.IsUnused(token_id):
            kind = UNUSED
        elif processor.IsByte(token_id):
            kind = BYTE
        elif proto.pieces[token_id].type == model_pb2.ModelProto.SentencePiece.USER_DEFINED:
            kind = USER_DEFINED
        else:
            kind = NORMAL
        types.append(kind)
    fields = {
        "model": "llama", "tokens": tokens, "scores": scores, "token_type": types,
        "bos_token_id": processor.bos_id(), "eos_token_id": processor.eos_id(), "unknown_token_id": processor.unk_id(),
        "add_space_prefix": proto.normalizer_spec.add_dummy_prefix,
    }
    return {"tokenizer.ggml." + key: value for key, value in fields.items()}


def test_gguf_written_as_llama_cpp_writes_it_gives_sentencepieces_ids(trained):
    name, processor, proto = trained
    ours = Tokenizer.from_gguf_fields(gguf_fields(processor, proto))
    differ = []
    symbols = CONFIGS[name].get("user_defined_symbols", [])
    for text in TEXTS:
        if any(symbol in text for symbol in symbols):
            continue
        expected = processor.encode(text)
        if ours.encode(text) != expected:
            differ.append((text, ours.encode(text), expected))
    assert not differ, f"{name}: {differ[:3]}"


def test_tokenizer_json_converted_as_transformers_converts_gives_sentencepieces_ids(trained, tmp_path):
    """The route of transformers' LlamaConverter: its SentencePieceExtractor's vocab and merges, Llama 2's form."""
    import sentencepiece_files
    from tokenizers.models import BPE
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    name, processor, proto = trained
    (tmp_path / "t.model").write_bytes(proto.SerializeToString())
    extracted = SentencePieceExtractor(str(tmp_path / "t.model")).extract(BPE)
    form = "llama2-legacy" if proto.normalizer_spec.add_dummy_prefix else "gemma"
    hf = sentencepiece_files.build_hf(
        extracted["vocab"], [list(pair) for pair in extracted["merges"]], form,
        byte_fallback=proto.trainer_spec.byte_fallback,
    )
    # User-defined symbols are added tokens that are not special, as the extractor marks them.
    hf.add_tokens([token for token in extracted["additional_special_tokens"] if not token.special])
    ours = Tokenizer.from_hf(sentencepiece_files.write_folder(hf, tmp_path / "folder"))
    symbols = CONFIGS[name].get("user_defined_symbols", [])
    for text in TEXTS:
        theirs = hf.encode(text, add_special_tokens=False).ids
        assert ours.encode(text) == theirs, text
        if not any(symbol in text for symbol in symbols):
            assert theirs == processor.encode(text), text
