"""Reading a llama.cpp GGUF file of architecture "llama" (Llama, Mistral), "qwen2", "qwen3", "gemma2" or "gemma3".

A GGUF file is a header of typed key/value metadata (hyper-parameters under
``{architecture}.*``, the tokenizer under ``tokenizer.ggml.*``), a table of tensors
(name, ggml type, shape, offset) and the tensor data. ``gguf.GGUFReader``
memory-maps the file and parses the header only; each tensor is then read,
dequantised (``gguf.quants.dequantize``) and copied into the model on its
own.

Layout facts (checked by tests against transformers' own GGUF loader):
- A shape in the tensor table is ggml's ``ne``, fastest-varying dimension
  first: a (out, in) weight is stored as ne = [in, out], and its numpy view
  has shape reversed(ne) = (out, in), which is already PyTorch's.
- For "llama", llama.cpp's converter reorders Hugging Face's q/k rows back
  into Meta's adjacent-pair order (its ``LlamaModel.permute``), which is
  scratchlm's order, so q and k load as they are. For "qwen2" and "qwen3"
  it keeps HF's rotate_half order (llama.cpp's NeoX RoPE), so q/k rows,
  biases and q/k norm weights are reordered as for an HF folder.
- Qwen2's q/k/v biases are attn_q.bias / attn_k.bias / attn_v.bias; Qwen3's
  norms attn_q_norm / attn_k_norm; Qwen3's head dimension (128 at any
  width) is ``qwen3.attention.key_length``.
- Tensor names: token_embd, blk.{i}.attn_norm / attn_q / attn_k / attn_v /
  attn_output / ffn_norm / ffn_gate / ffn_up / ffn_down, output_norm,
  output (absent when tied to token_embd), rope_freqs (Llama 3.1 scaling,
  see :mod:`scratchlm.model.gguf_rope`).
- Gemma 2/3 ("gemma2", "gemma3"; NeoX RoPE, rows in HF order): every
  ``*norm.weight`` is stored as 1 + w (read back as w), post_attention_norm
  and post_ffw_norm follow attention and the MLP, ffn_norm is HF's
  pre_feedforward_layernorm; output is absent (tied). What the converter
  does not write is fixed in llama.cpp's code, and read so here: the
  sliding/full pattern (2, 6), Gemma 3's local RoPE base (10000) and the
  attention scale (head_dim ** -0.5, or (d_model / heads) ** -0.5 for the
  27B models). Soft-caps, the window and Gemma 3's linear scaling are keys.

Memory: pages of the mapping that were read stay in the resident set while
it is open, so each tensor's pages are given back (madvise DONTNEED) once
it is copied: the peak stays at the model plus one tensor.
"""

from __future__ import annotations

from collections.abc import Callable

import mmap
import os
import re
import warnings
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scratchlm.model.config import ModelConfig
from scratchlm.model.gguf_rope import llama3_scaling_from_factors
from scratchlm.model.transformer import TransformerLM
from scratchlm.model.families import Family, FamilyError, family_name, gguf_family
from scratchlm.model.weight_loading import (
    PretrainedFormatError,
    WeightFiller,
    allocate,
    check_plan,
    half_split_to_adjacent_rows,
    rotary_row_heads,
)

GGUF_MAGIC = b"GGUF"
ROPE_FREQS = "rope_freqs.weight"

