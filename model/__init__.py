"""scratchlm.model: reference layers, TransformerLM, the ``kernels=`` switch and generation."""

from scratchlm.model.attention import KVCache, LayerKVCache, MultiHeadSelfAttention
from scratchlm.model.backends import (
    BACKENDS,
    KERNEL_CHOICES,
    OP_ALIASES,
    OPS,
    KernelsUnavailableError,
    get_op,
    resolve_kernels,
)
from scratchlm.model.config import PRESETS, ModelConfig
from scratchlm.model.functional import document_ids_from_eos, scaled_dot_product_attention, silu, softmax
from scratchlm.model.generation import decode, generate_ids, sample_next_token, stream
from scratchlm.model.hf_export import export_hf
from scratchlm.model.hf_kernels import apply_kernels
from scratchlm.model.layers import Embedding, Linear, RMSNorm, RotaryPositionEmbedding, SwiGLU
from scratchlm.model.pretrained import load_pretrained
from scratchlm.model.transformer import TransformerBlock, TransformerLM
from scratchlm.model.weight_loading import PretrainedFormatError, PretrainedFormatWarning

__all__ = [
    "BACKENDS",
    "KERNEL_CHOICES",
    "OP_ALIASES",
    "OPS",
    "PRESETS",
    "PretrainedFormatError",
    "PretrainedFormatWarning",
    "Embedding",
    "KVCache",
    "KernelsUnavailableError",
    "LayerKVCache",
    "Linear",
    "ModelConfig",
    "MultiHeadSelfAttention",
    "RMSNorm",
    "RotaryPositionEmbedding",
    "SwiGLU",
    "TransformerBlock",
    "TransformerLM",
    "apply_kernels",
    "decode",
    "document_ids_from_eos",
    "export_hf",
    "generate_ids",
    "get_op",
    "load_pretrained",
    "resolve_kernels",
    "sample_next_token",
    "scaled_dot_product_attention",
    "silu",
    "softmax",
    "stream",
]
