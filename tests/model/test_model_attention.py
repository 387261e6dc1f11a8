"""scaled_dot_product_attention, MultiHeadSelfAttention and the KV cache."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close

from scratchlm.model import LayerKVCache, MultiHeadSelfAttention, scaled_dot_product_attention

BACKENDS = ["reference", "torch"]


def test_sdpa_matches_torch_with_boolean_mask():
    q = torch.randn(2, 3, 5, 8)
    k = torch.randn(2, 3, 7, 8)
    v = torch.randn(2, 3, 7, 4)
    mask = torch.rand(2, 3, 5, 7) > 0.4
    mask[..., 0] = True  # every query keeps at least one key
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert_close(scaled_dot_product_attention(q, k, v, mask), expected, atol=1e-6, rtol=1e-5, name="sdpa masked")


def test_sdpa_without_mask_and_with_broadcast_mask():
    q, k, v = torch.randn(4, 6, 16), torch.randn(4, 9, 16), torch.randn(4, 9, 16)
    expected = F.scaled_dot_product_attention(q, k, v)
    assert_close(scaled_dot_product_attention(q, k, v), expected, atol=1e-6, rtol=1e-5, name="sdpa no mask")
    mask = torch.ones(6, 9, dtype=torch.bool).tril(diagonal=3)  # (queries, keys), broadcast over the 4
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert_close(scaled_dot_product_attention(q, k, v, mask), expected, atol=1e-6, rtol=1e-5, name="sdpa 2-D mask")


def test_sdpa_masked_keys_get_exactly_zero_weight():
    q, k, v = torch.randn(3, 8), torch.randn(5, 8), torch.randn(5, 8)
    mask = torch.tensor([True, False, True, False, True]).expand(3, 5)
    poisoned = v.clone()
    poisoned[~mask[0]] = 1e6
    out = scaled_dot_product_attention(q, k, v, mask)
    assert torch.equal(out, scaled_dot_product_attention(q, k, poisoned, mask))


def test_sdpa_rejects_non_boolean_mask():
    q = torch.randn(2, 4)
    with pytest.raises(ValueError, match="torch.bool"):
        scaled_dot_product_attention(q, q, q, torch.ones(2, 2))


def mhsa_float64(
    attn: MultiHeadSelfAttention, x: torch.Tensor, positions: torch.Tensor | None, theta: float | None
) -> torch.Tensor:
    """A hand-written float64 causal multi-head attention from the module's weights, head by head."""
    weights = {name: w.detach().double() for name, w in attn.state_dict().items()}
    x = x.double()
    seq, d_model = x.shape[-2], x.shape[-1]
    num_heads = attn.num_heads
    d_head = d_model // num_heads
    if positions is None:
        positions = torch.arange(seq)
    heads = []
    for h in range(num_heads):
        rows = slice(h * d_head, (h + 1) * d_head)
        q = x @ weights["q_proj.weight"][rows].T  # (..., seq, d_head)
        k = x @ weights["k_proj.weight"][rows].T
        v = x @ weights["v_proj.weight"][rows].T
        if theta is not None:
            q, k = rotate_complex(q, positions, theta), rotate_complex(k, positions, theta)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d_head)
        future = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)
        scores = scores.masked_fill(future, -math.inf)
        probs = torch.exp(scores - scores.max(-1, keepdim=True).values)
        heads.append((probs / probs.sum(-1, keepdim=True)) @ v)
    return torch.cat(heads, dim=-1) @ weights["output_proj.weight"].T


def rotate_complex(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    d = x.shape[-1]
    z = torch.complex(x[..., 0::2], x[..., 1::2])
    angles = positions.double().unsqueeze(-1) * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    z = z * torch.polar(torch.ones_like(angles), angles)
    return torch.stack((z.real, z.imag), -1).flatten(-2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("theta", [None, 10000.0])
def test_mhsa_matches_float64_forward(backend, theta):
    attn = MultiHeadSelfAttention(32, 4, max_seq_len=16, theta=theta, kernels=backend)
    x = torch.randn(2, 11, 32)
    expected = mhsa_float64(attn, x, None, theta)
    assert_close(attn(x), expected, atol=1e-5, rtol=1e-5, name="mhsa")


@pytest.mark.parametrize("backend", BACKENDS)
def test_mhsa_with_custom_token_positions(backend):
    attn = MultiHeadSelfAttention(16, 2, max_seq_len=64, theta=10000.0, kernels=backend)
    x = torch.randn(2, 6, 16)
    positions = torch.tensor([[3, 4, 5, 6, 7, 8], [50, 51, 52, 53, 54, 55]])
    expected = torch.stack([mhsa_float64(attn, x[b], positions[b], 10000.0) for b in range(2)])
    assert_close(attn(x, positions), expected, atol=1e-5, rtol=1e-5, name="mhsa positions")


def test_mhsa_is_causal():
    attn = MultiHeadSelfAttention(16, 4, max_seq_len=8, theta=10000.0)
    x = torch.randn(1, 8, 16)
    changed = x.clone()
    changed[:, 5:] = torch.randn(1, 3, 16)
    assert torch.equal(attn(x)[:, :5], attn(changed)[:, :5])
    assert not torch.allclose(attn(x)[:, 5:], attn(changed)[:, 5:])


def test_mhsa_projection_names_and_shapes():
    attn = MultiHeadSelfAttention(24, 3, max_seq_len=8, theta=10000.0)
    shapes = {name: tuple(t.shape) for name, t in attn.state_dict().items()}
    expected = (24, 24)
    assert shapes == {
        "q_proj.weight": expected,
        "k_proj.weight": expected,
        "v_proj.weight": expected,
        "output_proj.weight": expected,
    }


def test_mhsa_argument_errors():
    with pytest.raises(ValueError, match="num_heads=5"):
        MultiHeadSelfAttention(32, 5)
    with pytest.raises(ValueError, match="max_seq_len"):
        MultiHeadSelfAttention(32, 4, theta=10000.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kv_cache_chunks_match_one_full_pass(backend):
    attn = MultiHeadSelfAttention(32, 4, max_seq_len=32, theta=10000.0, kernels=backend)
    x = torch.randn(2, 13, 32)
    cache = LayerKVCache()
    pieces = [attn(x[:, :6], kv_cache=cache), attn(x[:, 6:7], kv_cache=cache), attn(x[:, 7:], kv_cache=cache)]
    assert cache.length == 13
    assert_close(torch.cat(pieces, dim=1), attn(x), atol=1e-5, rtol=1e-5, name="kv cache")
