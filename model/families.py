"""Model families as data: what each differs from Llama in, read in one place.

The Hugging Face reader, the GGUF reader and ``export_hf`` look a family up
here and apply it; the model itself stays one ``TransformerLM`` whose
``ModelConfig`` fields say what a family needs (see ``model/config.py``).

    family   HF model_type  GGUF architecture       ModelConfig fields it sets
    llama    llama          llama                   (none beyond the Llama ones)
    qwen2    qwen2          qwen2                   qkv_bias; sliding windows on the upper layers
    qwen3    qwen3          qwen3                   qk_norm, head_dim; windows as Qwen2
    mistral  mistral        llama (as llama.cpp)    sliding_window on every layer, head_dim
    gemma2   gemma2         gemma2                  the Gemma fields below; sliding/full layers alternate
    gemma3   gemma3_text    gemma3                  the Gemma fields, qk_norm, local_rope_theta; 5 sliding : 1 full
             gemma3         (none: HF folders only)  its language model alone (see MULTIMODAL below)

Gemma 2 and 3 (transformers' Gemma2Config, Gemma3TextConfig) set the same
fields: norm_offset 1 (RMSNorm by 1 + w), post_norms, mlp_activation
gelu_tanh, embedding_multiplier sqrt(hidden_size), attention_scale
query_pre_attn_scalar ** -0.5, and the soft-caps attn_logit_softcapping and
final_logit_softcapping (Gemma 3: null). Their sliding layers are those
``layer_types`` marks, else every layer but each ``sliding_window_pattern``-th
(Gemma 2: 2, Gemma 3: 6). Gemma 3's sliding layers turn by their own RoPE
base (``rope_parameters["sliding_attention"]``, or rope_local_base_freq in
transformers < 5), unscaled; its full layers by rope_theta with any "linear"
rope scaling. A field Gemma 3's config.json leaves out takes the value
transformers' Gemma3TextConfig gives it (``Family.hf_defaults``).

Gemma 3 with a vision tower (model_type "gemma3",
Gemma3ForConditionalGeneration) is read as its language model: the config
under ``text_config``, the tensors under ``language_model.model.`` (the
names transformers writes, 5.x as 4.50 did) or ``model.language_model.``
(its in-memory names since 4.52, which some saved folders carry; it reads
both), the lm_head tied to the embedding unless the config unties it.
The vision tower's and projector's tensors are skipped by name: their
headers are read, their data never.

Weight names are shared (a bias or q/k norm tensor has one name in every
family that has it); a family only decides which of them a model holds,
through the fields above.

Row order of q and k. HF stores each head's q/k rows in rotate_half order;
scratchlm in adjacent pairs (see ``weight_loading``). llama.cpp's converter
permutes them back to adjacent pairs for architecture "llama" only; for
"qwen2" and "qwen3" it keeps HF's order (llama.cpp turns those with its
NeoX-style RoPE), so their GGUF rows are reordered like HF ones on load.

Sliding windows. Qwen2 and Qwen3 (transformers' Qwen2Config): the window W is
``sliding_window`` when ``use_sliding_window`` is true, else there is none;
the sliding layers are those marked "sliding_attention" in ``layer_types``
when the config lists them, else every layer i >= ``max_window_layers``
(the lower layers stay full). Mistral: ``sliding_window`` (null: none)
applies to every layer; transformers ignores a Mistral ``layer_types``, and
so does this reader.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from scratchlm.model.config import ModelConfig


class FamilyError(ValueError):
    """A config a family cannot express or read; the readers turn it into PretrainedFormatError."""


@dataclass(frozen=True)
class Family:
    name: str  # the HF model_type
    hf_architecture: str  # config.json "architectures"
    gguf_architecture: str  # GGUF general.architecture as llama.cpp writes it
    gguf_rows_in_hf_order: bool  # llama.cpp keeps q/k rows in HF's rotate_half order (NeoX RoPE)
    qkv_bias: bool  # q/k/v projections always carry biases
    qk_norm: bool  # q_norm / k_norm over the head dim
    # (config.json values, num_layers, source) -> (sliding_window, sliding_window_layers)
    read_window: Callable[[dict, int, str], tuple[int | None, tuple[int, ...] | None]]
    # ModelConfig -> the config.json fields that state its windows
    write_window: Callable[[ModelConfig], dict[str, Any]]
    # (config.json values, source) -> the ModelConfig fields beyond the Llama/Qwen ones (Gemma's)
    read_fields: Callable[[dict, str], dict[str, Any]] = lambda values, source: {}
    # ModelConfig -> the config.json fields that state them
    write_fields: Callable[[ModelConfig], dict[str, Any]] = lambda cfg: {}
    hidden_act: str = "silu"  # the HF name of the MLP gate's activation
    local_rope: bool = False  # sliding layers have their own RoPE base (Gemma 3)
    # config.json field -> the value transformers' config class gives it when absent (where not Llama's)
    hf_defaults: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Multimodal:
    """An HF model_type holding a family's language model beside other towers; scratchlm reads the text part alone."""

    name: str  # the HF model_type
    hf_architecture: str  # config.json "architectures"
    description: str  # what the model is, for messages
    text: Family  # the language model's family; its config is config.json's "text_config"
    text_prefixes: tuple[str, ...]  # where the language model's "model." tensors are stored (any one of these)
    head_names: tuple[str, ...]  # where its lm_head.weight is stored, when it is
    skipped_prefixes: tuple[str, ...]  # the other towers' tensors: never loaded
    shared_fields: tuple[str, ...]  # top-level config.json fields that govern the language model too

    def text_tensor_name(self, hf_name: str) -> str | None:
        """The language model's own name for a stored tensor (None: another tower's; unknown names unchanged)."""
        if hf_name.startswith(self.skipped_prefixes):
            return None
        if hf_name in self.head_names:
            return "lm_head.weight"
        prefix = next((prefix for prefix in self.text_prefixes if hf_name.startswith(prefix)), None)
        return hf_name if prefix is None else "model." + hf_name.removeprefix(prefix)