GGUF_LAYER_NAMES = {
    "attn_norm.weight": "ln1.weight",
    "attn_q.weight": "attn.q_proj.weight",
    "attn_k.weight": "attn.k_proj.weight",
    "attn_v.weight": "attn.v_proj.weight",
    "attn_output.weight": "attn.output_proj.weight",
    "ffn_norm.weight": "ln2.weight",
    "ffn_gate.weight": "ffn.w1.weight",
    "ffn_up.weight": "ffn.w3.weight",
    "ffn_down.weight": "ffn.w2.weight",
    # Held only by the families that have them (qwen2: biases; qwen3: q/k norms).
    "attn_q.bias": "attn.q_proj.bias",
    "attn_k.bias": "attn.k_proj.bias",
    "attn_v.bias": "attn.v_proj.bias",
    "attn_q_norm.weight": "attn.q_norm.weight",
    "attn_k_norm.weight": "attn.k_norm.weight",
    # Gemma 2/3's norms after attention and after the MLP (their ffn_norm is pre_feedforward_layernorm).
    "post_attention_norm.weight": "post_attn_norm.weight",
    "post_ffw_norm.weight": "post_ffn_norm.weight",
}
GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "token_embeddings.weight",
    "output_norm.weight": "ln_final.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER = re.compile(r"blk\.(\d+)\.(.+)")


def gguf_to_scratchlm_name(gguf_name: str) -> str | None:
    """The scratchlm weight a GGUF tensor name fills, or None if it is not one."""
    if gguf_name in GGUF_GLOBAL_NAMES:
        return GGUF_GLOBAL_NAMES[gguf_name]
    match = _GGUF_LAYER.fullmatch(gguf_name)
    if match and match.group(2) in GGUF_LAYER_NAMES:
        return f"layers.{match.group(1)}.{GGUF_LAYER_NAMES[match.group(2)]}"
    return None


def is_gguf_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file starting with the GGUF magic bytes."""
    try:
        with open(path, "rb") as file:
            return file.read(4) == GGUF_MAGIC
    except OSError:
        return False


@cache
def _can_dequantize(qtype: int) -> bool:
    """Whether gguf.quants.dequantize handles ggml type ``qtype`` (tried on one block of zeros)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    try:
        qtype = GGMLQuantizationType(qtype)
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        raw = np.zeros((1, type_size), dtype=np.uint8)
        if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            raw = raw.view(np.float32 if qtype == GGMLQuantizationType.F32 else np.float16)
        return dequantize(raw, qtype).size == block_size
    except (NotImplementedError, ValueError, KeyError):
        return False


def _float32_type() -> Any:
    from gguf import GGUFValueType

    return GGUFValueType.FLOAT32


class _Metadata:
    """Typed access to a reader's key/value fields; errors name the file and key."""

    def __init__(self, reader: Any, source: str) -> None:
        self.fields, self.source = reader.fields, source

    def get(self, key: str, default: Any = None) -> Any:
        field = self.fields.get(key)
        return default if field is None else field.contents()

    def number(self, key: str, *, required: bool = True, default: Any = None, integer: bool = True) -> Any:
        value = self.get(key)
        if value is None:
            if required:
                raise PretrainedFormatError(f"{self.source} lacks metadata key {key!r}")
            return default
        kinds = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):
            expected = "an integer" if integer else "a number"
            raise PretrainedFormatError(f"{self.source} has {key}={value!r}; expected {expected} (one for all layers)")
        if isinstance(value, float) and self.fields[key].types[-1] == _float32_type():
            # A float32 key: take the shortest decimal that is the same float32 (1e-05,
            # not 9.99999974e-06), the value the file's writer meant.
            value = float(str(np.float32(value)))
        return value


def _open(path: Path) -> Any:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as e:  # the reader reports a short or damaged file from deep inside numpy
        raise PretrainedFormatError(
            f"{str(path)!r} is not a readable GGUF file ({type(e).__name__}: {e}); truncated or corrupt?"
        ) from e
    if reader.byte_order != "I":
        raise PretrainedFormatError(f"{str(path)!r} is a big-endian GGUF file; only little-endian files are read")
    file_size = path.stat().st_size
    for tensor in reader.tensors:
        if tensor.data_offset + tensor.n_bytes > file_size:
            raise PretrainedFormatError(
                f"{str(path)!r} is truncated: tensor {tensor.name!r} runs past the end of the file"
            )
    return reader


def _logical_shape(tensor: Any) -> tuple[int, ...]:
    return tuple(int(n) for n in reversed(tensor.shape.tolist()))


