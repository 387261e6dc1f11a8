"""Causal multi-head self-attention with RoPE (optionally inside documents), and the KV cache used in generation."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from scratchlm.model.backends import KernelsSpec, get_op, resolve_kernels
from scratchlm.model.layers import Linear, RMSNorm, RotaryPositionEmbedding


class LayerKVCache:
    """Keys and values (after RoPE) of the tokens one attention layer has seen.

    Tensors grow by concatenation along the sequence dim: simple, and cheap
    next to the forward pass at the sizes this project generates. A sliding
    window layer (``window`` W) keeps only the last W - 1 keys between
    steps: the next query sees itself and those, never anything older.
    ``length`` counts every token seen, kept or not (it numbers positions).
    """

    def __init__(self, window: int | None = None) -> None:
        self.keys: Tensor | None = None  # (..., kv_heads, kept, d_head)
        self.values: Tensor | None = None
        self.window = window
        self.length = 0  # tokens seen so far

    def append(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Add this step's keys and values; return the kept ones followed by these (the step's keys to attend)."""
        if self.keys is None or self.values is None:
            all_keys, all_values = keys, values
        else:
            all_keys = torch.cat((self.keys, keys), dim=-2)
            all_values = torch.cat((self.values, values), dim=-2)
        self.length += keys.shape[-2]
        if self.window is None:
            self.keys, self.values = all_keys, all_values
        else:
            first_kept = max(0, all_keys.shape[-2] - (self.window - 1))
            self.keys, self.values = all_keys[..., first_kept:, :], all_values[..., first_kept:, :]
        return all_keys, all_values


class KVCache:
    """One ``LayerKVCache`` per transformer layer; pass it to ``TransformerLM.forward``.

    With a cache, a forward pass only runs the new tokens: their positions
    continue from ``length``, and attention also sees the cached keys.
    """

    def __init__(self, num_layers: int, windows: list[int | None] | None = None) -> None:
        windows = [None] * num_layers if windows is None else windows
        self.layers = [LayerKVCache(window) for window in windows]

    @property
    def length(self) -> int:
        """Number of tokens already processed."""
        return self.layers[0].length if self.layers else 0


