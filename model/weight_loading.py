"""What every pretrained-weight reader shares: the error type, the expected
weights of a config, the q/k row layouts, and the copy into an allocated model.

Readers (``hf_checkpoint``, ``gguf_checkpoint``) first turn a file's header
into a ``ModelConfig`` and a plan, {scratchlm name: (file name, shape)}, and
check that plan against :func:`expected_shapes` before reading any tensor;
only then is the model allocated (``TransformerLM.empty``) and filled, one
tensor at a time, by a :class:`WeightFiller`.

Rotary layouts. scratchlm turns adjacent pairs (x[2i], x[2i+1]) of each head
(RoFormer, Meta's original Llama code, llama.cpp's GGUF "llama" files).
Hugging Face's LlamaForCausalLM turns (x[i], x[i + d/2]) ("rotate_half"),
so its conversion script reorders the rows of q_proj and k_proj inside each
head: HF row c*(d/2) + i holds Meta row 2i + c (c = 0, 1). Rows of v_proj
and o_proj are never reordered, since attention's q.k products are sums over
the same reordering on both sides.
"""

from __future__ import annotations

import torch
from torch import Tensor

from scratchlm.model.config import ModelConfig
from scratchlm.model.transformer import TransformerLM


class PretrainedFormatError(ValueError):
    """A checkpoint ``load_pretrained`` cannot use: another architecture, an
    unsupported feature, a missing or extra tensor, or a truncated or corrupt file."""