def _family(meta: _Metadata, source: str) -> Family:
    try:
        return gguf_family(meta.get("general.architecture"), source)
    except FamilyError as e:
        raise PretrainedFormatError(str(e)) from e


def _config(meta: _Metadata, tensors: dict[str, Any], source: str) -> ModelConfig:
    family = _family(meta, source)
    arch = family.gguf_architecture  # the prefix of every hyper-parameter key
    splits = meta.number("split.count", required=False, default=1)
    if splits != 1:
        raise PretrainedFormatError(f"{source} has split.count={splits}; expected one file (merge it with gguf-split)")
    experts = meta.number(f"{arch}.expert_count", required=False, default=0)
    if experts:
        raise PretrainedFormatError(f"{source} has {arch}.expert_count={experts}; expected 0 (a dense model)")
    gemma = family.name in _GEMMA_PATTERNS
    scaling_type = meta.get(f"{arch}.rope.scaling.type")
    if scaling_type not in (None, "none") and not (gemma and scaling_type == "linear"):
        expected = "none or linear" if gemma else "none"
        raise PretrainedFormatError(f"{source} has {arch}.rope.scaling.type={scaling_type!r}; expected {expected}")
    window = meta.get(f"{arch}.attention.sliding_window")
    if window is not None and not gemma:
        # llama.cpp's converter writes none for these architectures (its llama/qwen2/qwen3 attend fully).
        raise PretrainedFormatError(
            f"{source} has {arch}.attention.sliding_window={window!r}; expected none for architecture {arch!r}"
        )
    if "token_embd.weight" not in tensors:
        raise PretrainedFormatError(f"{source} lacks tensor 'token_embd.weight'")

    d_model = meta.number(f"{arch}.embedding_length")
    heads = meta.number(f"{arch}.attention.head_count")
    vocab = _logical_shape(tensors["token_embd.weight"])[0]
    declared_vocab = meta.number(f"{arch}.vocab_size", required=False, default=vocab)
    if declared_vocab != vocab:
        raise PretrainedFormatError(f"{source} has {arch}.vocab_size={declared_vocab} but token_embd has {vocab} rows")
    if heads <= 0:
        raise PretrainedFormatError(f"{source} has {arch}.attention.head_count={heads}; expected a positive int")
    # key_length states the head dimension when it is not embedding_length / head_count (Qwen3: 128).
    key_length = meta.number(f"{arch}.attention.key_length", required=False)
    if key_length is not None:
        head_dim, stated_as = key_length, f"{arch}.attention.key_length={key_length}"
    elif d_model % heads == 0:
        head_dim, stated_as = d_model // heads, f"embedding_length / head_count = {d_model // heads}"
    else:
        raise PretrainedFormatError(
            f"{source} has {arch}.attention.head_count={heads} for embedding_length={d_model} and no key_length"
        )
    for key in (f"{arch}.rope.dimension_count", f"{arch}.attention.value_length"):
        value = meta.number(key, required=False, default=head_dim)
        if value != head_dim:
            # RoPE on part of each head (rope.dimension_count < head dim) is not supported either.
            raise PretrainedFormatError(f"{source} has {key}={value}; expected the head dimension, {stated_as}")
    theta = meta.number(f"{arch}.rope.freq_base", required=False, default=10000.0, integer=False)
    rope_scaling = None
    if ROPE_FREQS in tensors:
        factors = _tensor_values(tensors[ROPE_FREQS]).numpy()
        original = meta.number(f"{arch}.rope.scaling.original_context_length", required=False)
        try:
            rope_scaling = llama3_scaling_from_factors(factors, theta, head_dim, original, source)
        except ValueError as e:
            raise PretrainedFormatError(str(e)) from e
    extra: dict[str, Any] = {}
    if gemma:
        extra = _gemma_config_fields(meta, family, d_model, heads, head_dim, source)
        if scaling_type == "linear":
            rope_scaling = {"rope_type": "linear", "factor": meta.number(f"{arch}.rope.scaling.factor", integer=False)}
    try:
        return ModelConfig(
            vocab_size=vocab,
            context_length=meta.number(f"{arch}.context_length"),
            d_model=d_model,
            num_layers=meta.number(f"{arch}.block_count"),
            num_heads=heads,
            d_ff=meta.number(f"{arch}.feed_forward_length"),
            rope_theta=float(theta),
            num_kv_heads=meta.number(f"{arch}.attention.head_count_kv", required=False, default=heads),
            tie_embeddings="output.weight" not in tensors,
            norm_eps=float(meta.number(f"{arch}.attention.layer_norm_rms_epsilon", integer=False)),
            rope_scaling=rope_scaling,
            head_dim=head_dim,
            qkv_bias=family.qkv_bias,
            qk_norm=family.qk_norm,
            **extra,
        )
    except ValueError as e:
        raise PretrainedFormatError(f"{source}: {e}") from e


