"""The shape of a TransformerLM as plain data, plus named presets.

A config is what a checkpoint stores to rebuild its model, so it round-trips
through ``to_dict`` / ``from_dict`` (JSON-friendly) and rejects keys it does not
know instead of silently ignoring a typo.

>>> ModelConfig.preset("debug").d_model
64
>>> ModelConfig.preset("small", vocab_size=10_000).vocab_size
10000
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int  # number of token ids; the embedding and lm_head have this many rows
    context_length: int  # longest sequence the model accepts; also the size of the RoPE tables
    d_model: int  # width of the residual stream
    num_layers: int  # number of TransformerBlocks
    num_heads: int  # attention heads per block; d_model is split evenly between them
    d_ff: int  # hidden width of the SwiGLU feed-forward network
    rope_theta: float = 10000.0  # RoPE base: pair i turns by pos * theta^(-2i/d_head)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "d_model", "num_layers", "num_heads", "d_ff"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name}={value!r}: expected a positive int")
        if self.d_model % self.num_heads != 0:
            raise ValueError(
                f"ModelConfig.d_model={self.d_model} with num_heads={self.num_heads}: "
                f"expected d_model to be a multiple of num_heads"
            )
        if (self.d_model // self.num_heads) % 2 != 0:
            raise ValueError(
                f"ModelConfig.d_model // num_heads = {self.d_model // self.num_heads}: "
                f"expected an even head dimension, since RoPE rotates pairs of features"
            )
        if not isinstance(self.rope_theta, (int, float)) or isinstance(self.rope_theta, bool) or self.rope_theta <= 0:
            raise ValueError(f"ModelConfig.rope_theta={self.rope_theta!r}: expected a positive number")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        """Build a config from ``to_dict`` output; unknown or missing keys are errors."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ValueError(f"ModelConfig.from_dict: unknown keys {unknown}; expected only {sorted(fields)}")
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        missing = sorted(required - set(values))
        if missing:
            raise ValueError(f"ModelConfig.from_dict: missing keys {missing}; expected all of {sorted(required)}")
        return cls(**values)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """The preset called ``name`` (see ``PRESETS``), with any field overridden."""
        if name not in PRESETS:
            raise ValueError(f"preset name={name!r} is unknown; expected one of {sorted(PRESETS)}")
        values = {**PRESETS[name], **overrides}
        return cls.from_dict(values)


_GPT2_VOCAB = 50257

# Field values per preset. The gpt2-shaped presets keep GPT-2's widths, depths
# and head counts so parameter counts and throughput compare with the familiar
# models; the blocks themselves are Llama-style (RMSNorm, SwiGLU, RoPE).
PRESETS: dict[str, dict[str, Any]] = {
    # A few hundred thousand parameters: a CPU forward/backward takes milliseconds.
    "debug": dict(vocab_size=512, context_length=128, d_model=64, num_layers=2, num_heads=4, d_ff=192),
    # The TinyStories model of Stanford CS336 assignment 1 (about 17M non-embedding parameters).
    "tinystories": dict(vocab_size=10_000, context_length=256, d_model=512, num_layers=4, num_heads=16, d_ff=1344),
    "small": dict(vocab_size=_GPT2_VOCAB, context_length=1024, d_model=768, num_layers=12, num_heads=12, d_ff=3072),
    "medium": dict(vocab_size=_GPT2_VOCAB, context_length=1024, d_model=1024, num_layers=24, num_heads=16, d_ff=4096),
    "large": dict(vocab_size=_GPT2_VOCAB, context_length=1024, d_model=1280, num_layers=36, num_heads=20, d_ff=5120),
}
PRESETS["gpt2-small"] = PRESETS["small"]
PRESETS["gpt2-medium"] = PRESETS["medium"]
PRESETS["gpt2-large"] = PRESETS["large"]
