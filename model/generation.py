"""Text generation: greedy, temperature and top-p (nucleus) sampling, batched.

Batching prompts of different lengths without padding masks: every prompt is
written left-aligned into one (batch, max_prompt + max_tokens) grid, and
decoding starts at the shortest prompt. At each column a row either copies its
next prompt token (still reading its prompt) or takes the sampled one. Causal
attention never looks right, so each row computes exactly what it would alone.

With the KV cache each step runs only the new column; past ``context_length``
the model sees a sliding window of the last ``context_length`` tokens,
recomputed each step (cached keys carry positions the window no longer has).
"""

from __future__ import annotations

import codecs
import math
from collections.abc import Iterator, Sequence
from typing import Protocol

import torch
from torch import Tensor

from scratchlm.model.transformer import TransformerLM

DEFAULT_STOP_TOKEN = "<|endoftext|>"
# Columns for new tokens in the first token grid; it doubles when they run out.
_FIRST_NEW_COLUMNS = 256


class TokenizerLike(Protocol):
    """The part of ``scratchlm.tokenizer.Tokenizer`` generation uses."""

    special_token_ids: dict[str, int]
    # Optional (read with getattr): a pretrained tokenizer's beginning/end-of-sequence ids,
    # and whether its model expects bos before every text; its ids (id -> bytes), which
    # generation checks against the model's vocabulary and limits sampling to.
    # bos_id: int | None; eos_id: int | None; add_bos: bool; vocab: dict[int, bytes]

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def decode_bytes(self, ids: list[int]) -> bytes: ...