def _refuse(source: str, field: str, value: Any, expected: str) -> FamilyError:
    return FamilyError(f"{source} has {field}={value!r}; {expected}")


# ------------------------------------------------------------------ sliding windows, per family


def _llama_window(values: dict, num_layers: int, source: str) -> tuple[int | None, tuple[int, ...] | None]:
    if values.get("sliding_window") is not None:
        raise _refuse(source, "sliding_window", values["sliding_window"], "expected null (Llama attends fully)")
    return None, None


def _llama_window_fields(cfg: ModelConfig) -> dict[str, Any]:
    if cfg.sliding_window is not None:
        raise FamilyError(f"ModelConfig.sliding_window={cfg.sliding_window}: a Llama config has no sliding window")
    return {}


def _mistral_window(values: dict, num_layers: int, source: str) -> tuple[int | None, tuple[int, ...] | None]:
    return values.get("sliding_window"), None


def _mistral_window_fields(cfg: ModelConfig) -> dict[str, Any]:
    if cfg.sliding_window_layers is not None and len(cfg.sliding_window_layers) != cfg.num_layers:
        raise FamilyError(
            f"ModelConfig.sliding_window_layers={cfg.sliding_window_layers}: Mistral slides on every layer or none"
        )
    return {"sliding_window": cfg.sliding_window}


_LAYER_TYPES = ("full_attention", "sliding_attention")


def _qwen_window(values: dict, num_layers: int, source: str) -> tuple[int | None, tuple[int, ...] | None]:
    use = values.get("use_sliding_window", False)
    if not isinstance(use, bool):
        raise _refuse(source, "use_sliding_window", use, "expected true or false")
    window = values.get("sliding_window") if use else None
    if window is None:
        return None, None
    layer_types = values.get("layer_types")
    if layer_types is not None:
        known = isinstance(layer_types, list) and set(layer_types) <= set(_LAYER_TYPES)
        if not known or len(layer_types) != num_layers:
            raise _refuse(
                source, "layer_types", layer_types, f"expected {num_layers} entries, each one of {list(_LAYER_TYPES)}"
            )
        layers = tuple(i for i, kind in enumerate(layer_types) if kind == "sliding_attention")
    else:
        first = values.get("max_window_layers", 28)  # Qwen2Config's and Qwen3Config's default
        if isinstance(first, bool) or not isinstance(first, int) or first < 0:
            raise _refuse(source, "max_window_layers", first, "expected an int >= 0")
        layers = tuple(range(first, num_layers))
    return (window, layers) if layers else (None, None)


