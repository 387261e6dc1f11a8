"""Linear, Embedding, RMSNorm, SwiGLU, softmax, silu and RoPE against independent references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close

from scratchlm.model import Embedding, Linear, RMSNorm, RotaryPositionEmbedding, SwiGLU, silu, softmax

BACKENDS = ["reference", "torch"]


def truncated_normal_std(std: float, cut: float = 3.0) -> float:
    """Standard deviation of N(0, std^2) truncated to [-cut*std, cut*std]."""
    density = math.exp(-cut * cut / 2) / math.sqrt(2 * math.pi)
    mass = math.erf(cut / math.sqrt(2))
    return std * math.sqrt(1 - 2 * cut * density / mass)


# ---- Linear and Embedding ---------------------------------------------------


def test_linear_matches_f_linear():
    layer = Linear(37, 53)
    x = torch.randn(2, 5, 37)
    assert layer.weight.shape == (53, 37)
    assert [name for name, _ in layer.named_parameters()] == ["weight"]
    assert_close(layer(x), F.linear(x, layer.weight), atol=1e-6, rtol=1e-6, name="linear")


def test_linear_init_is_truncated_normal_with_glorot_std():
    fan_in, fan_out = 1000, 2000
    weight = Linear(fan_in, fan_out).weight.detach()
    std = math.sqrt(2 / (fan_in + fan_out))
    assert abs(weight.mean().item()) < 0.01 * std
    assert weight.std().item() == pytest.approx(truncated_normal_std(std), rel=0.01)
    # Cut at 3 std, and actually reaching close to the cut (not a narrower one).
    assert weight.abs().max().item() <= 3 * std * (1 + 1e-6)
    assert weight.abs().max().item() > 2.9 * std


def test_embedding_matches_f_embedding_for_any_leading_dims():
    table = Embedding(11, 7)
    ids = torch.randint(0, 11, (2, 3, 4))
    assert table.weight.shape == (11, 7)
    assert_close(table(ids), F.embedding(ids, table.weight), atol=0, rtol=0, name="embedding")


def test_embedding_init_is_truncated_standard_normal():
    weight = Embedding(2000, 500).weight.detach()
    assert abs(weight.mean().item()) < 0.01
    assert weight.std().item() == pytest.approx(truncated_normal_std(1.0), rel=0.01)
    assert weight.abs().max().item() <= 3.0 + 1e-6
    assert weight.abs().max().item() > 2.9


def test_device_and_dtype_arguments_are_used():
    assert Linear(3, 4, dtype=torch.float64).weight.dtype == torch.float64
    assert Embedding(3, 4, device="meta").weight.device.type == "meta"


# ---- softmax and silu -----------------------------------------------------------


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_softmax_matches_torch(dim):
    x = torch.randn(4, 5, 6)
    assert_close(softmax(x, dim), torch.softmax(x, dim), atol=1e-7, rtol=1e-6, name="softmax")


def test_softmax_is_stable_for_large_values():
    # exp(1000) overflows even in float64; the max subtraction must keep it finite.
    x = torch.tensor([[1000.0, 999.0, 0.0], [-1000.0, -1000.0, -1001.0], [1e30, 1e30, 1e30]])
    out = softmax(x, dim=-1)
    assert torch.isfinite(out).all()
    assert_close(out, torch.softmax(x.double(), dim=-1).float(), atol=1e-7, rtol=1e-6, name="softmax large")
    assert_close(softmax(x + 100.0, dim=-1), out, atol=1e-7, rtol=1e-6, name="shift invariance")


def test_softmax_of_half_input_keeps_dtype():
    x = torch.randn(3, 50).to(torch.bfloat16)
    out = softmax(x, dim=-1)
    assert out.dtype == torch.bfloat16
    assert_close(out, torch.softmax(x.double(), -1), atol=1e-3, rtol=8e-3, name="softmax bf16")


def test_silu_matches_formula_and_torch():
    x = torch.linspace(-20, 20, 401, dtype=torch.float64)
    assert_close(silu(x), x / (1 + torch.exp(-x)), atol=1e-12, rtol=1e-12, name="silu float64")
    assert_close(silu(x.float()), F.silu(x.float()), atol=1e-6, rtol=1e-6, name="silu vs F.silu")


# ---- RMSNorm ------------------------------------------------------------------


def rms_norm_float64(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.double()
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight.double()


@pytest.mark.parametrize("backend", BACKENDS)
def test_rmsnorm_matches_f_rms_norm_and_float64_formula(backend):
    norm = RMSNorm(33, eps=1e-5, backend=backend)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(33))
    x = torch.randn(2, 7, 33) * 3
    out = norm(x)
    assert out.dtype == torch.float32
    assert_close(out, F.rms_norm(x, (33,), norm.weight, 1e-5), atol=1e-5, rtol=1e-5, name="rmsnorm vs F")
    assert_close(out, rms_norm_float64(x, norm.weight, 1e-5), atol=1e-5, rtol=1e-5, name="rmsnorm vs float64")


@pytest.mark.parametrize("backend", BACKENDS)
def test_rmsnorm_eps_is_inside_the_square_root(backend):
    norm = RMSNorm(8, eps=0.5, backend=backend)
    x = torch.full((1, 8), 0.5)  # mean(x^2) = 0.25, so the result is 0.5 / sqrt(0.75)
    assert_close(norm(x), torch.full((1, 8), 0.5 / math.sqrt(0.75)), atol=1e-6, rtol=1e-6, name="eps")


@pytest.mark.parametrize("backend", BACKENDS)
def test_rmsnorm_bf16_input_computes_in_float32_and_casts_back(backend):
    norm = RMSNorm(512, backend=backend)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(512))
    # A large common offset: a bf16 sum of squares would lose most digits.
    x = (100 + torch.randn(4, 512)).to(torch.bfloat16)
    out = norm(x)
    assert out.dtype == torch.bfloat16
    expected = rms_norm_float64(x, norm.weight, 1e-5)
    # Only the final rounding to bf16 (8 bits of mantissa) may differ.
    assert_close(out, expected, atol=0, rtol=2**-8, name="rmsnorm bf16")


# ---- SwiGLU ---------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_swiglu_matches_formula(backend):
    ffn = SwiGLU(16, 40, backend=backend)
    assert ffn.w1.weight.shape == (40, 16)
    assert ffn.w3.weight.shape == (40, 16)
    assert ffn.w2.weight.shape == (16, 40)
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    w1, w2, w3 = (w.detach().double() for w in (ffn.w1.weight, ffn.w2.weight, ffn.w3.weight))
    gate = x @ w1.T
    expected = (gate * torch.sigmoid(gate) * (x @ w3.T)) @ w2.T
    assert_close(ffn(x.float()), expected, atol=1e-5, rtol=1e-5, name="swiglu")


# ---- RoPE -----------------------------------------------------------------------


def rope_complex_float64(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE re-derived with complex numbers: pair (x[2i], x[2i+1]) is x[2i] + i x[2i+1],
    multiplied by e^(i * pos * theta^(-2i/d))."""
    d = x.shape[-1]
    z = torch.complex(x[..., 0::2].double(), x[..., 1::2].double())  # (..., seq, d/2)
    exponents = torch.arange(d // 2, dtype=torch.float64) * 2 / d
    angles = positions.double().unsqueeze(-1) * theta ** (-exponents)  # (..., seq, d/2)
    rotated = z * torch.polar(torch.ones_like(angles), angles)
    return torch.stack((rotated.real, rotated.imag), dim=-1).flatten(-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rope_matches_complex_rotation_with_custom_positions(backend):
    theta, d_k, max_seq_len = 10000.0, 16, 64
    rope = RotaryPositionEmbedding(theta, d_k, max_seq_len, backend=backend)
    x = torch.randn(3, 5, d_k)
    positions = torch.tensor([[0, 1, 2, 3, 4], [63, 10, 7, 7, 0], [5, 40, 41, 2, 60]])  # per batch row
    assert_close(rope(x, positions), rope_complex_float64(x, positions, theta), atol=1e-5, rtol=1e-5, name="rope")


@pytest.mark.parametrize("backend", BACKENDS)
def test_rope_float64_tables_are_exact(backend):
    rope = RotaryPositionEmbedding(500000.0, 8, 4096, dtype=torch.float64, backend=backend)
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    positions = torch.tensor([0, 1, 1000, 2047, 4000, 4095])  # shared by the batch
    expected = rope_complex_float64(x, positions, 500000.0)
    assert_close(rope(x, positions), expected, atol=1e-12, rtol=1e-12, name="rope float64")


def test_rope_dot_product_depends_on_relative_position_only():
    rope = RotaryPositionEmbedding(10000.0, 32, 128)
    q, k = torch.randn(1, 32), torch.randn(1, 32)

    def score(m: int, n: int) -> float:
        return (rope(q, torch.tensor([m])) * rope(k, torch.tensor([n]))).sum().item()

    assert score(7, 3) == pytest.approx(score(104, 100), abs=1e-4)
    assert score(7, 3) != pytest.approx(score(7, 4), abs=1e-4)


def test_rope_tables_are_non_persistent_buffers():
    rope = RotaryPositionEmbedding(10000.0, 8, 16)
    assert rope.state_dict() == {}
    assert {name for name, _ in rope.named_buffers()} == {"cos", "sin"}
    assert rope.cos.shape == (16, 4)
    assert rope.to(torch.float64).cos.dtype == torch.float64


def test_rope_rejects_odd_dimension():
    with pytest.raises(ValueError, match="d_k=7"):
        RotaryPositionEmbedding(10000.0, 7, 16)
