"""decode / stream / sampling, with a byte-level tokenizer stand-in and scripted models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scratchlm.model import KVCache, ModelConfig, TransformerLM, decode, generate_ids, sample_next_token, stream

EOT = "<|endoftext|>"
EOT_ID = 256
VOCAB = 257


class ByteTokenizer:
    """Ids 0..255 are the bytes, 256 is <|endoftext|>; the interface generation relies on."""

    special_token_ids = {EOT: EOT_ID}

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for index, part in enumerate(text.split(EOT)):
            if index:
                ids.append(EOT_ID)
            ids.extend(part.encode("utf-8"))
        return ids

    def decode_bytes(self, ids: list[int]) -> bytes:
        return b"".join(EOT.encode() if i == EOT_ID else bytes([i]) for i in ids)

    def decode(self, ids: list[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


class ScriptedLM(nn.Module):
    """A stand-in model whose next token is a fixed function of the last one.

    ``script`` maps a token to its successor; unscripted tokens are followed by
    <|endoftext|>. It records the length of every input it sees.
    """

    def __init__(self, script: dict[int, int], context_length: int = 16) -> None:
        super().__init__()
        self.config = ModelConfig(VOCAB, context_length, d_model=2, num_layers=1, num_heads=1, d_ff=2)
        self.table = torch.full((VOCAB,), EOT_ID, dtype=torch.long)
        for token, successor in script.items():
            self.table[token] = successor
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the model a device
        self.input_lengths: list[int] = []

    def new_kv_cache(self) -> KVCache:
        return KVCache(1)

    def forward(self, token_ids: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        self.input_lengths.append(token_ids.shape[-1] + (0 if kv_cache is None else kv_cache.length))
        if kv_cache is not None:
            placeholder = torch.zeros(*token_ids.shape, 1)
            kv_cache.layers[0].append(placeholder, placeholder)
        return F.one_hot(self.table[token_ids], VOCAB).float() * 20.0  # (batch, seq, vocab)


def successor_script(last: str) -> dict[int, int]:
    """Each byte is followed by the next one; ``last`` is followed by <|endoftext|>."""
    return {byte: byte + 1 for byte in range(255) if byte != ord(last)}


def tiny_lm(context_length: int = 24) -> TransformerLM:
    config = ModelConfig(VOCAB, context_length, d_model=32, num_layers=2, num_heads=4, d_ff=64)
    model = TransformerLM(config, kernels="reference")
    # Spread the logits so greedy choices are far from ties.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model


def argmax_rollout(model: TransformerLM, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """Greedy decoding the slow, obvious way: a full forward pass per token."""
    ids = list(prompt_ids)
    new: list[int] = []
    for _ in range(max_tokens):
        window = ids[-model.config.context_length :]
        next_id = int(model(torch.tensor([window]))[0, -1].argmax())
        new.append(next_id)
        ids.append(next_id)
        if next_id == EOT_ID:
            break
    return new


# ---- stopping, batching and windows with a scripted model ------------------------------


def test_stop_token_stops_and_is_not_returned():
    model = ScriptedLM(successor_script(last="d"))
    assert decode(model, ByteTokenizer(), "ab", max_tokens=10, temperature=0) == "cd"
    without_stop = decode(model, ByteTokenizer(), "ab", max_tokens=4, temperature=0, stop_token=None)
    assert without_stop.startswith("cd" + EOT)


def test_batch_stops_each_row_on_its_own():
    model = ScriptedLM(successor_script(last="d"))
    prompts = ["ab", "x", "hello w", "c", "zzd"]
    outputs = decode(model, ByteTokenizer(), prompts, max_tokens=4, temperature=0)
    assert outputs == ["cd", "yz{|", "xyz{", "d", ""]
    assert decode(model, ByteTokenizer(), [], max_tokens=4, temperature=0) == []


def test_max_tokens_zero_gives_empty_text():
    model = ScriptedLM(successor_script(last="d"))
    assert decode(model, ByteTokenizer(), "ab", max_tokens=0, temperature=0) == ""
    assert model.input_lengths == []


@pytest.mark.parametrize("use_kv_cache", [True, False])
def test_generation_past_the_context_slides_a_window(use_kv_cache):
    model = ScriptedLM(successor_script(last="~"), context_length=8)
    text = decode(model, ByteTokenizer(), "abcdef", max_tokens=12, temperature=0, use_kv_cache=use_kv_cache)
    assert text == "ghijklmnopqr"
    assert max(model.input_lengths) == 8


def test_stream_holds_back_incomplete_utf8():
    e_acute = "é".encode()  # two bytes, two tokens
    script = {ord("a"): e_acute[0], e_acute[0]: e_acute[1], e_acute[1]: ord("b")}
    model = ScriptedLM(script)
    pieces = list(stream(model, ByteTokenizer(), "a", max_tokens=10, temperature=0))
    assert pieces == ["é", "b"]
    assert "".join(pieces) == decode(model, ByteTokenizer(), "a", max_tokens=10, temperature=0)


def test_invalid_utf8_is_replaced_not_fatal():
    # 0xC3 starts a two-byte character that never completes.
    model = ScriptedLM({ord("a"): 0xC3, 0xC3: ord("b"), ord("b"): 0xC3})
    for max_tokens, expected in [(4, "\ufffdb\ufffdb"), (3, "\ufffdb\ufffd")]:
        assert decode(model, ByteTokenizer(), "a", max_tokens, temperature=0) == expected
        assert "".join(stream(model, ByteTokenizer(), "a", max_tokens, temperature=0)) == expected


# ---- a real (random) TransformerLM -------------------------------------------------


@pytest.mark.parametrize("use_kv_cache", [True, False])
def test_greedy_is_deterministic_and_equals_argmax_rollout(use_kv_cache):
    model = tiny_lm()
    tokenizer = ByteTokenizer()
    prompt_ids = tokenizer.encode("Once upon")
    expected = argmax_rollout(model, prompt_ids, max_tokens=30)  # runs past the 24-token context
    steps = generate_ids(model, [prompt_ids], 30, temperature=0, stop_id=EOT_ID, use_kv_cache=use_kv_cache)
    assert [step[0] for step in steps] == expected
    text = decode(model, tokenizer, "Once upon", 30, temperature=0, use_kv_cache=use_kv_cache)
    assert text == tokenizer.decode([i for i in expected if i != EOT_ID])
    assert decode(model, tokenizer, "Once upon", 30, temperature=0, use_kv_cache=use_kv_cache) == text


def test_tiny_top_p_equals_greedy():
    model = tiny_lm()
    greedy = decode(model, ByteTokenizer(), "The cat", 20, temperature=0)
    generator = torch.Generator().manual_seed(1)
    sampled = decode(model, ByteTokenizer(), "The cat", 20, temperature=1.0, top_p=1e-6, generator=generator)
    assert sampled == greedy


def test_sampling_is_reproducible_with_a_generator_and_differs_from_greedy():
    model = tiny_lm()
    tokenizer = ByteTokenizer()

    def sample(seed: int) -> str:
        return decode(model, tokenizer, "The cat", 20, temperature=2.0, generator=torch.Generator().manual_seed(seed))

    assert sample(3) == sample(3)
    assert len({sample(seed) for seed in range(4)}) > 1


def test_batch_of_prompts_equals_each_prompt_alone():
    model = tiny_lm()
    tokenizer = ByteTokenizer()
    prompts = ["a", "Once upon a time", "The cat sat", "x" * 24]
    batched = decode(model, tokenizer, prompts, 12, temperature=0)
    alone = [decode(model, tokenizer, prompt, 12, temperature=0) for prompt in prompts]
    assert batched == alone
    assert all(isinstance(text, str) for text in batched)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_stream_concatenation_equals_decode(temperature):
    model = tiny_lm()
    tokenizer = ByteTokenizer()
    pieces = list(stream(model, tokenizer, "Hi", 30, temperature, generator=torch.Generator().manual_seed(5)))
    whole = decode(model, tokenizer, "Hi", 30, temperature, generator=torch.Generator().manual_seed(5))
    assert len(pieces) > 1
    assert "".join(pieces) == whole


def test_prompt_longer_than_context_raises():
    model = tiny_lm(context_length=24)
    with pytest.raises(ValueError, match=r"prompt\[0\] encodes to 25 tokens.*context_length=24"):
        decode(model, ByteTokenizer(), "y" * 25, 5, temperature=0)
    with pytest.raises(ValueError, match=r"prompt\[1\] encodes to 30 tokens"):
        decode(model, ByteTokenizer(), ["ok", "y" * 30], 5, temperature=0)
    with pytest.raises(ValueError, match="context_length=24"):
        stream(model, ByteTokenizer(), "y" * 25, 5)  # raised at the call, before iterating


def test_empty_prompt_starts_from_the_stop_token():
    model = tiny_lm()
    tokenizer = ByteTokenizer()
    expected = argmax_rollout(model, [EOT_ID], 5)
    assert decode(model, tokenizer, "", 5, temperature=0) == tokenizer.decode([i for i in expected if i != EOT_ID])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_tokens=-1), "max_tokens=-1"),
        (dict(temperature=-0.5), "temperature=-0.5"),
        (dict(top_p=0.0), "top_p=0.0"),
        (dict(top_p=1.5), "top_p=1.5"),
        (dict(stop_token="<|end|>"), "stop_token='<|end|>'"),
    ],
)
def test_bad_generation_arguments_raise(kwargs, message):
    arguments = dict(max_tokens=5, temperature=1.0, top_p=1.0) | kwargs
    with pytest.raises(ValueError, match=message.replace("|", "\\|")):
        decode(tiny_lm(), ByteTokenizer(), "hi", **arguments)


def test_device_argument_runs_on_that_device():
    model = tiny_lm()
    assert decode(model, ByteTokenizer(), "hi", 5, temperature=0, device="cpu") == decode(
        model, ByteTokenizer(), "hi", 5, temperature=0
    )


# ---- sample_next_token ------------------------------------------------------------------


def test_top_p_keeps_the_smallest_nucleus_reaching_p():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log().expand(20000, 4)
    generator = torch.Generator().manual_seed(0)
    ids = sample_next_token(logits, temperature=1.0, top_p=0.7, generator=generator)
    counts = torch.bincount(ids, minlength=4).double() / ids.numel()
    # 0.5 alone is below 0.7, so 0.3 joins; 0.15 and 0.05 are cut. Kept mass renormalised: 5/8, 3/8.
    assert counts[0] == 0 and counts[2] == 0
    assert counts[1].item() == pytest.approx(0.625, abs=0.02)
    ids = sample_next_token(logits, temperature=1.0, top_p=0.85, generator=generator)
    counts = torch.bincount(ids, minlength=4)
    assert counts[0] == 0 and counts[2] > 0


def test_temperature_sampling_follows_the_softmax():
    logits = torch.tensor([1.0, 2.0, 0.0, -1.0]).expand(40000, 4)
    ids = sample_next_token(logits, temperature=2.0, generator=torch.Generator().manual_seed(0))
    frequencies = torch.bincount(ids, minlength=4).double() / ids.numel()
    expected = torch.softmax(torch.tensor([1.0, 2.0, 0.0, -1.0], dtype=torch.float64) / 2.0, dim=0)
    assert torch.allclose(frequencies, expected, atol=0.01)


def test_zero_temperature_is_argmax_per_row():
    logits = torch.randn(5, 11)
    assert torch.equal(sample_next_token(logits, temperature=0), logits.argmax(-1))


# ---- pretrained tokenizers: bos first, their own eos as the stop --------------------------


class LlamaStyleTokenizer(ByteTokenizer):
    """ByteTokenizer with Llama's habits: bos (id 1, the byte \\x01 here) before every text, eos id 4."""

    bos_id, eos_id, add_bos = 1, 4, True


def test_bos_is_prepended_where_the_tokenizer_asks():
    model = ScriptedLM({1: ord("x"), ord("a"): ord("b"), ord("b"): 4, ord("x"): ord("y")})
    tokenizer = LlamaStyleTokenizer()
    # The stop is the tokenizer's eos (4), not <|endoftext|> (256): "b" is followed by 4, which ends the text.
    assert decode(model, tokenizer, "a", max_tokens=5, temperature=0) == "b"
    assert model.input_lengths[0] == 2  # bos + "a"
    # An empty prompt is bos alone, whose scripted successor is "x".
    assert decode(model, tokenizer, "", max_tokens=2, temperature=0) == "xy"
    tokenizer.add_bos = False
    model.input_lengths.clear()
    assert decode(model, tokenizer, "a", max_tokens=5, temperature=0) == "b"
    assert model.input_lengths[0] == 1  # "a" alone
