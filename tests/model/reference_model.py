"""The whole TransformerLM written out again in float64, from a state dict and a config alone.

Independent of the model's code: RoPE by complex multiplication with
frequencies computed pair by pair (Llama 3.1's rescaling as an if/elif
chain), attention one query head at a time reading its key/value head by
index, RMSNorm by its formula.
"""

from __future__ import annotations

import math

import torch

from scratchlm.model import ModelConfig


def rope_frequency(config: ModelConfig, pair: int) -> float:
    """The angular frequency of RoPE pair ``pair`` of a head, Llama 3.1 scaling included."""
    d_head = config.d_model // config.num_heads
    frequency = config.rope_theta ** (-2 * pair / d_head)
    scaling = config.rope_scaling
    if scaling is None:
        return frequency
    original = scaling["original_max_position_embeddings"]
    wavelength = 2 * math.pi / frequency
    if wavelength < original / scaling["high_freq_factor"]:
        return frequency
    if wavelength > original / scaling["low_freq_factor"]:
        return frequency / scaling["factor"]
    smooth = (original / wavelength - scaling["low_freq_factor"]) / (
        scaling["high_freq_factor"] - scaling["low_freq_factor"]
    )
    return (1 - smooth) * frequency / scaling["factor"] + smooth * frequency


def reference_forward(state: dict[str, torch.Tensor], config: ModelConfig, token_ids: torch.Tensor) -> torch.Tensor:
    """token_ids (batch, seq) -> logits (batch, seq, vocab) in float64."""
    w = {name: t.detach().double() for name, t in state.items()}
    seq = token_ids.shape[-1]
    d_head = config.d_model // config.num_heads
    kv_heads = config.num_kv_heads or config.num_heads
    group = config.num_heads // kv_heads
    frequencies = torch.tensor([rope_frequency(config, i) for i in range(d_head // 2)], dtype=torch.float64)
    angles = torch.arange(seq, dtype=torch.float64)[:, None] * frequencies  # (seq, d_head/2)

    def norm(x, weight):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + config.norm_eps) * weight

    def rope(x):
        z = torch.complex(x[..., 0::2], x[..., 1::2]) * torch.exp(1j * angles)
        return torch.stack((z.real, z.imag), -1).flatten(-2)

    x = w["token_embeddings.weight"][token_ids]  # (batch, seq, d_model)
    future = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)
    for layer in range(config.num_layers):
        p = f"layers.{layer}."
        h = norm(x, w[p + "ln1.weight"])
        heads = []
        for head in range(config.num_heads):
            rows = slice(head * d_head, (head + 1) * d_head)
            kv_rows = slice(head // group * d_head, (head // group + 1) * d_head)
            q = rope(h @ w[p + "attn.q_proj.weight"][rows].T)
            k = rope(h @ w[p + "attn.k_proj.weight"][kv_rows].T)
            v = h @ w[p + "attn.v_proj.weight"][kv_rows].T
            scores = (q @ k.transpose(-1, -2) / math.sqrt(d_head)).masked_fill(future, -math.inf)
            heads.append(torch.softmax(scores, dim=-1) @ v)
        x = x + torch.cat(heads, -1) @ w[p + "attn.output_proj.weight"].T
        h = norm(x, w[p + "ln2.weight"])
        gate = h @ w[p + "ffn.w1.weight"].T
        x = x + (torch.nn.functional.silu(gate) * (h @ w[p + "ffn.w3.weight"].T)) @ w[p + "ffn.w2.weight"].T
    head_weight = w["lm_head.weight"] if "lm_head.weight" in w else w["token_embeddings.weight"]
    return norm(x, w["ln_final.weight"]) @ head_weight.T