def _qwen_window_fields(cfg: ModelConfig) -> dict[str, Any]:
    windows = [cfg.layer_window(layer) for layer in range(cfg.num_layers)]
    sliding = [w is not None for w in windows]
    # max_window_layers states the usual shape (full below, sliding above); layer_types states any.
    first = sliding.index(True) if any(sliding) else cfg.num_layers
    return {
        "use_sliding_window": any(sliding),
        "sliding_window": cfg.sliding_window,
        "max_window_layers": first,
        "layer_types": [_LAYER_TYPES[s] for s in sliding],
    }


def _gemma_window(pattern: int) -> Callable[[dict, int, str], tuple[int | None, tuple[int, ...] | None]]:
    """Gemma's windows: the layers marked "sliding_attention" in ``layer_types`` slide by ``sliding_window``;
    without layer_types every ``pattern``-th layer is full (Gemma 2: 2, Gemma 3: 6), the others slide."""

    def read(values: dict, num_layers: int, source: str) -> tuple[int | None, tuple[int, ...] | None]:
        layer_types = values.get("layer_types")
        if layer_types is None:
            every = values.get("sliding_window_pattern", pattern)
            if isinstance(every, bool) or not isinstance(every, int) or every <= 0:
                raise _refuse(source, "sliding_window_pattern", every, "expected a positive int")
            layer_types = [_LAYER_TYPES[(i + 1) % every != 0] for i in range(num_layers)]
        known = isinstance(layer_types, list) and set(layer_types) <= set(_LAYER_TYPES)
        if not known or len(layer_types) != num_layers:
            raise _refuse(
                source, "layer_types", layer_types, f"expected {num_layers} entries, each one of {list(_LAYER_TYPES)}"
            )
        layers = tuple(i for i, kind in enumerate(layer_types) if kind == "sliding_attention")
        window = values.get("sliding_window")
        if not layers:
            return None, None
        if window is None:
            raise _refuse(source, "sliding_window", window, "expected the window of its sliding_attention layers")
        return window, layers

    return read


def _gemma_window_fields(cfg: ModelConfig) -> dict[str, Any]:
    sliding = [cfg.layer_window(layer) is not None for layer in range(cfg.num_layers)]
    return {"sliding_window": cfg.sliding_window, "layer_types": [_LAYER_TYPES[s] for s in sliding]}


def _gemma_fields(values: dict, source: str) -> dict[str, Any]:
    """Gemma 2/3's differences from Llama, all fixed by the architecture except the scale and the caps."""
    if values.get("use_bidirectional_attention"):
        raise _refuse(source, "use_bidirectional_attention", True, "expected false (scratchlm is a causal decoder)")
    hidden = values.get("hidden_size")
    scalar = values.get("query_pre_attn_scalar", values.get("head_dim"))
    if isinstance(scalar, bool) or not isinstance(scalar, (int, float)) or scalar <= 0:
        raise _refuse(source, "query_pre_attn_scalar", scalar, "expected a positive number")
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden <= 0:
        raise _refuse(source, "hidden_size", hidden, "expected a positive int")
    return {
        "norm_offset": 1.0,
        "post_norms": True,
        "mlp_activation": "gelu_tanh",
        "embedding_multiplier": hidden**0.5,
        "attention_scale": scalar**-0.5,
        "attention_softcap": values.get("attn_logit_softcapping"),
        "final_softcap": values.get("final_logit_softcapping"),
    }