# family -> how many layers make one sliding/full round in llama.cpp (its set_swa_pattern: the last of each
# round attends fully), which its Gemma converters do not write: Gemma 2 alternates, Gemma 3 is 5 : 1.
_GEMMA_PATTERNS = {"gemma2": 2, "gemma3_text": 6}
# llama.cpp's own base for Gemma 3's sliding layers (rope_freq_base_train_swa); the file states only the global one.
_GEMMA3_LOCAL_ROPE_THETA = 10000.0
# llama.cpp takes the 27B models' attention scale from d_model / heads, the others' from the head dimension; it
# tells them by depth (Gemma 2 27B: 46 layers, Gemma 3 27B: 62), since the converter writes no query_pre_attn_scalar.
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3_text": 62}


def _gemma_config_fields(
    meta: _Metadata, family: Family, d_model: int, heads: int, head_dim: int, source: str
) -> dict[str, Any]:
    """Gemma 2/3's ModelConfig fields from what llama.cpp writes and what it fixes in its code."""
    arch = family.gguf_architecture
    layers = meta.number(f"{arch}.block_count")
    scalar = d_model // heads if layers == _GEMMA_27B_LAYERS[family.name] else head_dim
    values = {
        "hidden_size": d_model,
        "query_pre_attn_scalar": scalar,
        "attn_logit_softcapping": meta.number(f"{arch}.attn_logit_softcapping", required=False, integer=False),
        "final_logit_softcapping": meta.number(f"{arch}.final_logit_softcapping", required=False, integer=False),
        "sliding_window": meta.number(f"{arch}.attention.sliding_window", required=False),
        "sliding_window_pattern": _GEMMA_PATTERNS[family.name],
    }
    try:
        fields = family.read_fields(values, source)
        window, window_layers = family.read_window(values, layers, source)
    except FamilyError as e:
        raise PretrainedFormatError(str(e)) from e
    fields.update(sliding_window=window, sliding_window_layers=window_layers)
    if family.local_rope:
        fields["local_rope_theta"] = _GEMMA3_LOCAL_ROPE_THETA
    return fields


def _tensor_values(tensor: Any) -> torch.Tensor:
    """One tensor as PyTorch in its logical (PyTorch-order) shape.

    F32, F16 and BF16 come as stored (views of the mapping); other types are dequantised to float32.
    """
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    shape = _logical_shape(tensor)
    qtype = tensor.tensor_type
    with warnings.catch_warnings():
        # The mapping is read-only; PyTorch warns that it cannot write to it, which is never done.
        warnings.simplefilter("ignore", UserWarning)
        if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            return torch.from_numpy(tensor.data).reshape(shape)
        if qtype == GGMLQuantizationType.BF16:
            return torch.from_numpy(tensor.data.view(np.uint16)).view(torch.bfloat16).reshape(shape)
        return torch.from_numpy(dequantize(tensor.data, qtype)).reshape(shape)


