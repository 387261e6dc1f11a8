"""scratchlm.model: reference layers, TransformerLM, the ``kernels=`` switch and generation."""

from scratchlm.model.attention import KVCache, LayerKVCache, MultiHeadSelfAttention
from scratchlm.model.backends import (
    BACKENDS,
    KERNEL_CHOICES,
    OPS,
    KernelsUnavailableError,
    get_op,
    resolve_kernels,
)
from scratchlm.model.config import PRESETS, ModelConfig
from scratchlm.model.functional import scaled_dot_product_attention, silu, softmax
from scratchlm.model.generation import decode, generate_ids, sample_next_token, stream
from scratchlm.model.layers import Embedding, Linear, RMSNorm, RotaryPositionEmbedding, SwiGLU
from scratchlm.model.transformer import TransformerBlock, TransformerLM

__all__ = [
    "BACKENDS",
    "KERNEL_CHOICES",
    "OPS",
    "PRESETS",
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
    "decode",
    "generate_ids",
    "get_op",
    "resolve_kernels",
    "sample_next_token",
    "scaled_dot_product_attention",
    "silu",
    "softmax",
    "stream",
]