def _gemma_field_values(cfg: ModelConfig) -> dict[str, Any]:
    expected = {"norm_offset": 1.0, "post_norms": True, "mlp_activation": "gelu_tanh"}
    for name, value in expected.items():
        if getattr(cfg, name) != value:
            raise FamilyError(f"ModelConfig.{name}={getattr(cfg, name)!r}: Gemma configs fix it at {value!r}")
    if cfg.embedding_multiplier is None or abs(cfg.embedding_multiplier - cfg.d_model**0.5) > 1e-6 * cfg.d_model**0.5:
        raise FamilyError(
            f"ModelConfig.embedding_multiplier={cfg.embedding_multiplier!r}: Gemma configs fix it at sqrt(d_model)"
        )
    scale = cfg.attention_scale if cfg.attention_scale is not None else cfg.head_dim**-0.5
    scalar = scale**-2
    return {
        "query_pre_attn_scalar": round(scalar) if abs(scalar - round(scalar)) < 1e-6 * scalar else scalar,
        "attn_logit_softcapping": cfg.attention_softcap,
        "final_logit_softcapping": cfg.final_softcap,
        "hidden_activation": "gelu_pytorch_tanh",
    }


# transformers' Gemma3TextConfig defaults (5.x; 4.5x the same), in config.json's field names; the RoPE bases are its
# default_theta, read as transformers < 5 spelled them (rope_parameters, when present, say otherwise).
_GEMMA3_TEXT_DEFAULTS = {
    "vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "max_position_embeddings": 131_072,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "query_pre_attn_scalar": 256, "sliding_window": 4096,
    "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0,
}  # fmt: skip

# ------------------------------------------------------------------ the table

FAMILIES: dict[str, Family] = {
    "llama": Family("llama", "LlamaForCausalLM", "llama", False, False, False, _llama_window, _llama_window_fields),
    "qwen2": Family("qwen2", "Qwen2ForCausalLM", "qwen2", True, True, False, _qwen_window, _qwen_window_fields),
    "qwen3": Family("qwen3", "Qwen3ForCausalLM", "qwen3", True, False, True, _qwen_window, _qwen_window_fields),
    "mistral": Family(
        "mistral", "MistralForCausalLM", "llama", False, False, False, _mistral_window, _mistral_window_fields
    ),
    "gemma2": Family(
        "gemma2", "Gemma2ForCausalLM", "gemma2", True, False, False, _gemma_window(2), _gemma_window_fields,
        _gemma_fields, _gemma_field_values, "gelu_pytorch_tanh",
    ),  # fmt: skip
    "gemma3_text": Family(
        "gemma3_text", "Gemma3ForCausalLM", "gemma3", True, False, True, _gemma_window(6), _gemma_window_fields,
        _gemma_fields, _gemma_field_values, "gelu_pytorch_tanh", local_rope=True,
        hf_defaults=_GEMMA3_TEXT_DEFAULTS,
    ),  # fmt: skip
}

