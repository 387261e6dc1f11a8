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
import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int  # number of token ids; the embedding and lm_head have this many rows
    context_length: int  # longest sequence the model accepts; the RoPE tables grow up to it as positions are used
    d_model: int  # width of the residual stream
    num_layers: int  # number of TransformerBlocks
    num_heads: int  # attention heads per block; d_model is split evenly between them
    d_ff: int  # hidden width of the SwiGLU feed-forward network
    rope_theta: float = 10000.0  # RoPE base: pair i turns by pos * theta^(-2i/d_head)
    # Llama-family fields; their defaults give the original scratchlm model.
    num_kv_heads: int | None = None  # key/value heads (grouped-query attention); None means num_heads
    tie_embeddings: bool = False  # lm_head reuses the token embedding matrix (one Parameter)
    norm_eps: float = 1e-5  # the epsilon of every RMSNorm
    rope_scaling: dict | None = None  # Llama 3.1's {"rope_type": "llama3", ...}; see ROPE_SCALING_KEYS

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
        if not _is_number(self.rope_theta) or self.rope_theta <= 0:
            raise ValueError(f"ModelConfig.rope_theta={self.rope_theta!r}: expected a positive number")
        if self.num_kv_heads is None:
            # Frozen: set through object.__setattr__, so equal models compare equal however given.
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        kv_heads = self.num_kv_heads
        if isinstance(kv_heads, bool) or not isinstance(kv_heads, int) or kv_heads <= 0:
            raise ValueError(f"ModelConfig.num_kv_heads={kv_heads!r}: expected a positive int or None (num_heads)")
        if self.num_heads % kv_heads != 0:
            raise ValueError(
                f"ModelConfig.num_kv_heads={kv_heads} with num_heads={self.num_heads}: expected num_heads to be "
                f"a multiple of num_kv_heads (each key/value head serves a group of query heads)"
            )
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"ModelConfig.tie_embeddings={self.tie_embeddings!r}: expected True or False")
        if not _is_number(self.norm_eps) or not 0 < self.norm_eps < 1:
            raise ValueError(f"ModelConfig.norm_eps={self.norm_eps!r}: expected a number in (0, 1)")
        object.__setattr__(self, "rope_scaling", normalize_rope_scaling(self.rope_scaling))

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def kv_dim(self) -> int:
        """Width of the key (and value) projection: num_kv_heads * head_dim."""
        return self.num_kv_heads * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain data; Llama-family fields only where they differ from their defaults.

        So a model without them stores exactly the dict it stored before they
        existed, and checkpoints written either way read back the same.
        """
        values = dataclasses.asdict(self)
        defaults = {**_LLAMA_FIELD_DEFAULTS, "num_kv_heads": self.num_heads}
        return {key: value for key, value in values.items() if key not in defaults or value != defaults[key]}

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


# The fields added for pretrained Llama-family models, at the values that mean "as before".
_LLAMA_FIELD_DEFAULTS = {"num_kv_heads": None, "tie_embeddings": False, "norm_eps": 1e-5, "rope_scaling": None}


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# Llama 3.1's rope scaling, as its Hugging Face config.json spells it. The
# frequencies it rescales are computed in model/layers.py (rope_frequencies).
ROPE_SCALING_KEYS = ("rope_type", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def normalize_rope_scaling(scaling: object) -> dict | None:
    """A rope_scaling value checked and reduced to ROPE_SCALING_KEYS, or None for plain RoPE.

    Accepts the Hugging Face spellings: "type" for "rope_type", and
    {"rope_type": "default"} for no scaling. Any other type is refused by name.

    >>> normalize_rope_scaling({"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
    ...                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})["rope_type"]
    'llama3'
    """
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise ValueError(f"ModelConfig.rope_scaling={scaling!r}: expected None or a dict with rope_type 'llama3'")
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "default":
        return None
    if kind != "llama3":
        raise ValueError(
            f"ModelConfig.rope_scaling has rope_type={kind!r}; only 'llama3' (Llama 3.1's scaling) is supported"
        )
    missing = [key for key in ROPE_SCALING_KEYS[1:] if key not in scaling]
    if missing:
        raise ValueError(f"ModelConfig.rope_scaling of type 'llama3' lacks {missing}; expected all of {list(ROPE_SCALING_KEYS[1:])}")
    values = {"rope_type": "llama3"}
    for key in ROPE_SCALING_KEYS[1:]:
        value = scaling[key]
        if not _is_number(value) or value <= 0:
            raise ValueError(f"ModelConfig.rope_scaling[{key!r}]={value!r}: expected a positive number")
        values[key] = int(value) if key == "original_max_position_embeddings" else float(value)
    if values["high_freq_factor"] <= values["low_freq_factor"]:
        raise ValueError(
            f"ModelConfig.rope_scaling has high_freq_factor={values['high_freq_factor']} <= "
            f"low_freq_factor={values['low_freq_factor']}; expected high > low"
        )
    return values


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
