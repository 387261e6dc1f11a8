"""load_pretrained on llama.cpp GGUF files: parity with transformers reading the same file, and every refusal.

transformers' GGUF loader is an independent reader of the layout (it undoes
llama.cpp's q/k permutation into its own rotate_half order and dequantises
with its own code), so equal logits prove our reading of names, shapes, row
order and block formats.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import assert_close
from llama_fixtures import (
    LLAMA3_SCALING,
    SAMPLE_TEXT,
    TOKENIZER,
    VOCAB_SIZE,
    dequantized_state,
    hf_llama,
    llama_cpp_rope_factors,
    write_gguf,
)

import scratchlm.model.gguf_checkpoint as gguf_checkpoint
from scratchlm.model import PretrainedFormatError, load_pretrained
from scratchlm.model.gguf_rope import llama3_factors, llama3_scaling_from_factors
from scratchlm.model.pretrained import read_pretrained_config

gguf = pytest.importorskip("gguf", reason="the gguf package writes the test files")
transformers = pytest.importorskip("transformers")

ATOL, RTOL = 1e-4, 1e-4
QTYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q5_1"]


@pytest.fixture(scope="module")
def gqa_model():
    return hf_llama(seed=3, num_key_value_heads=2)


@pytest.fixture(scope="module")
def gguf_files(gqa_model, tmp_path_factory):
    """{qtype: path} of the GQA model written in every tested type, in one folder."""
    folder = tmp_path_factory.mktemp("gguf")
    return {qtype: write_gguf(gqa_model, folder / f"tiny-{qtype}.gguf", qtype) for qtype in QTYPES}


def token_ids(seq: int = 24, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB_SIZE, (batch, seq), generator=torch.Generator().manual_seed(5))


def logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return getattr(out, "logits", out)


def transformers_from_gguf(path):
    pytest.importorskip("accelerate", reason="transformers reads GGUF weights only with accelerate installed")
    return transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()


@pytest.mark.parametrize("qtype", QTYPES)
def test_logits_match_transformers_reading_the_same_file(gguf_files, qtype):
    path = gguf_files[qtype]
    model, _ = load_pretrained(path, kernels="reference", device="cpu", dtype=torch.float32)
    ids = token_ids()
    assert_close(logits(model, ids), logits(transformers_from_gguf(path), ids), atol=ATOL, rtol=RTOL, name=qtype)


@pytest.mark.parametrize("qtype", ["F32", "Q4_0"])
def test_weights_are_the_dequantised_values_in_pytorch_order(gqa_model, gguf_files, qtype):
    """Independent of transformers: logits of the HF model holding the same rounded weights."""
    model, _ = load_pretrained(gguf_files[qtype], kernels="torch", device="cpu")
    rounded = hf_llama(seed=3, num_key_value_heads=2)
    rounded.load_state_dict(dequantized_state(gqa_model, qtype))
    ids = token_ids()
    assert_close(logits(model, ids), logits(rounded, ids), atol=ATOL, rtol=RTOL, name=f"{qtype} vs rounded HF")


def test_read_pretrained_config_matches_the_loaded_model(gguf_files, no_weights_read):
    config = read_pretrained_config(gguf_files["Q4_0"])
    assert (config.d_model, config.num_kv_heads, config.vocab_size, config.norm_eps) == (64, 2, VOCAB_SIZE, 1e-5)


def test_default_dtype_is_the_files_float_type_or_float32(gguf_files):
    expected = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "Q8_0": torch.float32}
    for qtype, dtype in expected.items():
        model, _ = load_pretrained(gguf_files[qtype], kernels="reference", device="cpu")
        assert {p.dtype for p in model.parameters()} == {dtype}, qtype


@pytest.mark.parametrize(
    "kwargs",
    [dict(num_key_value_heads=1, tie_word_embeddings=True), dict(num_key_value_heads=4, rope_theta=500000.0)],
    ids=["mqa-tied", "mha-theta5e5"],
)
def test_tied_mqa_and_theta_variants(kwargs, tmp_path):
    hf_model = hf_llama(seed=4, **kwargs)
    path = write_gguf(hf_model, tmp_path / "variant.gguf", "F32")
    model, _ = load_pretrained(path, kernels="torch", device="cpu")
    assert model.config.tie_embeddings == hf_model.config.tie_word_embeddings
    assert model.config.num_kv_heads == hf_model.config.num_key_value_heads
    ids = token_ids()
    assert_close(logits(model, ids), logits(hf_model, ids), atol=ATOL, rtol=RTOL, name="variant")
    assert_close(logits(model, ids), logits(transformers_from_gguf(path), ids), atol=ATOL, rtol=RTOL, name="hf-gguf")


def test_triton_kernels_on_a_gguf_model(gguf_files, gqa_model):
    model, _ = load_pretrained(gguf_files["F32"], kernels="triton", device="cpu")
    ids = token_ids(seq=8, batch=1)
    assert_close(logits(model, ids), logits(gqa_model, ids), atol=ATOL, rtol=RTOL, name="triton")


def test_tokenizer_comes_from_the_metadata(gguf_files):
    _, tokenizer = load_pretrained(gguf_files["Q8_0"], kernels="reference", device="cpu")
    assert tokenizer.encode(SAMPLE_TEXT) == TOKENIZER.encode(SAMPLE_TEXT)
    assert (tokenizer.bos_id, tokenizer.eos_id) == (TOKENIZER.bos_id, TOKENIZER.eos_id)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_files["Q8_0"].parent, gguf_file="tiny-Q8_0.gguf")
    assert hf_tokenizer(SAMPLE_TEXT)["input_ids"] == tokenizer.encode(SAMPLE_TEXT)


def test_no_tokenizer_metadata_gives_none(gqa_model, tmp_path):
    path = write_gguf(gqa_model, tmp_path / "bare.gguf", "F32", tokenizer=None)
    assert load_pretrained(path, kernels="reference", device="cpu")[1] is None


def test_a_tokenizer_scratchlm_cannot_build_is_refused_before_the_weights(gqa_model, tmp_path, monkeypatch):
    """A Unigram ("t5") vocabulary, which scratchlm does not read; tokenizer=False still gives the weights."""
    path = tmp_path / "unigram.gguf"
    write_gguf(gqa_model, path, "F32", tokenizer=None, extra_metadata={"tokenizer.ggml.model": "t5"})
    with monkeypatch.context() as patch:
        patch.setattr(gguf_checkpoint, "allocate", lambda *args: pytest.fail("weights were read"))
        with pytest.raises(ValueError, match="tokenizer.ggml.model"):
            load_pretrained(path, kernels="reference", device="cpu")
    model, tokenizer = load_pretrained(path, kernels="reference", device="cpu", tokenizer=False)
    assert tokenizer is None and model.config.vocab_size == VOCAB_SIZE


# ---- Llama 3.1 rope scaling: rope_freqs.weight ---------------------------------


@pytest.mark.parametrize(
    "scaling, theta",
    [
        (LLAMA3_SCALING, 10000.0),  # one pair in the smooth band: parameters re-chosen, same factors
        ({**LLAMA3_SCALING, "high_freq_factor": 16.0, "original_max_position_embeddings": 256}, 10000.0),
    ],
    ids=["one-smooth-pair", "fitted-band"],
)
def test_llama3_rope_factors_give_the_scaled_model(scaling, theta, tmp_path):
    hf_model = hf_llama(seed=6, rope_scaling=scaling, rope_theta=theta)
    path = write_gguf(hf_model, tmp_path / "llama3.gguf", "F32")
    model, _ = load_pretrained(path, kernels="reference", device="cpu")
    assert model.config.rope_scaling["rope_type"] == "llama3"
    ids = token_ids(seq=48)
    assert_close(logits(model, ids), logits(hf_model, ids), atol=ATOL, rtol=RTOL, name="llama3 gguf")


def test_llama3_parameters_of_llama_3_2_are_recovered_exactly():
    """Head dim 64, theta 5e5, factor 32 (Llama 3.2 1B): many smooth pairs, the exact config back."""
    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}  # fmt: skip
    factors = llama_cpp_rope_factors(scaling, 500000.0, 64)
    assert llama3_scaling_from_factors(factors, 500000.0, 64, None, "f") == scaling
    # And an unusual band is fitted: same factors from other numbers.
    odd = {**scaling, "low_freq_factor": 2.0, "high_freq_factor": 64.0}
    recovered = llama3_scaling_from_factors(llama_cpp_rope_factors(odd, 500000.0, 64), 500000.0, 64, None, "f")
    assert recovered["low_freq_factor"] == pytest.approx(2.0, rel=1e-3)
    assert recovered["high_freq_factor"] == pytest.approx(64.0, rel=1e-3)
    assert np.allclose(llama3_factors(recovered, 500000.0, 64), llama3_factors(odd, 500000.0, 64), rtol=1e-5)


def test_rope_freqs_that_are_not_llama3_are_refused(gqa_model, tmp_path):
    factors = np.linspace(1.0, 3.0, 8, dtype=np.float32)[::-1].copy()  # decreasing: no llama3 band does that
    path = write_gguf(gqa_model, tmp_path / "odd-rope.gguf", "F32", extra_tensors={"rope_freqs.weight": factors})
    with pytest.raises(PretrainedFormatError, match="rope_freqs.weight .* is not Llama 3.1 rope scaling"):
        load_pretrained(path, device="cpu")


def test_rope_freqs_all_one_is_plain_rope(gqa_model, tmp_path):
    ones = np.ones(8, dtype=np.float32)
    path = write_gguf(gqa_model, tmp_path / "ones.gguf", "F32", extra_tensors={"rope_freqs.weight": ones})
    model, _ = load_pretrained(path, kernels="reference", device="cpu")
    assert model.config.rope_scaling is None


# ---- refusals ------------------------------------------------------------------


@pytest.fixture
def no_weights_read(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the model was allocated before the refusal")

    monkeypatch.setattr(gguf_checkpoint, "allocate", fail)


@pytest.mark.parametrize(
    "metadata, message",
    [
        ({"general.architecture": "gemma"}, "general.architecture='gemma'"),
        ({"llama.rope.dimension_count": 8}, "llama.rope.dimension_count=8"),
        ({"llama.attention.key_length": 32}, "llama.attention.key_length=32"),
        ({"llama.expert_count": 8}, "llama.expert_count=8"),
        ({"llama.rope.scaling.type": "yarn"}, "llama.rope.scaling.type='yarn'"),
        ({"llama.vocab_size": 300}, "llama.vocab_size=300"),
        ({"split.count": 3}, "split.count=3"),
    ],
)
def test_unsupported_metadata_is_refused(gqa_model, tmp_path, no_weights_read, metadata, message):
    if "general.architecture" in metadata:
        # GGUFWriter writes the architecture itself; a second key would be a duplicate.
        path = write_gguf(gqa_model, tmp_path / "bad.gguf", "F32")
        data = path.read_bytes().replace(b"llama", b"gemma", 1)
        path.write_bytes(data)
    else:
        path = write_gguf(gqa_model, tmp_path / "bad.gguf", "F32", extra_metadata=metadata)
    with pytest.raises(PretrainedFormatError, match=message.replace(".", r"\.")):
        load_pretrained(path, device="cpu")


def test_tensor_type_that_cannot_be_dequantised_is_refused(gqa_model, tmp_path, no_weights_read):
    """Q8_1 exists in ggml but the gguf package cannot dequantise it: refused by name, before reading."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_1]
    raw = np.zeros((96, 64 // block_size * type_size), dtype=np.uint8)
    path = write_gguf(
        gqa_model, tmp_path / "q8_1.gguf", "F32", skip=("blk.0.ffn_up.weight",),
        extra_tensors={"blk.0.ffn_up.weight": (raw, gguf.GGMLQuantizationType.Q8_1)},
    )  # fmt: skip
    with pytest.raises(PretrainedFormatError, match="'blk.0.ffn_up.weight' as ggml type Q8_1"):
        load_pretrained(path, device="cpu")


def test_missing_and_extra_tensors_are_named(gqa_model, tmp_path, no_weights_read):
    path = write_gguf(gqa_model, tmp_path / "missing.gguf", "F32", skip=("blk.1.attn_v.weight",))
    with pytest.raises(PretrainedFormatError, match=r"lacks the tensor for 'layers\.1\.attn\.v_proj\.weight'"):
        load_pretrained(path, device="cpu")
    extra = {"blk.0.attn_q.bias": np.zeros(64, dtype=np.float32)}
    path = write_gguf(gqa_model, tmp_path / "extra.gguf", "F32", extra_tensors=extra)
    with pytest.raises(PretrainedFormatError, match=r"tensor 'blk\.0\.attn_q\.bias'"):
        load_pretrained(path, device="cpu")


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.01])
def test_truncated_file_names_the_path(gguf_files, tmp_path, keep):
    data = gguf_files["Q4_0"].read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: math.floor(len(data) * keep)])
    with pytest.raises(PretrainedFormatError, match="cut.gguf.*(truncated|not a readable GGUF)"):
        load_pretrained(path, device="cpu")