def _release_pages(reader: Any, tensor: Any) -> None:
    """Drop the tensor's pages from this process's resident set (they stay in the page cache)."""
    mapping = getattr(reader.data, "_mmap", None)
    if mapping is None or not hasattr(mapping, "madvise"):
        return
    start = tensor.data_offset // mmap.PAGESIZE * mmap.PAGESIZE
    try:
        mapping.madvise(mmap.MADV_DONTNEED, start, tensor.data_offset + tensor.n_bytes - start)
    except (OSError, ValueError, AttributeError):
        pass


def _default_dtype(tensors: dict[str, Any]) -> torch.dtype:
    """The one float type of every matrix when there is one (F32, F16, BF16), else float32."""
    from gguf import GGMLQuantizationType as Q

    float_types = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}
    matrix_types = {t.tensor_type for t in tensors.values() if len(t.shape) >= 2}
    if len(matrix_types) == 1 and next(iter(matrix_types)) in float_types:
        return float_types[next(iter(matrix_types))]
    return torch.float32


def read_gguf_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig a GGUF file describes (header only; no weights read except rope_freqs)."""
    path = Path(path)
    reader = _open(path)
    return _config(_Metadata(reader, repr(str(path))), {t.name: t for t in reader.tensors}, repr(str(path)))


def load_gguf_file(
    path: str | os.PathLike, kernels="auto", device=None, dtype: torch.dtype | None = None
) -> TransformerLM:
    """The TransformerLM stored in a llama.cpp GGUF file (see :func:`read_gguf_file`)."""
    return read_gguf_file(path, kernels, device, dtype)[0]


def read_gguf_file(
    path: str | os.PathLike,
    kernels="auto",
    device=None,
    dtype: torch.dtype | None = None,
    tokenizer_from: Callable[[dict[str, Any]], Any] | None = None,
) -> tuple[TransformerLM, Any]:
    """The TransformerLM stored in a llama.cpp GGUF file, and ``tokenizer_from(metadata)``.

    ``dtype`` None keeps F32, F16 or BF16 when every matrix has that type,
    else float32. ``tokenizer_from`` gets the file's ``tokenizer.*`` metadata
    as {key: value} (strings, numbers, lists), parsed once with the rest of
    the header, and runs before any weight is read, so a tokenizer it refuses
    costs no loading; without it the second value is None.
    """
    from gguf import GGMLQuantizationType

    path = Path(path)
    source = repr(str(path))
    reader = _open(path)
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    meta = _Metadata(reader, source)
    config = _config(meta, tensors, source)
    rows_in_hf_order = _family(meta, source).gguf_rows_in_hf_order

    plan: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, tensor in tensors.items():
        if name == ROPE_FREQS:
            continue
        ours = gguf_to_scratchlm_name(name)
        if ours is None:
            raise PretrainedFormatError(
                f"{source} has tensor {name!r}, which a {family_name(config)} model does not have"
            )
        if not _can_dequantize(int(tensor.tensor_type)):
            raise PretrainedFormatError(
                f"{source} stores {name!r} as ggml type {GGMLQuantizationType(tensor.tensor_type).name}, "
                f"which the installed gguf package cannot dequantise"
            )
        plan[ours] = (name, _logical_shape(tensor))
    check_plan(plan, config, source)
    tokenizer = None
    if tokenizer_from is not None:
        metadata = {key: field.contents() for key, field in reader.fields.items() if key.startswith("tokenizer.")}
        tokenizer = tokenizer_from(metadata)

    model = allocate(config, kernels, device, dtype or _default_dtype(tensors))
    filler = WeightFiller(model, source)
    for ours, (name, _) in plan.items():
        values = _tensor_values(tensors[name])
        if config.norm_offset and name.endswith("norm.weight"):
            # llama.cpp's Gemma converters store every norm weight plus 1 (the scale itself); ours is w of (1 + w).
            values = values.float() - config.norm_offset
        heads = rotary_row_heads(ours, config) if rows_in_hf_order else None
        if heads is not None:
            values = half_split_to_adjacent_rows(values, heads)
        filler.fill(ours, values)
        _release_pages(reader, tensors[name])
    filler.finish()
    return model, tokenizer
