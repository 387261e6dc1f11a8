"""Tiny random transformers models of each family apply_kernels supports, and inputs that exercise them.

Shapes cross the kernels' tile edges (seq 40, head dim 16, vocab 300) while
staying cheap under the Triton interpreter; every windowed family has a
window (16) shorter than the sequence on at least one layer.
"""

from __future__ import annotations

import torch
import transformers

VOCAB, SEQ, WINDOW = 300, 40, 16

_COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
)  # fmt: skip

# Qwen: layer 0 full attention, layer 1 windowed.
_QWEN_WINDOW = dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)

# family -> (config class, model class, config fields beyond _COMMON)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _QWEN_WINDOW),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", _QWEN_WINDOW),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=WINDOW)),
    "gemma2": (
        "Gemma2Config", "Gemma2ForCausalLM",
        dict(sliding_window=WINDOW, attn_logit_softcapping=20.0, final_logit_softcapping=10.0,
             query_pre_attn_scalar=24),
    ),
    "gemma3": (
        "Gemma3TextConfig", "Gemma3ForCausalLM",
        dict(sliding_window=WINDOW, query_pre_attn_scalar=24, layer_types=["sliding_attention", "full_attention"]),
    ),
}  # fmt: skip


def config(family: str, **overrides) -> transformers.PretrainedConfig:
    config_name, _, fields = FAMILIES[family]
    return getattr(transformers, config_name)(**{**_COMMON, **fields, **overrides}, attn_implementation="eager")


def model(family: str, seed: int = 0, config_object=None, **overrides) -> torch.nn.Module:
    """A float32 model of ``family`` with weights drawn from ``seed`` (norm weights perturbed off their init)."""
    _, model_name, _ = FAMILIES[family]
    torch.manual_seed(seed)
    built = getattr(transformers, model_name)(config_object or config(family, **overrides)).float()
    with torch.no_grad():
        for name, parameter in built.named_parameters():
            if "norm" in name:  # ones (Llama) or zeros (Gemma) would hide a wrong weight or offset
                parameter.add_(0.1 * torch.randn_like(parameter))
    return built


def twin(reference: torch.nn.Module, family: str) -> torch.nn.Module:
    """A second model of ``family`` with ``reference``'s weights, built from the same config object."""
    copy = model(family, seed=1, config_object=reference.config)
    copy.load_state_dict(reference.state_dict())
    return copy


def padded_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Two rows, one left-padded and one right-padded, some labels ignored (-100), padding ignored too."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (2, SEQ), generator=generator)
    attention_mask = torch.ones(2, SEQ, dtype=torch.long)
    attention_mask[0, :5] = 0
    attention_mask[1, -7:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    # After HF's shift the last left padding position predicts the first token; what a padding
    # position computes is up to each attention implementation (HF's own differ), so that label is ignored.
    labels[0, 5] = -100
    labels[0, 11] = labels[1, 20] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def packed_batch(seed: int = 0) -> dict:
    """Two rows of packed documents (position_ids restart at 0), one of them longer than the window.

    ``use_cache=False``: transformers' eager and SDPA masks honour packed
    position_ids only without a cache (its flash path, which apply_kernels
    follows, honours them either way).
    """
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (2, SEQ), generator=generator)
    lengths = [(13, 27), (9, 6, 25)]
    position_ids = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": input_ids.clone(), "use_cache": False}