class MultiHeadSelfAttention(nn.Module):
    """Causal self-attention; heads are stacked along the rows of each projection.

    q_proj maps d_model -> num_heads * d_head = d_model; rows h*d_head ..
    (h+1)*d_head - 1 belong to head h. RoPE turns q and k (not v) when
    ``theta`` is given.

    Grouped-query attention: with ``num_kv_heads`` < ``num_heads``, k_proj and
    v_proj map d_model -> num_kv_heads * d_head, and each key/value head serves
    a group of num_heads / num_kv_heads consecutive query heads (query head h
    reads key/value head h // group). The attention op takes k and v with
    their own, smaller head count and never copies them per query head; the
    KV cache stores them at that size, which is what makes GQA cheap to decode.
    ``num_kv_heads`` = 1 is multi-query attention.

    Family options (all off by default, giving the Llama layer): ``head_dim``
    other than d_model / num_heads (q_proj then maps d_model -> num_heads *
    head_dim and output_proj back); ``qkv_bias``, biases on q_proj, k_proj
    and v_proj (Qwen2); ``qk_norm``, an RMSNorm ``q_norm`` / ``k_norm`` of
    size head_dim over each head's q and k before RoPE (Qwen3); ``scale``
    for q.k (None: head_dim ** -0.5); ``window`` W, a sliding window (query
    i sees keys i-W+1..i; Mistral, Qwen2's upper layers); ``softcap`` c, scores
    turned into c * tanh(score / c) before the softmax (Gemma 2);
    ``norm_offset``, the q/k norms' weight offset (Gemma 3: 1.0).
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        max_seq_len: int | None = None,
        theta: float | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        kernels: KernelsSpec = "reference",
        num_kv_heads: int | None = None,
        rope_scaling: dict | None = None,
        rope: RotaryPositionEmbedding | None = None,
        head_dim: int | None = None,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        norm_eps: float = 1e-5,
        scale: float | None = None,
        window: int | None = None,
        softcap: float | None = None,
        norm_offset: float = 0.0,
    ) -> None:
        super().__init__()
        if head_dim is None and d_model % num_heads != 0:
            raise ValueError(f"d_model={d_model} with num_heads={num_heads}: expected d_model divisible by num_heads")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_kv_heads <= 0 or num_heads % num_kv_heads != 0:
            raise ValueError(
                f"num_kv_heads={num_kv_heads} with num_heads={num_heads}: expected a divisor of num_heads"
            )
        if theta is not None and max_seq_len is None:
            raise ValueError("max_seq_len=None with theta set: expected max_seq_len, the size of the RoPE tables")
        backends = resolve_kernels(kernels, device)
        self.d_model = d_model
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.d_head = d_model // num_heads if head_dim is None else head_dim
        self.scale = scale
        self.window = window
        q_dim, kv_dim = num_heads * self.d_head, num_kv_heads * self.d_head
        self.q_proj = Linear(d_model, q_dim, device=device, dtype=dtype, bias=qkv_bias)
        self.k_proj = Linear(d_model, kv_dim, device=device, dtype=dtype, bias=qkv_bias)
        self.v_proj = Linear(d_model, kv_dim, device=device, dtype=dtype, bias=qkv_bias)
        self.output_proj = Linear(q_dim, d_model, device=device, dtype=dtype)
        self.q_norm: RMSNorm | None = None
        self.k_norm: RMSNorm | None = None
        if qk_norm:
            norm = dict(device=device, dtype=dtype, backend=backends["rmsnorm"], offset=norm_offset)
            self.q_norm = RMSNorm(self.d_head, norm_eps, **norm)
            self.k_norm = RMSNorm(self.d_head, norm_eps, **norm)
        # Only the options a model uses go to the op, so a Llama calls it exactly as before.
        options = (("scale", scale), ("window", window), ("softcap", softcap))
        self._attention_options = {key: value for key, value in options if value is not None}
        # A model passes one ``rope`` to all its layers: the tables depend only on
        # the config, and at Llama 3.1's 131072 positions (once used) they are 32 MB each.
        self.rope: RotaryPositionEmbedding | None = rope
        if rope is None and theta is not None:
            self.rope = RotaryPositionEmbedding(
                theta, self.d_head, max_seq_len, device=device, dtype=dtype, backend=backends["rope"],
                scaling=rope_scaling,
            )  # fmt: skip
        self._attention = get_op("attention", backends["attention"], device)

    def _split_heads(self, x: Tensor) -> Tensor:
        # (..., seq, heads * d_head) -> (..., heads, seq, d_head)
        return x.unflatten(-1, (-1, self.d_head)).transpose(-3, -2)

    def forward(
        self,
        x: Tensor,
        token_positions: Tensor | None = None,
        kv_cache: LayerKVCache | None = None,
        document_ids: Tensor | None = None,
    ) -> Tensor:
        """x (..., seq, d_model) -> (..., seq, d_model).

        ``token_positions`` (..., seq) defaults to 0..seq-1, or to the
        positions after the cached ones when ``kv_cache`` is given.

        ``document_ids`` (..., keys), one integer per key position (the cached
        ones, then these seq), keeps each query inside its document: a packed
        row of several documents attends as if each were alone. RoPE needs no
        restart at a document's start: it makes scores depend only on the
        distance between positions, so a document at offset 100 attends as it
        would at 0. Ids that go down start a new document too (see
        ``scratchlm.model.backends``).
        """
        seq_len = x.shape[-2]
        q = self._split_heads(self.q_proj(x))  # (..., heads, seq, d_head)
        k = self._split_heads(self.k_proj(x))  # (..., kv_heads, seq, d_head)
        v = self._split_heads(self.v_proj(x))
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)  # per head, over d_head, before RoPE

        if self.rope is not None:
            if token_positions is None:
                # Numbered here, on the host: the RoPE tables grow to them without reading positions back.
                start = 0 if kv_cache is None else kv_cache.length
                self.rope.reserve(start + seq_len)
                token_positions = torch.arange(start, start + seq_len, device=x.device)  # (seq,)
                rotate = self.rope.rotate
            else:
                rotate = self.rope  # grows its tables to the largest given position first
            # A heads dim so the positions broadcast over heads: (..., 1, seq).
            head_positions = token_positions.unsqueeze(-2)
            q = rotate(q, head_positions)
            k = rotate(k, head_positions)

        if kv_cache is not None:
            k, v = kv_cache.append(k, v)  # (..., kv_heads, kept + seq, d_head)

        if document_ids is None:
            out = self._attention(q, k, v, **self._attention_options)  # (..., heads, seq, d_head)
        else:
            # A sliding window's cache keeps only its last keys: the ids of the dropped ones go too.
            document_ids = document_ids[..., document_ids.shape[-1] - k.shape[-2] :]
            out = self._attention(q, k, v, document_ids=document_ids, **self._attention_options)
        out = out.transpose(-3, -2).flatten(-2)  # (..., seq, heads * d_head)
        return self.output_proj(out)