# model_type -> a language model read out of a multi-modal folder.
MULTIMODAL: dict[str, Multimodal] = {
    "gemma3": Multimodal(
        "gemma3", "Gemma3ForConditionalGeneration", "Gemma 3 with a vision tower", FAMILIES["gemma3_text"],
        text_prefixes=("language_model.model.", "model.language_model."),
        head_names=("lm_head.weight", "language_model.lm_head.weight"),
        skipped_prefixes=("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                          "model.multi_modal_projector."),
        # transformers 5 ties the lm_head by the top-level flag; a quantised folder states it at the top.
        shared_fields=("tie_word_embeddings", "quantization_config"),
    ),
}  # fmt: skip

# model_types refused by name, with why: known families scratchlm does not (yet) build.
REFUSED_MODEL_TYPES = {
    "qwen2_moe": "a mixture-of-experts model (experts are not supported)",
    "qwen3_moe": "a mixture-of-experts model (experts are not supported)",
    "mixtral": "a mixture-of-experts model (experts are not supported)",
    "gemma": "Gemma 1, not supported (Gemma 2 and Gemma 3 are)",
}

# GGUF general.architecture -> family (Mistral is written as "llama", so it reads as Llama).
GGUF_FAMILIES = {
    "llama": FAMILIES["llama"], "qwen2": FAMILIES["qwen2"], "qwen3": FAMILIES["qwen3"],
    "gemma2": FAMILIES["gemma2"], "gemma3": FAMILIES["gemma3_text"],
}  # fmt: skip
REFUSED_GGUF_ARCHITECTURES = {
    "qwen2moe": REFUSED_MODEL_TYPES["qwen2_moe"],
    "qwen3moe": REFUSED_MODEL_TYPES["qwen3_moe"],
    "gemma": REFUSED_MODEL_TYPES["gemma"],
}


def hf_family(model_type: Any, source: str) -> Family:
    """The family of a config.json's model_type, or a refusal naming it."""
    if isinstance(model_type, str) and model_type in FAMILIES:
        return FAMILIES[model_type]
    if isinstance(model_type, str) and model_type in REFUSED_MODEL_TYPES:
        raise _refuse(source, "model_type", model_type, f"that is {REFUSED_MODEL_TYPES[model_type]}")
    raise _refuse(source, "model_type", model_type, f"expected one of {sorted([*FAMILIES, *MULTIMODAL])}")


def hf_multimodal(model_type: Any) -> Multimodal | None:
    """The multi-modal spec of a config.json's model_type, None when it names a text model (or nothing known)."""
    return MULTIMODAL.get(model_type) if isinstance(model_type, str) else None


def gguf_family(architecture: Any, source: str) -> Family:
    """The family of a GGUF general.architecture, or a refusal naming it."""
    if isinstance(architecture, str) and architecture in GGUF_FAMILIES:
        return GGUF_FAMILIES[architecture]
    if isinstance(architecture, str) and architecture in REFUSED_GGUF_ARCHITECTURES:
        reason = REFUSED_GGUF_ARCHITECTURES[architecture]
        raise _refuse(source, "general.architecture", architecture, f"that is {reason}")
    raise _refuse(source, "general.architecture", architecture, f"expected one of {sorted(GGUF_FAMILIES)}")


def family_of(cfg: ModelConfig) -> Family:
    """The family whose HF format states ``cfg``: the one ``export_hf`` writes, or a FamilyError saying why none does.

    q/k norms mean Qwen3, q/k/v biases Qwen2, a window on every layer
    Mistral, nothing of these Llama.
    """
    if cfg.post_norms:
        return FAMILIES["gemma3_text"] if cfg.qk_norm else FAMILIES["gemma2"]
    if cfg.attention_scale is not None:
        raise FamilyError(
            f"ModelConfig.attention_scale={cfg.attention_scale}: Llama, Qwen and Mistral configs have no such field "
            f"(their scale is head_dim ** -0.5); this model has no Hugging Face format yet"
        )
    if cfg.qk_norm:
        if cfg.qkv_bias:
            raise FamilyError(
                "ModelConfig has qk_norm and qkv_bias: Qwen3's attention_bias also puts a bias on o_proj, "
                "which scratchlm's output_proj lacks; no family states this model"
            )
        return FAMILIES["qwen3"]
    if cfg.qkv_bias:
        return FAMILIES["qwen2"]
    if cfg.sliding_window is not None:
        if cfg.sliding_window_layers is not None and len(cfg.sliding_window_layers) != cfg.num_layers:
            raise FamilyError(
                f"ModelConfig.sliding_window_layers={cfg.sliding_window_layers} without qkv_bias or qk_norm: "
                f"Mistral slides on every layer, and Qwen2/Qwen3 (which pick layers) have biases or q/k norms"
            )
        return FAMILIES["mistral"]
    return FAMILIES["llama"]


def family_name(cfg: ModelConfig) -> str:
    """The family ``cfg`` reads as, for messages ("qwen2"), or "scratchlm" when no family states it."""
    try:
        return family_of(cfg).name
    except FamilyError:
        return "scratchlm"
