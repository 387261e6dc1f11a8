"""What a stated size may cost, and the model-level checks on bad input.

RoPE tables grow with the positions used (a context of 10**12 costs
nothing until used, and the rows are the values a whole table would hold);
a config stating more layers than the file holds is refused before its
weight list is built; targets outside the vocabulary and empty batches are
refused on every loss backend; sampling never picks an id the tokenizer lacks.
"""

from __future__ import annotations

import math

import pytest
import torch

import scratchlm.model.layers as layers
from scratchlm.model import ModelConfig, TransformerLM, decode, generate_ids, sample_next_token
from scratchlm.model.backends import KernelsUnavailableError, resolve_kernels
from scratchlm.model.devices import check_device
from scratchlm.model.generation import tokenizer_ids_mask
from scratchlm.model.layers import RotaryPositionEmbedding, rope_frequencies
from scratchlm.model.weight_loading import PretrainedFormatError, check_plan, expected_shapes

LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
SHAPE = dict(vocab_size=61, d_model=32, num_layers=2, num_heads=4, d_ff=48)


def whole_table(theta: float, d_k: int, positions: int, dtype: torch.dtype, scaling=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The tables as the module built them before they grew lazily: every position at once."""
    angles = torch.outer(torch.arange(positions, dtype=torch.float64), rope_frequencies(theta, d_k, scaling))
    return torch.cos(angles).to(dtype), torch.sin(angles).to(dtype)


# ---- RoPE tables grow with the positions used ---------------------------------------


def test_a_huge_stated_context_builds_small_tables():
    rope = RotaryPositionEmbedding(10000.0, 16, 10**12)
    assert rope.num_positions == layers.INITIAL_ROPE_POSITIONS
    assert rope.cos.numel() == layers.INITIAL_ROPE_POSITIONS * 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("scaling", [None, LLAMA3], ids=["plain", "llama3"])
def test_grown_tables_equal_the_whole_table(monkeypatch, dtype, scaling):
    monkeypatch.setattr(layers, "INITIAL_ROPE_POSITIONS", 8)
    rope = RotaryPositionEmbedding(500000.0, 16, 10**9, dtype=dtype, scaling=scaling)
    x = torch.randn(1, 2, 3, 16, dtype=dtype)
    rope(x, torch.tensor([[[0, 9, 20]]]))  # grows to max(21, 2 * 8) rows
    assert rope.num_positions == 21
    rope(x, torch.tensor([[[1, 2, 1000]]]))
    assert rope.num_positions == 1001
    cos, sin = whole_table(500000.0, 16, 1001, dtype, scaling)
    assert torch.equal(rope.cos, cos) and torch.equal(rope.sin, sin)


def test_tables_grown_after_a_dtype_change_equal_the_converted_whole_table(monkeypatch):
    monkeypatch.setattr(layers, "INITIAL_ROPE_POSITIONS", 4)
    rope = RotaryPositionEmbedding(10000.0, 8, 100).to(torch.float64)
    rope.reserve(50)
    cos, sin = whole_table(10000.0, 8, 50, torch.float32)  # built in float32, then converted
    assert torch.equal(rope.cos, cos.double()) and torch.equal(rope.sin, sin.double())


def test_tables_stop_at_max_seq_len(monkeypatch):
    monkeypatch.setattr(layers, "INITIAL_ROPE_POSITIONS", 4)
    rope = RotaryPositionEmbedding(10000.0, 8, 10)
    rope.reserve(6)
    assert rope.num_positions == 8  # doubled
    rope.reserve(9)
    assert rope.num_positions == 10  # doubling capped at max_seq_len
    with pytest.raises(ValueError, match="position 10; expected positions below max_seq_len=10"):
        rope.reserve(11)


def tiny_pair(monkeypatch, context_length: int = 64, **overrides) -> tuple[TransformerLM, TransformerLM]:
    """(model with whole tables, the same weights with tables that start at 8 positions)."""
    config = ModelConfig(**SHAPE, context_length=context_length, rope_scaling=LLAMA3, **overrides)
    monkeypatch.setattr(layers, "INITIAL_ROPE_POSITIONS", context_length)
    whole = TransformerLM(config, kernels="reference")
    monkeypatch.setattr(layers, "INITIAL_ROPE_POSITIONS", 8)
    lazy = TransformerLM(config, kernels="reference")
    lazy.load_state_dict(whole.state_dict())
    assert lazy.layers[0].attn.rope.num_positions == 8 and whole.layers[0].attn.rope.num_positions == context_length
    return whole, lazy


def test_model_logits_and_generation_are_unchanged_by_lazy_tables(monkeypatch):
    whole, lazy = tiny_pair(monkeypatch)
    ids = torch.randint(0, SHAPE["vocab_size"], (2, 40))
    assert torch.equal(lazy(ids), whole(ids))
    # With a KV cache the tables grow one new position at a time, across several doublings.
    whole, lazy = tiny_pair(monkeypatch)
    lazy_steps = list(generate_ids(lazy, [[1, 2, 3]], 50, temperature=0))
    assert lazy_steps == list(generate_ids(whole, [[1, 2, 3]], 50, temperature=0))
    assert lazy.layers[1].attn.rope.num_positions == 64  # every layer shares the one grown table


def test_a_model_with_a_huge_context_is_small_and_runs():
    model = TransformerLM(ModelConfig(**SHAPE, context_length=10**12), kernels="reference")
    table_bytes = sum(buffer.numel() * buffer.element_size() for buffer in model.buffers())
    assert table_bytes <= 2 * layers.INITIAL_ROPE_POSITIONS * 4 * 4  # two (4096, head_dim/2) float32 tables
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, SHAPE["vocab_size"])


@pytest.mark.slow
def test_tables_grow_under_torch_compile(monkeypatch):
    whole, lazy = tiny_pair(monkeypatch, context_length=32)
    compiled = torch.compile(lazy, backend="aot_eager")
    ids = torch.randint(0, SHAPE["vocab_size"], (2, 24))
    assert torch.allclose(compiled(ids), whole(ids), atol=1e-6, rtol=1e-6)
    assert lazy.layers[0].attn.rope.num_positions == 24


# ---- fields that size an allocation are checked against the file first -------------------


def test_a_config_stating_absurdly_many_layers_is_refused_before_listing_them():
    real = ModelConfig(**SHAPE, context_length=16)
    plan = {name: (name, shape) for name, shape in expected_shapes(real).items()}
    stated = ModelConfig(**{**SHAPE, "num_layers": 10**12}, context_length=16)
    with pytest.raises(PretrainedFormatError, match="states 1000000000000 layers but holds tensors for 2"):
        check_plan(plan, stated, "'model'")


# ---- targets and empty batches ------------------------------------------------------


def loss_backends() -> list[str]:
    usable = ["reference", "torch"]
    try:
        resolve_kernels({"loss": "triton"}, "cpu")
        usable.append("triton")
    except KernelsUnavailableError:
        pass
    return usable


@pytest.mark.parametrize("backend", loss_backends())
def test_targets_outside_the_vocabulary_are_refused_on_every_loss_backend(backend):
    model = TransformerLM(ModelConfig(**SHAPE, context_length=16), kernels={"loss": backend})
    ids = torch.randint(0, SHAPE["vocab_size"], (2, 5))
    for bad in (SHAPE["vocab_size"], -3):
        targets = ids.clone()
        targets[1, 2] = bad
        expected = rf"targets contains id {bad}; expected ids in \[0, vocab_size=61\) or ignore_index=-100"
        with pytest.raises(ValueError, match=expected):
            model.loss(ids, targets)
    targets = ids.clone()
    targets[0, :3] = -100  # ignore_index is allowed
    assert math.isfinite(model.loss(ids, targets).item())
    with pytest.raises(ValueError, match="targets has type torch.float32"):
        model.loss(ids, ids.float())


def test_an_empty_batch_is_refused_by_name():
    model = TransformerLM(ModelConfig(**SHAPE, context_length=16), kernels="reference")
    empty = torch.zeros(0, 5, dtype=torch.long)
    with pytest.raises(ValueError, match=r"token_ids has shape \(0, 5\), an empty batch; expected at least one sequence"):
        model(empty)
    with pytest.raises(ValueError, match="an empty batch"):
        model.loss(empty, empty)


# ---- sampling never picks an id the tokenizer lacks ---------------------------------------


def test_the_mask_holds_on_every_sampling_path():
    logits = torch.tensor([[0.0, 1.0, 50.0, 2.0], [9.0, 0.0, 50.0, 49.0]])
    allowed = torch.tensor([True, True, False, True])
    assert sample_next_token(logits, 0, allowed=allowed).tolist() == [3, 3]  # greedy: the best allowed id
    generator = torch.Generator().manual_seed(0)
    for temperature, top_p in [(1.0, 1.0), (5.0, 1.0), (1.0, 0.5), (100.0, 0.99)]:
        picks = torch.stack([sample_next_token(logits, temperature, top_p, generator, allowed=allowed) for _ in range(200)])
        assert not (picks == 2).any(), (temperature, top_p)
    # Without the mask, id 2 is what greedy takes: the test above can fail.
    assert sample_next_token(logits, 0).tolist() == [2, 2]


class SparseTokenizer:
    """Ids 0..9 and 12 (11 is a hole); what generation reads from a tokenizer."""

    special_token_ids: dict[str, int] = {}
    vocab = {**{i: bytes([97 + i]) for i in range(10)}, 12: b"!"}

    def encode(self, text: str) -> list[int]:
        return [ord(c) - 97 for c in text]

    def decode_bytes(self, ids: list[int]) -> bytes:
        return b"".join(self.vocab[i] for i in ids)  # KeyError for an id it lacks

    def decode(self, ids: list[int]) -> str:
        return self.decode_bytes(ids).decode()


def test_mask_of_a_sparse_tokenizer_and_of_a_complete_one():
    mask = tokenizer_ids_mask(SparseTokenizer(), 16)
    assert mask.tolist() == [True] * 10 + [False, False, True, False, False, False]
    complete = SparseTokenizer()
    complete.vocab = {i: b"x" for i in range(16)}
    assert tokenizer_ids_mask(complete, 16) is None


def test_a_tokenizer_larger_than_the_model_is_refused_naming_both_sizes():
    model = TransformerLM(ModelConfig(**{**SHAPE, "vocab_size": 12}, context_length=16), kernels="reference")
    with pytest.raises(ValueError, match=r"tokenizer has ids up to 12 \(vocab_size 13\) but the model embeds only 12 ids"):
        decode(model, SparseTokenizer(), "abc", max_tokens=3)


def test_a_padded_embedding_never_yields_an_id_the_tokenizer_lacks():
    model = TransformerLM(ModelConfig(**{**SHAPE, "vocab_size": 20}, context_length=64), kernels="reference")
    with torch.no_grad():
        # The rows the tokenizer lacks get the largest logits: +/- a big multiple of one hidden direction.
        model.lm_head.weight[10:12] = 0
        model.lm_head.weight[10, 0], model.lm_head.weight[11, 0] = 1000.0, -1000.0
    text = decode(model, SparseTokenizer(), "abc", max_tokens=30, temperature=0)
    assert len(text) == 30 and set(text) <= set("abcdefghij!")


# ---- devices ---------------------------------------------------------------------------


def test_a_missing_cuda_device_is_named_with_what_the_machine_has():
    with pytest.raises(ValueError, match=r"--device='cuda:99': cuda:99 is not available; this machine has"):
        check_device("cuda:99", "--device")
    with pytest.raises(ValueError, match="is not a device name"):
        check_device("gpu0", "--device")
    assert check_device("cpu") == torch.device("cpu")