def sample_next_token(
    logits: Tensor,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    *,
    allowed: Tensor | None = None,
) -> Tensor:
    """Pick one token per row: logits (batch, vocab) -> ids (batch,).

    temperature 0 is greedy (argmax). Otherwise probabilities are
    softmax(logits / temperature), cut to the nucleus: the most likely tokens
    whose mass first reaches ``top_p`` (always at least the top token), then
    renormalised by sampling in proportion to what is left.

    ``allowed`` (vocab,) bool, True for ids that may be picked: the others get
    logit -inf before anything else, so neither greedy nor any sampling path
    can choose them (a model's padding rows past its tokenizer's ids).
    """
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (batch, vocab)
    if top_p < 1.0:
        sorted_probs, sorted_ids = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # (batch, vocab)
        # A token is outside the nucleus when the tokens ranked above it already reach top_p.
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
        choice = torch.multinomial(sorted_probs, num_samples=1, generator=generator)  # (batch, 1)
        return sorted_ids.gather(-1, choice).squeeze(-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def check_sampling_args(max_tokens: int, temperature: float, top_p: float) -> None:
    """Refuse generation settings that cannot mean anything (checked before a model is needed)."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
        raise ValueError(f"max_tokens={max_tokens!r}: expected an int >= 0")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature={temperature!r}: expected a finite number >= 0 (0 = greedy)")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p={top_p!r}: expected a number in (0, 1]")


def generate_ids(
    model: TransformerLM,
    prompts: Sequence[Sequence[int]],
    max_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    *,
    generator: torch.Generator | None = None,
    stop_id: int | None = None,
    use_kv_cache: bool = True,
    allowed: Tensor | None = None,
) -> Iterator[list[int | None]]:
    """Yield, step by step, the new token of each row (None for a row not producing one).

    A row is done after ``max_tokens`` new tokens or right after it yields
    ``stop_id``. Runs on the model's device. ``allowed`` (vocab_size,) bool
    limits sampling to the ids marked True (see ``sample_next_token``).
    """
    check_sampling_args(max_tokens, temperature, top_p)
    context_length = model.config.context_length
    lengths = [len(ids) for ids in prompts]
    for row, length in enumerate(lengths):
        if not 1 <= length <= context_length:
            raise ValueError(
                f"prompts[{row}] has {length} tokens; expected 1 to context_length={context_length}"
            )
    if not prompts or max_tokens == 0:
        return
    device = next(model.parameters()).device
    allowed = _check_allowed(allowed, model.config.vocab_size, device)

    with torch.inference_mode():
        batch, prompt_width = len(prompts), max(lengths)
        # The grid grows with the tokens actually produced: max_tokens may be far more than
        # a stop token lets happen, and sizing it up front would make that a memory demand.
        tokens = torch.zeros(batch, prompt_width + min(max_tokens, _FIRST_NEW_COLUMNS), dtype=torch.long, device=device)
        is_prompt = torch.zeros(batch, prompt_width + 1, dtype=torch.bool, device=device)  # last column: all False
        for row, ids in enumerate(prompts):
            tokens[row, : len(ids)] = torch.tensor(list(ids), dtype=torch.long, device=device)
            is_prompt[row, : len(ids)] = True
        num_generated = torch.zeros(batch, dtype=torch.long, device=device)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
    cache = model.new_kv_cache() if use_kv_cache else None

    for position in range(min(lengths), prompt_width + max_tokens):
        with torch.inference_mode():
            if position == tokens.shape[1]:
                tokens = _add_columns(tokens, min(tokens.shape[1], prompt_width + max_tokens - position))
            if position > context_length:
                cache = None  # from here on, a sliding window recomputed each step
                logits = model(tokens[:, position - context_length : position])
            elif cache is not None:
                logits = model(tokens[:, cache.length : position], kv_cache=cache)
            else:
                logits = model(tokens[:, :position])
            sampled = sample_next_token(logits[:, -1], temperature, top_p, generator, allowed=allowed)  # (batch,)
            from_prompt = is_prompt[:, min(position, prompt_width)]
            next_ids = torch.where(from_prompt, tokens[:, position], sampled)
            tokens[:, position] = next_ids
            is_new = ~from_prompt & ~finished
            num_generated += is_new.long()
            if stop_id is not None:
                finished |= is_new & (next_ids == stop_id)
            finished |= num_generated >= max_tokens
            step = [int(t) if new else None for t, new in zip(next_ids.tolist(), is_new.tolist())]
            all_finished = bool(finished.all())
        yield step
        if all_finished:
            return


def _add_columns(tokens: Tensor, count: int) -> Tensor:
    """``tokens`` (batch, width) with ``count`` zero columns appended."""
    return torch.cat((tokens, tokens.new_zeros(tokens.shape[0], count)), dim=1)


def _check_allowed(allowed: Tensor | None, vocab_size: int, device: torch.device) -> Tensor | None:
    """``allowed`` as a (vocab_size,) bool tensor on ``device``, refused if malformed or all False."""
    if allowed is None:
        return None
    if not isinstance(allowed, Tensor) or allowed.dtype != torch.bool or tuple(allowed.shape) != (vocab_size,):
        shape = tuple(allowed.shape) if isinstance(allowed, Tensor) else type(allowed).__name__
        raise ValueError(f"allowed is {shape}; expected a bool tensor of shape ({vocab_size},), one per model id")
    if not bool(allowed.any()):
        raise ValueError("allowed is False for every id; expected at least one id that may be sampled")
    return allowed.to(device)


def tokenizer_ids_mask(tokenizer: TokenizerLike, vocab_size: int) -> Tensor | None:
    """Which of the model's ``vocab_size`` ids the tokenizer has, as a bool mask; None when it has all.

    Refuses a tokenizer with ids the model cannot embed, naming both sizes.
    Real models often pad their embedding past the tokenizer (Qwen2.5: 151,936
    rows for about 151,665 tokens), and a tokenizer's ids may be sparse; the
    ids it lacks must never be sampled, since they could not be decoded.
    A tokenizer without a ``vocab`` dict (id -> bytes) is taken as it is.
    """
    vocab = getattr(tokenizer, "vocab", None)
    if not isinstance(vocab, dict) or not vocab:
        return None
    largest = max(vocab)
    if largest >= vocab_size:
        raise ValueError(
            f"the tokenizer has ids up to {largest} (vocab_size {largest + 1}) but the model embeds only "
            f"{vocab_size} ids; expected a tokenizer no larger than the model's vocabulary (the model's own tokenizer?)"
        )
    if len(vocab) == vocab_size:
        return None  # ids are distinct and below vocab_size: all of them are there
    allowed = torch.zeros(vocab_size, dtype=torch.bool)
    allowed[torch.tensor(sorted(vocab), dtype=torch.long)] = True
    return allowed


def _stop_token_id(tokenizer: TokenizerLike, stop_token: str | None) -> int | None:
    if stop_token is None:
        return None
    # A pretrained tokenizer names its own end of text (Llama 3: <|end_of_text|>); it wins over the default.
    eos_id = getattr(tokenizer, "eos_id", None)
    if stop_token == DEFAULT_STOP_TOKEN and eos_id is not None:
        return eos_id
    special = tokenizer.special_token_ids
    if stop_token in special:
        return special[stop_token]
    if stop_token == DEFAULT_STOP_TOKEN:
        return None  # a tokenizer without <|endoftext|> just never stops early
    raise ValueError(
        f"stop_token={stop_token!r} is not a special token of the tokenizer; expected one of {sorted(special)} or None"
    )


def _encode_prompts(
    model: TransformerLM, tokenizer: TokenizerLike, prompts: list[str], stop_id: int | None
) -> list[list[int]]:
    context_length = model.config.context_length
    # Models trained with a beginning-of-sequence token (Llama) expect it first.
    bos = [tokenizer.bos_id] if getattr(tokenizer, "add_bos", False) and tokenizer.bos_id is not None else []
    encoded = []
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise ValueError(f"prompt[{index}] is {type(prompt).__name__}; expected str")
        ids = bos + tokenizer.encode(prompt)
        if not ids:
            if stop_id is None:
                raise ValueError(f"prompt[{index}]={prompt!r} encodes to no tokens; expected at least one")
            # Documents in the training data are separated by the stop token,
            # so it is the natural context for "the start of a new text".
            ids = [stop_id]
        if len(ids) > context_length:
            raise ValueError(
                f"prompt[{index}] encodes to {len(ids)} tokens; expected at most "
                f"context_length={context_length}"
            )
        encoded.append(ids)
    return encoded


def _start(
    model: TransformerLM,
    tokenizer: TokenizerLike,
    prompts: list[str],
    max_tokens: int,
    temperature: float,
    top_p: float,
    device: torch.device | str | None,
    generator: torch.Generator | None,
    stop_token: str | None,
    use_kv_cache: bool,
) -> tuple[Iterator[list[int | None]], int | None]:
    """Check the arguments now (generate_ids is lazy) and return its steps and the stop id."""
    check_sampling_args(max_tokens, temperature, top_p)
    allowed = tokenizer_ids_mask(tokenizer, model.config.vocab_size)
    if device is not None:
        model.to(device)
    stop_id = _stop_token_id(tokenizer, stop_token)
    prompt_ids = _encode_prompts(model, tokenizer, prompts, stop_id)
    steps = generate_ids(
        model,
        prompt_ids,
        max_tokens,
        temperature,
        top_p,
        generator=generator,
        stop_id=stop_id,
        use_kv_cache=use_kv_cache,
        allowed=allowed,
    )
    return steps, stop_id


def decode(
    model: TransformerLM,
    tokenizer: TokenizerLike,
    prompt: str | Sequence[str],
    max_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    device: torch.device | str | None = None,
    *,
    generator: torch.Generator | None = None,
    stop_token: str | None = DEFAULT_STOP_TOKEN,
    use_kv_cache: bool = True,
) -> str | list[str]:
    """Continue ``prompt`` with up to ``max_tokens`` tokens; return the continuation text.

    A str prompt gives a str, a list of prompts a list (all decoded as one
    batch). Each continuation ends before the stop token, if one is sampled.
    temperature 0 is greedy; ``top_p`` < 1 samples from the nucleus.
    ``device``, when given, is where the model is moved (``Module.to`` is in
    place); otherwise generation runs where the model is. ``generator`` makes
    sampling reproducible; it must live on that device.
    """
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    steps, stop_id = _start(
        model, tokenizer, prompts, max_tokens, temperature, top_p, device, generator, stop_token, use_kv_cache
    )
    continuations: list[list[int]] = [[] for _ in prompts]
    for step in steps:
        for row, token in enumerate(step):
            if token is not None and token != stop_id:
                continuations[row].append(token)
    texts = [tokenizer.decode(ids) for ids in continuations]
    return texts[0] if isinstance(prompt, str) else texts


def stream(
    model: TransformerLM,
    tokenizer: TokenizerLike,
    prompt: str,
    max_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    device: torch.device | str | None = None,
    *,
    generator: torch.Generator | None = None,
    stop_token: str | None = DEFAULT_STOP_TOKEN,
    use_kv_cache: bool = True,
) -> Iterator[str]:
    """Like ``decode`` for one prompt, but yield text pieces as tokens arrive.

    A token can end in the middle of a multi-byte UTF-8 character; those bytes
    are held back until the character completes, so the pieces joined equal
    ``decode``'s result. Arguments are checked here, before the first piece.
    """
    if not isinstance(prompt, str):
        raise ValueError(f"prompt is {type(prompt).__name__}; expected one str (use decode for a batch)")
    steps, stop_id = _start(
        model, tokenizer, [prompt], max_tokens, temperature, top_p, device, generator, stop_token, use_kv_cache
    )
    return _stream_text(tokenizer, steps, stop_id)


def _stream_text(tokenizer: TokenizerLike, steps: Iterator[list[int | None]], stop_id: int | None) -> Iterator[str]:
    # An incremental decoder keeps an incomplete character's bytes for the next
    # call and replaces invalid bytes with U+FFFD, as bytes.decode(errors="replace") does.
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for (token,) in steps:
        if token is None or token == stop_id:
            continue
        piece = utf8.decode(tokenizer.decode_bytes([token]))
        if piece:
            yield piece
    tail = utf8.decode(b"", final=True)
    if tail:
        yield tail
