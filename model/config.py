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
    num_heads: int  # attention heads per block; d_model is split evenly between them unless head_dim says otherwise
    d_ff: int  # hidden width of the SwiGLU feed-forward network
    rope_theta: float = 10000.0  # RoPE base: pair i turns by pos * theta^(-2i/d_head)
    # Llama-family fields; their defaults give the original scratchlm model.
    num_kv_heads: int | None = None  # key/value heads (grouped-query attention); None means num_heads
    tie_embeddings: bool = False  # lm_head reuses the token embedding matrix (one Parameter)
    norm_eps: float = 1e-5  # the epsilon of every RMSNorm
    rope_scaling: dict | None = None  # Llama 3.1's {"rope_type": "llama3", ...}; see ROPE_SCALING_KEYS
    # Qwen2/2.5, Qwen3 and Mistral fields; their defaults give the Llama model above.
    head_dim: int | None = None  # width of one head; None means d_model // num_heads (Qwen3: 128 at any d_model)
    qkv_bias: bool = False  # q_proj, k_proj and v_proj add a bias (Qwen2/2.5); output_proj never does
    qk_norm: bool = False  # RMSNorm over each head's q and k before RoPE, weights of size head_dim (Qwen3)
    attention_scale: float | None = None  # multiplies q.k in attention; None means head_dim ** -0.5
    sliding_window: int | None = None  # W: a sliding layer's query i sees keys i-W+1..i; None: every layer is full
    sliding_window_layers: tuple[int, ...] | None = None  # the layers that slide; None: all, when sliding_window is set
    # Gemma 2/3 fields; their defaults give the models above.
    norm_offset: float = 0.0  # every RMSNorm multiplies by (norm_offset + weight); Gemma stores w with offset 1
    post_norms: bool = False  # an RMSNorm on the attention output and on the MLP output, before each residual add
    mlp_activation: str = "silu"  # the gate's activation: "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    embedding_multiplier: float | None = None  # token embeddings are scaled by this (Gemma: sqrt(d_model))
    attention_softcap: float | None = None  # attention scores become cap * tanh(score / cap) (Gemma 2)
    final_softcap: float | None = None  # logits become cap * tanh(logit / cap) (Gemma 2)
    local_rope_theta: float | None = None  # RoPE base of the sliding layers, unscaled (Gemma 3); None: rope_theta

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "d_model", "num_layers", "num_heads", "d_ff"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name}={value!r}: expected a positive int")
        if self.head_dim is None:
            if self.d_model % self.num_heads != 0:
                raise ValueError(
                    f"ModelConfig.d_model={self.d_model} with num_heads={self.num_heads}: "
                    f"expected d_model to be a multiple of num_heads (or an explicit head_dim)"
                )
            # Frozen: set through object.__setattr__, so equal models compare equal however given.
            object.__setattr__(self, "head_dim", self.d_model // self.num_heads)
        if isinstance(self.head_dim, bool) or not isinstance(self.head_dim, int) or self.head_dim <= 0:
            raise ValueError(f"ModelConfig.head_dim={self.head_dim!r}: expected a positive int or None")
        if self.head_dim % 2 != 0:
            raise ValueError(
                f"ModelConfig.head_dim={self.head_dim}: expected an even head dimension, "
                f"since RoPE rotates pairs of features"
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
        for name in ("qkv_bias", "qk_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r}: expected True or False")
        scale = self.attention_scale
        if scale is not None and (not _is_number(scale) or scale <= 0):
            raise ValueError(
                f"ModelConfig.attention_scale={scale!r}: expected a positive number or None (head_dim ** -0.5)"
            )
        self._check_sliding_window()
        self._check_gemma_fields()

    def _check_gemma_fields(self) -> None:
        if not _is_number(self.norm_offset):
            raise ValueError(f"ModelConfig.norm_offset={self.norm_offset!r}: expected a finite number (Gemma: 1.0)")
        if not isinstance(self.post_norms, bool):
            raise ValueError(f"ModelConfig.post_norms={self.post_norms!r}: expected True or False")
        if self.mlp_activation not in MLP_ACTIVATIONS:
            raise ValueError(
                f"ModelConfig.mlp_activation={self.mlp_activation!r}: expected one of {list(MLP_ACTIVATIONS)}"
            )
        for name in ("embedding_multiplier", "attention_softcap", "final_softcap", "local_rope_theta"):
            value = getattr(self, name)
            if value is not None and (not _is_number(value) or value <= 0):
                raise ValueError(f"ModelConfig.{name}={value!r}: expected a positive number or None")

    def _check_sliding_window(self) -> None:
        window, layers = self.sliding_window, self.sliding_window_layers
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window <= 0):
            raise ValueError(f"ModelConfig.sliding_window={window!r}: expected a positive int or None (full attention)")
        if layers is None:
            return
        if window is None:
            raise ValueError(
                f"ModelConfig.sliding_window_layers={layers!r} with sliding_window=None: expected a window for them"
            )
        if not isinstance(layers, (list, tuple)) or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.num_layers for i in layers
        ):
            raise ValueError(
                f"ModelConfig.sliding_window_layers={layers!r}: expected layer indices in [0, {self.num_layers})"
            )
        # A sorted tuple: JSON gives back a list, and equal configs must compare equal.
        object.__setattr__(self, "sliding_window_layers", tuple(sorted(set(layers))))

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of layer ``layer``, or None where it attends to every earlier token."""
        if self.sliding_window is None:
            return None
        if self.sliding_window_layers is None or layer in self.sliding_window_layers:
            return self.sliding_window
        return None

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
        if values["sliding_window_layers"] is not None:
            values["sliding_window_layers"] = list(values["sliding_window_layers"])
        defaults = {**_LLAMA_FIELD_DEFAULTS, "num_kv_heads": self.num_heads}
        if self.d_model % self.num_heads == 0:
            defaults["head_dim"] = self.d_model // self.num_heads
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


# The fields added for pretrained models (Llama, Qwen, Mistral), at the values that mean "as before".
_LLAMA_FIELD_DEFAULTS = {
    "num_kv_heads": None, "tie_embeddings": False, "norm_eps": 1e-5, "rope_scaling": None, "head_dim": None,
    "qkv_bias": False, "qk_norm": False, "attention_scale": None, "sliding_window": None,
    "sliding_window_layers": None, "norm_offset": 0.0, "post_norms": False, "mlp_activation": "silu",
    "embedding_multiplier": None, "attention_softcap": None, "final_softcap": None, "local_rope_theta": None,
}  # fmt: skip

# The gate activations of the gated MLP: op name in model/backends.py per ModelConfig.mlp_activation.
MLP_ACTIVATIONS = {"silu": "swiglu", "gelu_tanh": "geglu"}


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
    if kind == "linear":
        # Position interpolation: every angle divided by factor (Gemma 3's global layers).
        factor = scaling.get("factor")
        if not _is_number(factor) or factor <= 0:
            raise ValueError(f"ModelConfig.rope_scaling['factor']={factor!r}: expected a positive number")
        return {"rope_type": "linear", "factor": float(factor)}
    if kind != "llama3":
        raise ValueError(
            f"ModelConfig.rope_scaling has rope_type={kind!r}; expected 'llama3' (Llama 3.1's scaling) or 'linear'"
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
