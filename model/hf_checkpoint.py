"""Reading a Hugging Face folder (Llama, Qwen2/2.5, Qwen3, Mistral, Gemma 2/3): config.json plus safetensors weights.

    folder/config.json                      hyper-parameters; model_type picks the family (model/families.py)
    folder/model.safetensors                the weights, or shards listed in
    folder/model.safetensors.index.json     {"weight_map": {tensor name: shard file}}
    folder/tokenizer.json                   optional; read by scratchlm.tokenizer

Everything that can be refused is refused from config.json and the
safetensors headers, before a single weight is read. A multi-modal folder
(Gemma 3 with its vision tower) is read as its language model: the other
towers' tensors are named in the headers and never read. Pickle files
(pytorch_model.bin) are never opened: loading one can run arbitrary code.

Memory: safetensors memory-maps its file, and pages of a mapping that were
read count in the process's resident set until the mapping is closed. A
shard opened once for all its tensors therefore ends up resident in full
next to the model (two copies of the weights); opening it again for each
tensor keeps the peak at the model plus one tensor, for the cost of parsing
the header again (a few hundred microseconds per tensor).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from scratchlm.model.config import ModelConfig
from scratchlm.model.transformer import TransformerLM
from scratchlm.model.weight_loading import (
    PretrainedFormatError,
    PretrainedFormatWarning,
    WeightFiller,
    allocate,
    check_plan,
    half_split_to_adjacent_rows,
    rotary_row_heads,
)
from scratchlm.model.families import FamilyError, Multimodal, family_name, hf_family, hf_multimodal

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")

# HF name inside model.layers.{i}. -> scratchlm name inside layers.{i}.
HF_LAYER_NAMES = {
    "input_layernorm.weight": "ln1.weight",
    "self_attn.q_proj.weight": "attn.q_proj.weight",
    "self_attn.k_proj.weight": "attn.k_proj.weight",
    "self_attn.v_proj.weight": "attn.v_proj.weight",
    "self_attn.o_proj.weight": "attn.output_proj.weight",
    "post_attention_layernorm.weight": "ln2.weight",
    "mlp.gate_proj.weight": "ffn.w1.weight",
    "mlp.up_proj.weight": "ffn.w3.weight",
    "mlp.down_proj.weight": "ffn.w2.weight",
    # Held only by the models whose config asks for them (qkv_bias: Qwen2; qk_norm: Qwen3).
    "self_attn.q_proj.bias": "attn.q_proj.bias",
    "self_attn.k_proj.bias": "attn.k_proj.bias",
    "self_attn.v_proj.bias": "attn.v_proj.bias",
    "self_attn.q_norm.weight": "attn.q_norm.weight",
    "self_attn.k_norm.weight": "attn.k_norm.weight",
}
# Gemma 2/3 (ModelConfig.post_norms) name their four norms differently: HF's
# post_attention_layernorm follows attention there, and pre_feedforward_layernorm is ln2.
HF_POST_NORM_NAMES = {
    **{hf: ours for hf, ours in HF_LAYER_NAMES.items() if ours != "ln2.weight"},
    "post_attention_layernorm.weight": "post_attn_norm.weight",
    "pre_feedforward_layernorm.weight": "ln2.weight",
    "post_feedforward_layernorm.weight": "post_ffn_norm.weight",
}
HF_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embeddings.weight",
    "model.norm.weight": "ln_final.weight",
    "lm_head.weight": "lm_head.weight",
}
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
# Buffers some older checkpoints saved; recomputed from the config, never weights.
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")

# Rows of the embedding compared with a stored tied lm_head at a time (a few MB for any real model).
_COMPARE_ROWS = 1024

_FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}

# LlamaConfig's defaults for the fields a config.json may leave out.
_HF_DEFAULTS = {"max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0}


def hf_to_scratchlm_name(hf_name: str, post_norms: bool = False) -> str | None:
    """The scratchlm weight an HF tensor name fills, or None if it is not one (``post_norms``: Gemma's names)."""
    if hf_name in HF_GLOBAL_NAMES:
        return HF_GLOBAL_NAMES[hf_name]
    layer_names = HF_POST_NORM_NAMES if post_norms else HF_LAYER_NAMES
    match = _HF_LAYER.fullmatch(hf_name)
    if match and match.group(2) in layer_names:
        return f"layers.{match.group(1)}.{layer_names[match.group(2)]}"
    return None


def scratchlm_to_hf_name(name: str, post_norms: bool = False) -> str:
    """The inverse of :func:`hf_to_scratchlm_name`."""
    for hf_name, ours in HF_GLOBAL_NAMES.items():
        if ours == name:
            return hf_name
    layer, rest = name.removeprefix("layers.").split(".", 1)
    layer_names = HF_POST_NORM_NAMES if post_norms else HF_LAYER_NAMES
    hf_rest = next(hf for hf, ours in layer_names.items() if ours == rest)
    return f"model.layers.{layer}.{hf_rest}"


def read_json(path: Path) -> Any:
    """A JSON file's contents; a clear error naming the path if it is not JSON or nests absurdly deep."""
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PretrainedFormatError(f"{str(path)!r} is not valid JSON ({e})") from e
    except RecursionError as e:
        # Python's JSON reader recurses once per nesting level; a config is a few levels deep.
        raise PretrainedFormatError(
            f"{str(path)!r} nests its JSON deeper than Python's reader allows; expected a config of plain fields"
        ) from e


# ------------------------------------------------------------------ config.json


def _refuse(source: str, field: str, value: Any, expected: str) -> PretrainedFormatError:
    return PretrainedFormatError(f"{source} has {field}={value!r}; {expected}")


def _local_rope_from_hf(values: dict, source: str) -> tuple[dict, float | None]:
    """(the full layers' rope_parameters, the sliding layers' RoPE base or None).

    Gemma 3 under transformers 5 nests rope_parameters by layer type
    ({"full_attention": {...}, "sliding_attention": {...}}); before, it wrote
    rope_local_base_freq beside rope_theta. Sliding layers turn unscaled.
    """
    parameters = values.get("rope_parameters") or {}
    local_theta = values.get("rope_local_base_freq")
    nested = isinstance(parameters, dict) and any(isinstance(v, dict) for v in parameters.values())
    if nested:
        # transformers reads only the per-type dicts; flat keys beside them (which it can leave there
        # when a config was built from flat ones) are ignored, as it ignores them.
        kinds = {key for key, value in parameters.items() if isinstance(value, dict)}
        if kinds - {"full_attention", "sliding_attention"}:
            raise _refuse(
                source, "rope_parameters", parameters, "expected one flat dict, or one per layer type "
                "('full_attention', 'sliding_attention')",
            )  # fmt: skip
        sliding = parameters.get("sliding_attention")
        parameters = parameters.get("full_attention", {})
        if sliding is not None:
            kind = sliding.get("rope_type", "default")
            if kind != "default":
                raise _refuse(source, "rope_parameters.sliding_attention.rope_type", kind, "expected 'default'")
            local_theta = sliding.get("rope_theta", local_theta)
    return parameters, local_theta


def _rope_from_hf(values: dict, source: str) -> tuple[float, dict | None, float | None]:
    """(rope_theta, scratchlm rope_scaling, the sliding layers' base or None) from either config spelling.

    transformers < 5 writes rope_theta and rope_scaling at the top level;
    transformers 5 writes rope_parameters = {"rope_type", "rope_theta", ...}
    (per layer type for Gemma 3, see ``_local_rope_from_hf``).
    As in transformers, a rope_scaling dict wins over rope_parameters.
    """
    parameters, local_theta = _local_rope_from_hf(values, source)
    if not isinstance(parameters, dict):
        raise _refuse(source, "rope_parameters", parameters, "expected a dict or null")
    scaling = values.get("rope_scaling") or parameters
    if not isinstance(scaling, dict):
        raise _refuse(source, "rope_scaling", scaling, "expected a dict or null")
    theta = scaling.get("rope_theta", parameters.get("rope_theta", values.get("rope_theta")))
    theta = _HF_DEFAULTS["rope_theta"] if theta is None else theta
    partial = scaling.get("partial_rotary_factor", values.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise _refuse(source, "partial_rotary_factor", partial, "expected 1.0 (RoPE on the whole head)")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in (None, "default"):
        return theta, None, local_theta
    if kind == "linear":
        return theta, {"rope_type": "linear", "factor": scaling.get("factor")}, local_theta
    if kind != "llama3":
        raise _refuse(source, "rope_scaling.rope_type", kind, "expected 'default', 'linear' or 'llama3'")
    keys = ("factor", "low_freq_factor", "high_freq_factor")
    missing = [key for key in keys if key not in scaling]
    if missing:
        raise _refuse(source, "rope_scaling", scaling, f"llama3 scaling needs {list(keys)}")
    max_positions = values.get("max_position_embeddings", _HF_DEFAULTS["max_position_embeddings"])
    llama3 = {"rope_type": "llama3", **{key: scaling[key] for key in keys}}
    # transformers' rule when the pretraining length is not given: the model's own.
    llama3["original_max_position_embeddings"] = scaling.get("original_max_position_embeddings", max_positions)
    return theta, llama3, local_theta


def _text_config(values: dict, multimodal: Multimodal, source: str) -> dict:
    """The language model's config.json values inside a multi-modal config: its ``text_config``, with the
    top-level fields that govern it (transformers 5 ties the lm_head by the top-level tie_word_embeddings)."""
    kind = f"model_type {multimodal.name!r} ({multimodal.description})"
    architectures = values.get("architectures")
    if architectures is not None and architectures != [multimodal.hf_architecture]:
        raise _refuse(source, "architectures", architectures, f"{kind} expects [{multimodal.hf_architecture!r}]")
    text = values.get("text_config")
    if not isinstance(text, dict):
        expected = f"{kind} holds its language model's config there, as an object"
        raise _refuse(source, "text_config", text, expected)
    model_type = text.get("model_type", multimodal.text.name)
    if model_type != multimodal.text.name:
        raise _refuse(source, "text_config.model_type", model_type, f"expected {multimodal.text.name!r}")
    shared = {name: values[name] for name in multimodal.shared_fields if name in values}
    return {**text, "model_type": multimodal.text.name, **shared}


def config_from_hf(values: Any, source: str) -> ModelConfig:
    """A ModelConfig from config.json contents (Llama, Qwen2/2.5, Qwen3, Mistral, Gemma 2/3), or a refusal naming field and value.

    A multi-modal config (Gemma 3's) gives its language model's.
    """
    if not isinstance(values, dict):
        raise PretrainedFormatError(f"{source} holds {type(values).__name__}; expected a JSON object")
    multimodal = hf_multimodal(values.get("model_type"))
    if multimodal is not None:
        return config_from_hf(_text_config(values, multimodal, source), f"the text_config of {source}")
    try:
        family = hf_family(values.get("model_type"), source)
    except FamilyError as e:
        raise PretrainedFormatError(str(e)) from e
    values = {**family.hf_defaults, **values}
    architectures = values.get("architectures")
    if architectures is not None and architectures != [family.hf_architecture]:
        raise _refuse(source, "architectures", architectures, f"expected [{family.hf_architecture!r}]")
    # Qwen3's attention_bias also biases o_proj, which scratchlm's output_proj lacks; Llama's too.
    for field in ("attention_bias", "mlp_bias"):
        if values.get(field):
            raise _refuse(source, field, values[field], "expected false (scratchlm has no o_proj or MLP bias)")
    # Gemma's configs name it hidden_activation; transformers reads that first.
    act_field = "hidden_activation" if values.get("hidden_activation") is not None else "hidden_act"
    hidden_act = values.get(act_field, family.hidden_act)
    if hidden_act != family.hidden_act:
        raise _refuse(source, act_field, hidden_act, f"expected {family.hidden_act!r} for {family.name}")
    if values.get("quantization_config") is not None:
        quantization = values["quantization_config"]
        method = quantization.get("quant_method") if isinstance(quantization, dict) else quantization
        raise _refuse(source, "quantization_config.quant_method", method, "expected unquantised float weights")

    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [field for field in required if field not in values]
    if missing:
        raise PretrainedFormatError(f"{source} lacks {missing}; a {family.name} config needs all of {list(required)}")
    hidden, heads, layers = values["hidden_size"], values["num_attention_heads"], values["num_hidden_layers"]
    head_dim = values.get("head_dim")
    if head_dim is None and isinstance(hidden, int) and isinstance(heads, int) and heads > 0 and hidden % heads != 0:
        expected = f"expected a multiple of num_attention_heads={heads} (or a head_dim)"
        raise _refuse(source, "hidden_size", hidden, expected)
    theta, rope_scaling, local_theta = _rope_from_hf(values, source)
    if not family.local_rope and local_theta is not None and local_theta != theta:
        raise _refuse(source, "sliding layers' rope_theta", local_theta, f"expected {theta} ({family.name} has one base)")
    try:
        window, window_layers = family.read_window(values, layers if isinstance(layers, int) else 0, source)
        extra = family.read_fields(values, source)
        if family.local_rope and local_theta is not None:
            extra["local_rope_theta"] = local_theta
        return ModelConfig(
            vocab_size=values["vocab_size"],
            context_length=values.get("max_position_embeddings", _HF_DEFAULTS["max_position_embeddings"]),
            d_model=hidden,
            num_layers=layers,
            num_heads=heads,
            d_ff=values["intermediate_size"],
            rope_theta=theta,
            num_kv_heads=values.get("num_key_value_heads"),
            tie_embeddings=values.get("tie_word_embeddings", False),
            norm_eps=values.get("rms_norm_eps", _HF_DEFAULTS["rms_norm_eps"]),
            rope_scaling=rope_scaling,
            head_dim=head_dim,
            qkv_bias=family.qkv_bias,
            qk_norm=family.qk_norm,
            sliding_window=window,
            sliding_window_layers=window_layers,
            **extra,
        )
    except ValueError as e:  # FamilyError included
        raise PretrainedFormatError(f"{source}: {e}" if not str(e).startswith(source) else str(e)) from e


# ------------------------------------------------------------------ safetensors headers


def _shard_files(folder: Path) -> list[Path]:
    """The safetensors files holding the weights, from the index or the single file."""
    index_path = folder / WEIGHTS_INDEX_FILE
    if index_path.is_file():
        index = read_json(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise PretrainedFormatError(f"{str(index_path)!r} has no \"weight_map\" object")
        names = sorted(set(weight_map.values()))
        for name in names:
            if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
                raise PretrainedFormatError(
                    f"{str(index_path)!r} names shard {name!r}; expected a file name in the folder"
                )
        missing = [name for name in names if not (folder / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{str(index_path)!r} lists shards missing from the folder: {missing}")
        return [folder / name for name in names]
    if (folder / WEIGHTS_FILE).is_file():
        return [folder / WEIGHTS_FILE]
    pickled = [name for name in PICKLE_WEIGHTS if (folder / name).exists()]
    if pickled:
        raise PretrainedFormatError(
            f"{str(folder)!r} holds {pickled[0]} (a pickle file, which can run code when loaded); only safetensors "
            f"weights are read: convert it with transformers' save_pretrained(safe_serialization=True)"
        )
    raise FileNotFoundError(f"{str(folder)!r} has neither {WEIGHTS_FILE} nor {WEIGHTS_INDEX_FILE}")


def _read_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor name: (safetensors dtype, shape)} of one file, without reading tensor data."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as file:
            entries = {}
            for name in file.keys():
                tensor_slice = file.get_slice(name)
                entries[name] = (tensor_slice.get_dtype(), tuple(tensor_slice.get_shape()))
            return entries
    except SafetensorError as e:
        raise PretrainedFormatError(
            f"{str(path)!r} is not a readable safetensors file ({e}); truncated or corrupt?"
        ) from e


def _plan(
    folder: Path, config: ModelConfig, multimodal: Multimodal | None = None
) -> tuple[dict[str, tuple[Path, str]], dict[str, tuple[str, tuple[int, ...]]], torch.dtype, tuple[Path, str] | None]:
    """Where each weight is ({ours: (file, HF name)}), the plan check_plan reads, the file's float dtype,
    and where a tied model stores an lm_head.weight of its own (None if it stores none).

    ``multimodal``: the folder holds that language model beside other towers, whose tensors are passed over.
    """
    locations: dict[str, tuple[Path, str]] = {}
    tied_copy: tuple[Path, str] | None = None
    plan: dict[str, tuple[str, tuple[int, ...]]] = {}
    dtypes: dict[str, str] = {}
    for path in _shard_files(folder):
        for hf_name, (dtype, shape) in _read_header(path).items():
            text_name = hf_name if multimodal is None else multimodal.text_tensor_name(hf_name)
            if text_name is None or _IGNORED.fullmatch(text_name):
                continue
            ours = hf_to_scratchlm_name(text_name, config.post_norms)
            if ours is None:
                raise PretrainedFormatError(
                    f"{str(path)!r} has tensor {hf_name!r}, which a {family_name(config)} model does not have"
                )
            if ours == "lm_head.weight" and config.tie_embeddings:
                tied_copy = (path, hf_name)  # tied: transformers ignores a stored copy too
                continue
            if ours in locations:
                raise PretrainedFormatError(
                    f"tensor {hf_name!r} is stored twice: in {locations[ours][0].name} and {path.name}"
                )
            if dtype not in _FLOAT_DTYPES:
                raise PretrainedFormatError(
                    f"{str(path)!r} stores {hf_name!r} as {dtype}; expected one of {sorted(_FLOAT_DTYPES)}"
                )
            locations[ours] = (path, hf_name)
            plan[ours] = (hf_name, shape)
            dtypes[ours] = dtype
    check_plan(plan, config, repr(str(folder)))
    return locations, plan, _FLOAT_DTYPES[dtypes["token_embeddings.weight"]], tied_copy


def _warn_if_tied_copy_differs(folder: Path, embedding: tuple[Path, str], lm_head: tuple[Path, str]) -> None:
    """Warn when config.json ties the embeddings but the file's own lm_head.weight is another matrix.

    transformers then uses the embedding, and so does scratchlm; a file whose
    lm_head differs was most likely saved with the wrong tie_word_embeddings,
    and would give other logits than the model that wrote it. The two are
    compared a block of rows at a time, so no second full matrix is held.
    """
    from safetensors import safe_open

    with safe_open(embedding[0], framework="pt") as embedding_file, safe_open(lm_head[0], framework="pt") as head_file:
        rows, head = embedding_file.get_slice(embedding[1]), head_file.get_slice(lm_head[1])
        differs = tuple(rows.get_shape()) != tuple(head.get_shape())
        for start in range(0, 0 if differs else rows.get_shape()[0], _COMPARE_ROWS):
            if not torch.equal(rows[start : start + _COMPARE_ROWS], head[start : start + _COMPARE_ROWS]):
                differs = True
                break
    if differs:
        warnings.warn(
            f"{str(folder)!r}: config.json has tie_word_embeddings=true but the file's {lm_head[1]!r} differs from "
            f"{embedding[1]!r}; the embedding is used as the output matrix (as transformers does) and the stored "
            f"{lm_head[1]!r} is ignored",
            PretrainedFormatWarning,
            stacklevel=3,
        )


# ------------------------------------------------------------------ load


def load_hf_folder(
    folder: str | os.PathLike, kernels="auto", device=None, dtype: torch.dtype | None = None
) -> TransformerLM:
    """The TransformerLM stored in a Hugging Face folder of a known family (the tokenizer is read elsewhere).

    ``dtype`` None keeps the weights' dtype in the file (that of the token embedding).
    """
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{str(folder)!r} has no {CONFIG_FILE}")
    values = read_json(config_path)
    config = config_from_hf(values, repr(str(config_path)))
    locations, _, file_dtype, tied_copy = _plan(folder, config, hf_multimodal(values.get("model_type")))
    if tied_copy is not None:
        _warn_if_tied_copy_differs(folder, locations["token_embeddings.weight"], tied_copy)

    model = allocate(config, kernels, device, dtype or file_dtype)
    filler = WeightFiller(model, repr(str(folder)))
    for ours, (path, hf_name) in locations.items():
        try:
            with safe_open(path, framework="pt") as file:  # reopened per tensor: see the module docstring
                tensor = file.get_tensor(hf_name)
        except SafetensorError as e:
            raise PretrainedFormatError(f"{str(path)!r}: tensor {hf_name!r} could not be read ({e})") from e
        heads = rotary_row_heads(ours, config)
        if heads is not None:
            tensor = half_split_to_adjacent_rows(tensor, heads)
        filler.fill(ours, tensor)
        del tensor
    filler.finish()
    return model
