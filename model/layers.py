"""The building blocks: Linear, Embedding, RMSNorm, SwiGLU and RoPE.

Each module that runs a swappable op (see ``scratchlm.model.backends``) takes
a ``backend`` name and looks its implementation up once, in ``__init__``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from scratchlm.model.backends import get_op
from scratchlm.model.config import MLP_ACTIVATIONS


class Linear(nn.Module):
    """y = x W^T (+ b with ``bias=True``); W is (out_features, in_features).

    Init: truncated normal, std sqrt(2 / (in + out)) (Glorot's variance for
    a layer seen from both directions), cut at +-3 std so no weight starts
    as an outlier; a bias starts at zero. Without ``bias`` (the default, and
    every Llama layer) there is no ``bias`` parameter at all.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = False,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        std = math.sqrt(2.0 / (in_features + out_features))
        nn.init.trunc_normal_(self.weight, mean=0.0, std=std, a=-3 * std, b=3 * std)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        y = x @ self.weight.T  # (..., in) @ (in, out) -> (..., out)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        bias = "" if self.bias is None else ", bias=True"
        return f"in_features={self.in_features}, out_features={self.out_features}{bias}"


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
    """y = x / sqrt(mean(x^2) + eps) * (offset + weight) over the last dim, in float32, cast back.

    ``offset`` 0 is the Llama norm (weight starts at 1); Gemma stores its
    weights around 0 and normalises with 1 + weight (``offset=1.0``, weight
    starting at 0), which the op computes without changing the stored weight,
    so gradients, weight decay and export see Gemma's own parameter.
    """

    def __init__(
        self,
        d_model: int,
        eps: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        backend: str = "reference",
        offset: float = 0.0,
    ) -> None:
        super().__init__()
        self.eps = eps
        self.offset = offset
        start = torch.zeros if offset == 1.0 else torch.ones
        self.weight = nn.Parameter(start(d_model, device=device, dtype=dtype))
        self._rmsnorm = get_op("rmsnorm", backend, device)
        # Only an offset model passes offset=: the Llama path calls the op exactly as before.
        self._options = {"offset": offset} if offset != 0.0 else {}

    def forward(self, x: Tensor) -> Tensor:
        return self._rmsnorm(x, self.weight, self.eps, **self._options)  # (..., d_model)

    def extra_repr(self) -> str:
        offset = f", offset={self.offset}" if self.offset else ""
        return f"{self.weight.shape[0]}, eps={self.eps}{offset}"


class SwiGLU(nn.Module):
    """The Llama feed-forward network: w2(silu(w1 x) * w3 x).

    w1 and w3 map d_model -> d_ff (gate and value), w2 maps back.
    ``activation="gelu_tanh"`` gates with GeLU (tanh approximation) instead:
    GeGLU, Gemma's MLP, through the "geglu" op.
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        backend: str = "reference",
        activation: str = "silu",
    ) -> None:
        super().__init__()
        if activation not in MLP_ACTIVATIONS:
            raise ValueError(f"activation={activation!r}: expected one of {list(MLP_ACTIVATIONS)}")
        self.activation = activation
        self.w1 = Linear(d_model, d_ff, device=device, dtype=dtype)
        self.w2 = Linear(d_ff, d_model, device=device, dtype=dtype)
        self.w3 = Linear(d_model, d_ff, device=device, dtype=dtype)
        self._gate = get_op(MLP_ACTIVATIONS[activation], backend, device)

    def forward(self, x: Tensor) -> Tensor:
        hidden = self._gate(self.w1(x), self.w3(x))  # (..., d_ff)
        return self.w2(hidden)  # (..., d_model)


def rope_frequencies(theta: float, d_k: int, scaling: dict | None = None) -> Tensor:
    """The d_k/2 angular frequencies theta^(-2i/d_k), in float64, rescaled as ``scaling`` says.

    Linear scaling (``{"rope_type": "linear", "factor": f}``) divides every
    frequency by f. Llama 3.1's scaling (``{"rope_type": "llama3", ...}``, see
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
    if scaling["rope_type"] == "linear":
        return frequencies / scaling["factor"]  # position interpolation: every angle shrinks alike
    factor, original = scaling["factor"], scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelengths = 2 * math.pi / frequencies
    blend = ((original / wavelengths - low) / (high - low)).clamp(0.0, 1.0)
    # blend is 1 for the short wavelengths (kept) and 0 for the long ones (divided by factor).
    return (1 - blend) * frequencies / factor + blend * frequencies


# Positions whose tables are built with the module. A model states its longest
# context (Llama 3.1: 131072, a bad config: 10**12), but most runs use far less:
# beyond this the tables grow with the positions actually used (``reserve``).
# 4096 positions of head dim 128 are 1 MB per table in float32.
INITIAL_ROPE_POSITIONS = 4096


