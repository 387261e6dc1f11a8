"""The building blocks: Linear, Embedding, RMSNorm, SwiGLU and RoPE.

Each module that runs a swappable op (see ``scratchlm.model.backends``) takes
a ``backend`` name and looks its implementation up once, in ``__init__``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from scratchlm.model.backends import get_op


class Linear(nn.Module):
    """y = x W^T without bias; W is (out_features, in_features).

    Init: truncated normal, std sqrt(2 / (in + out)) (Glorot's variance for
    a layer seen from both directions), cut at +-3 std so no weight starts
    as an outlier.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        std = math.sqrt(2.0 / (in_features + out_features))
        nn.init.trunc_normal_(self.weight, mean=0.0, std=std, a=-3 * std, b=3 * std)

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.weight.T  # (..., in) @ (in, out) -> (..., out)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class Embedding(nn.Module):
    """Row lookup: token id i -> weight[i]; weight is (num_embeddings, embedding_dim).

    Init: truncated normal, std 1, cut at +-3.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim, device=device, dtype=dtype))
        nn.init.trunc_normal_(self.weight, mean=0.0, std=1.0, a=-3.0, b=3.0)

    def forward(self, token_ids: Tensor) -> Tensor:
        return self.weight[token_ids]  # (...) -> (..., embedding_dim)

    def extra_repr(self) -> str:
        return f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}"


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dim, in float32, cast back."""

    def __init__(
        self,
        d_model: int,
        eps: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        backend: str = "reference",
    ) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model, device=device, dtype=dtype))
        self._rmsnorm = get_op("rmsnorm", backend, device)

    def forward(self, x: Tensor) -> Tensor:
        return self._rmsnorm(x, self.weight, self.eps)  # (..., d_model)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class SwiGLU(nn.Module):
    """The Llama feed-forward network: w2(silu(w1 x) * w3 x).

    w1 and w3 map d_model -> d_ff (gate and value), w2 maps back.
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        backend: str = "reference",
    ) -> None:
        super().__init__()
        self.w1 = Linear(d_model, d_ff, device=device, dtype=dtype)
        self.w2 = Linear(d_ff, d_model, device=device, dtype=dtype)
        self.w3 = Linear(d_model, d_ff, device=device, dtype=dtype)
        self._swiglu = get_op("swiglu", backend, device)

    def forward(self, x: Tensor) -> Tensor:
        hidden = self._swiglu(self.w1(x), self.w3(x))  # (..., d_ff)
        return self.w2(hidden)  # (..., d_model)


def rope_frequencies(theta: float, d_k: int, scaling: dict | None = None) -> Tensor:
    """The d_k/2 angular frequencies theta^(-2i/d_k), in float64, rescaled as ``scaling`` says.

    Llama 3.1's scaling (``{"rope_type": "llama3", ...}``, see
    ``ModelConfig.rope_scaling``) stretches the model to a longer context
    without touching the fast-turning pairs, which encode local order. With
    L = original_max_position_embeddings, each frequency f has a wavelength
    2 pi / f, and:

    - wavelength < L / high_freq_factor (short): f is kept;
    - wavelength > L / low_freq_factor (long): f / factor;
    - in between: a blend that moves linearly in L / wavelength, from
      f / factor at L / low_freq_factor to f at L / high_freq_factor:
      s = (L / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor),
      f' = (1 - s) f / factor + s f.
    """
    pair_index = torch.arange(0, d_k, 2, dtype=torch.float64)  # 2i: (d_k/2,)
    frequencies = theta ** (-pair_index / d_k)  # (d_k/2,)
    if scaling is None:
        return frequencies
    factor, original = scaling["factor"], scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelengths = 2 * math.pi / frequencies
    blend = ((original / wavelengths - low) / (high - low)).clamp(0.0, 1.0)
    # blend is 1 for the short wavelengths (kept) and 0 for the long ones (divided by factor).
    return (1 - blend) * frequencies / factor + blend * frequencies


class RotaryPositionEmbedding(nn.Module):
    """RoPE (RoFormer): rotate feature pair (x[2i], x[2i+1]) by pos * theta^(-2i/d_k).

    A query at position m and a key at position n then have a dot product
    that depends on m - n only. The cos/sin tables for every position up to
    ``max_seq_len`` are computed once; they are non-persistent buffers, so they
    follow ``.to(device)`` but stay out of the state dict. ``scaling`` is
    Llama 3.1's frequency rescaling (see ``rope_frequencies``), None for plain RoPE.
    """

    def __init__(
        self,
        theta: float,
        d_k: int,
        max_seq_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        backend: str = "reference",
        scaling: dict | None = None,
    ) -> None:
        super().__init__()
        if d_k % 2 != 0:
            raise ValueError(f"d_k={d_k}: expected an even number, since RoPE rotates pairs of features")
        self.theta = theta
        self.d_k = d_k
        self.max_seq_len = max_seq_len
        self.scaling = scaling
        table_dtype = dtype if dtype is not None else torch.get_default_dtype()
        self.register_buffer("cos", torch.empty(max_seq_len, d_k // 2, device=device, dtype=table_dtype), persistent=False)
        self.register_buffer("sin", torch.empty(max_seq_len, d_k // 2, device=device, dtype=table_dtype), persistent=False)
        self.reset_tables()
        self._rope = get_op("rope", backend, device)

    @torch.no_grad()
    def reset_tables(self) -> None:
        """(Re)compute the cos/sin tables in place, on their device and in their dtype."""
        if self.cos.device.type == "meta":
            return  # shapes only; TransformerLM.empty computes them once the tables have storage
        # Angles in float64: pos * freq reaches thousands of radians, where
        # float32 would already lose about 1e-4 rad before cos/sin are taken.
        frequencies = rope_frequencies(self.theta, self.d_k, self.scaling)  # (d_k/2,)
        positions = torch.arange(self.max_seq_len, dtype=torch.float64)  # (max_seq_len,)
        angles = torch.outer(positions, frequencies)  # (max_seq_len, d_k/2)
        self.cos.copy_(torch.cos(angles))
        self.sin.copy_(torch.sin(angles))

    def forward(self, x: Tensor, token_positions: Tensor) -> Tensor:
        """x (..., seq, d_k); token_positions (..., seq) integer, broadcastable to x's leading dims."""
        cos = self.cos[token_positions]  # (..., seq, d_k/2)
        sin = self.sin[token_positions]
        return self._rope(x, cos, sin)

    def extra_repr(self) -> str:
        scaling = "" if self.scaling is None else f", scaling={self.scaling}"
        return f"theta={self.theta}, d_k={self.d_k}, max_seq_len={self.max_seq_len}{scaling}"