class PretrainedFormatWarning(UserWarning):
    """A checkpoint that loads, but holds something its writer surely did not mean
    (a tied model storing a different lm_head)."""


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every weight a model of ``config`` loads, by scratchlm name, with its shape.

    With tied embeddings lm_head.weight is left out: it is the embedding.
    """
    d, hd, f, v = config.d_model, config.head_dim, config.d_ff, config.vocab_size
    q_rows, kv_rows = config.num_heads * hd, config.num_kv_heads * hd
    shapes: dict[str, tuple[int, ...]] = {"token_embeddings.weight": (v, d)}
    for layer in range(config.num_layers):
        p = f"layers.{layer}."
        shapes |= {
            p + "ln1.weight": (d,),
            p + "attn.q_proj.weight": (q_rows, d),
            p + "attn.k_proj.weight": (kv_rows, d),
            p + "attn.v_proj.weight": (kv_rows, d),
            p + "attn.output_proj.weight": (d, q_rows),
            p + "ln2.weight": (d,),
            p + "ffn.w1.weight": (f, d),
            p + "ffn.w3.weight": (f, d),
            p + "ffn.w2.weight": (d, f),
        }
        if config.qkv_bias:
            shapes |= {
                p + "attn.q_proj.bias": (q_rows,),
                p + "attn.k_proj.bias": (kv_rows,),
                p + "attn.v_proj.bias": (kv_rows,),
            }
        if config.qk_norm:
            shapes |= {p + "attn.q_norm.weight": (hd,), p + "attn.k_norm.weight": (hd,)}
        if config.post_norms:
            shapes |= {p + "post_attn_norm.weight": (d,), p + "post_ffn_norm.weight": (d,)}
    shapes["ln_final.weight"] = (d,)
    if not config.tie_embeddings:
        shapes["lm_head.weight"] = (v, d)
    return shapes


def check_plan(plan: dict[str, tuple[str, tuple[int, ...]]], config: ModelConfig, source: str) -> None:
    """Refuse a plan {scratchlm name: (file name, shape)} that misses a weight or has a wrong shape."""
    _check_layer_count(plan, config, source)
    expected = expected_shapes(config)
    missing = [name for name in expected if name not in plan]
    if missing:
        raise PretrainedFormatError(
            f"{source} lacks the tensor for {missing[0]!r}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    for name, (file_name, shape) in plan.items():
        if name not in expected:
            raise PretrainedFormatError(f"{source} has tensor {file_name!r}, which this model has no place for")
        if tuple(shape) != expected[name]:
            raise PretrainedFormatError(
                f"{source} has tensor {file_name!r} of shape {tuple(shape)}; expected {expected[name]} from its config"
            )


def _check_layer_count(plan: dict[str, tuple[str, tuple[int, ...]]], config: ModelConfig, source: str) -> None:
    """Refuse a config stating more layers than the file has tensors for, before listing its weights.

    ``expected_shapes`` builds nine (or more) entries per stated layer: a config.json
    saying num_hidden_layers = 10**12 must be refused from the file's own
    tensor count, not by building that list first.
    """
    present = {name.split(".")[1] for name in plan if name.startswith("layers.")}
    if config.num_layers > len(present):
        raise PretrainedFormatError(
            f"{source} states {config.num_layers} layers but holds tensors for {len(present)}; "
            f"expected one set of weights per layer"
        )


def half_split_to_adjacent_rows(weight: Tensor, num_heads: int) -> Tensor:
    """q/k rows in HF's rotate_half order -> adjacent-pair order (a view when possible).

    Per head, output row 2i + c takes input row c*(d/2) + i. A 1-D tensor
    (a q/k bias, or Qwen3's q_norm/k_norm weight with ``num_heads`` 1) is
    reordered the same way, as a column.
    """
    rows, trailing = weight.shape[0], weight.shape[1:]
    head_dim = rows // num_heads
    return weight.reshape(num_heads, 2, head_dim // 2, *trailing).transpose(1, 2).reshape(weight.shape)


def adjacent_to_half_split_rows(weight: Tensor, num_heads: int) -> Tensor:
    """The inverse of :func:`half_split_to_adjacent_rows`: per head, row c*(d/2) + i takes row 2i + c."""
    rows, trailing = weight.shape[0], weight.shape[1:]
    head_dim = rows // num_heads
    return weight.reshape(num_heads, head_dim // 2, 2, *trailing).transpose(1, 2).reshape(weight.shape)


def rotary_row_heads(name: str, config: ModelConfig) -> int | None:
    """How many heads' rows the weight ``name`` stacks along its first dim if RoPE's pair order touches
    them (q/k projections and biases, q/k norms: one head), else None (nothing to reorder)."""
    if name.endswith(("attn.q_proj.weight", "attn.q_proj.bias")):
        return config.num_heads
    if name.endswith(("attn.k_proj.weight", "attn.k_proj.bias")):
        return config.num_kv_heads
    if name.endswith(("attn.q_norm.weight", "attn.k_norm.weight")):
        return 1
    return None


class WeightFiller:
    """Copies tensors into an allocated model by scratchlm name, each exactly once.

    The model's own state dict holds the destinations (with tied embeddings
    lm_head.weight is the embedding, filled through that name only).
    """

    def __init__(self, model: TransformerLM, source: str) -> None:
        self.source = source
        self._targets = model.state_dict(keep_vars=True)
        self._pending = set(expected_shapes(model.config))

    @torch.no_grad()
    def fill(self, name: str, value: Tensor) -> None:
        target = self._targets[name]
        if tuple(value.shape) != tuple(target.shape):
            raise PretrainedFormatError(
                f"{self.source}: tensor for {name!r} has shape {tuple(value.shape)}; expected {tuple(target.shape)}"
            )
        if name not in self._pending:
            raise PretrainedFormatError(f"{self.source}: tensor for {name!r} given twice")
        target.copy_(value)
        self._pending.discard(name)

    def finish(self) -> None:
        """Refuse a load that left any weight unfilled (its memory would be garbage)."""
        if self._pending:
            raise PretrainedFormatError(f"{self.source}: no tensor was loaded for {sorted(self._pending)}")


def allocate(
    config: ModelConfig,
    kernels,
    device: torch.device | str | None,
    dtype: torch.dtype,
) -> TransformerLM:
    """An uninitialised model in eval mode, weights allocated once on ``device`` (None: CUDA if available)."""
    model = TransformerLM.empty(config, kernels=kernels, device=device, dtype=dtype)
    return model.eval()