class RotaryPositionEmbedding(nn.Module):
    """RoPE (RoFormer): rotate feature pair (x[2i], x[2i+1]) by pos * theta^(-2i/d_k).

    A query at position m and a key at position n then have a dot product
    that depends on m - n only. ``scaling`` is Llama 3.1's frequency
    rescaling (see ``rope_frequencies``), None for plain RoPE.

    The cos/sin tables (non-persistent buffers: they follow ``.to(device)``
    but stay out of the state dict) cover the first
    min(``max_seq_len``, ``INITIAL_ROPE_POSITIONS``) positions when built, and
    grow up to ``max_seq_len`` as later positions are asked for (``reserve``),
    so a stated context far beyond what is used costs no memory. Row p is
    the same value whenever it is computed.
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
        if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len <= 0:
            raise ValueError(f"max_seq_len={max_seq_len!r}: expected a positive int")
        self.theta = theta
        self.d_k = d_k
        self.max_seq_len = max_seq_len
        self.scaling = scaling
        # Rows are rounded to this dtype first: a table grown after ``.to(other_dtype)``
        # then holds what converting the whole table would have given.
        self._table_dtype = dtype if dtype is not None else torch.get_default_dtype()
        rows = min(max_seq_len, INITIAL_ROPE_POSITIONS)
        self.register_buffer("cos", torch.empty(rows, d_k // 2, device=device, dtype=self._table_dtype), persistent=False)
        self.register_buffer("sin", torch.empty(rows, d_k // 2, device=device, dtype=self._table_dtype), persistent=False)
        self.reset_tables()
        self._rope = get_op("rope", backend, device)

    @property
    def num_positions(self) -> int:
        """How many positions the tables cover now (grows up to ``max_seq_len``)."""
        return self.cos.shape[0]

    def _tables_up_to(self, stop: int) -> tuple[Tensor, Tensor]:
        """cos and sin of positions 0..stop-1, (stop, d_k/2), float64 on the CPU.

        Always from position 0, as one computation: the rows then come out of
        the same vectorised loop, lane for lane, as in a table built whole.
        """
        # Angles in float64: pos * freq reaches thousands of radians, where
        # float32 would already lose about 1e-4 rad before cos/sin are taken.
        frequencies = rope_frequencies(self.theta, self.d_k, self.scaling)  # (d_k/2,)
        positions = torch.arange(stop, dtype=torch.float64)  # (stop,)
        angles = torch.outer(positions, frequencies)  # (stop, d_k/2)
        return torch.cos(angles), torch.sin(angles)

    @torch.no_grad()
    def reset_tables(self) -> None:
        """(Re)compute the cos/sin tables in place, on their device and in their dtype."""
        if self.cos.device.type == "meta":
            return  # shapes only; TransformerLM.empty computes them once the tables have storage
        cos, sin = self._tables_up_to(self.num_positions)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def reserve(self, num_positions: int) -> None:
        """Make the tables cover positions 0..num_positions-1 (growing to at least twice, at most max_seq_len).

        A plain comparison when they already do, which is every call but a
        few: under torch.compile it is a shape guard, not a graph break.
        """
        if num_positions > self.num_positions:
            self._grow(num_positions)

    @torch.compiler.disable  # runs eagerly (buffers change shape); compiled code is re-traced after
    @torch.no_grad()
    def _grow(self, num_positions: int) -> None:
        if num_positions > self.max_seq_len:
            raise ValueError(
                f"RoPE asked for position {num_positions - 1}; expected positions below max_seq_len={self.max_seq_len}"
            )
        old, new = self.num_positions, min(self.max_seq_len, max(num_positions, 2 * self.num_positions))
        like = self.cos
        if like.device.type == "meta":
            self.cos, self.sin = like.new_empty(new, like.shape[1]), like.new_empty(new, like.shape[1])
            return
        cos, sin = self._tables_up_to(new)
        # Through the build dtype, then the current one: as if the rows had been there all along.
        cos, sin = (t[old:].to(self._table_dtype).to(like.device, like.dtype) for t in (cos, sin))
        self.cos = torch.cat((self.cos, cos))
        self.sin = torch.cat((self.sin, sin))

    def forward(self, x: Tensor, token_positions: Tensor) -> Tensor:
        """x (..., seq, d_k); token_positions (..., seq) integer, broadcastable to x's leading dims.

        While the tables are partial, the largest position is read back (a
        device sync) to grow them first; callers that know it on the host
        call ``reserve`` and ``rotate`` instead.
        """
        if self.num_positions < self.max_seq_len and token_positions.numel() and not torch.compiler.is_compiling():
            self.reserve(int(token_positions.max()) + 1)
        return self.rotate(x, token_positions)

    def rotate(self, x: Tensor, token_positions: Tensor) -> Tensor:
        """``forward`` without growing the tables: every position must be below ``num_positions``."""
        cos = self.cos[token_positions]  # (..., seq, d_k/2)
        sin = self.sin[token_positions]
        return self._rope(x, cos, sin)

    def extra_repr(self) -> str:
        scaling = "" if self.scaling is None else f", scaling={self.scaling}"
        return f"theta={self.theta}, d_k={self.d_k}, max_seq_len={self.max_seq_len}{scaling}"
