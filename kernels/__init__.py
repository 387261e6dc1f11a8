"""scratchlm.kernels: fused Triton kernels with PyTorch autograd wrappers.

Each public function is a ``torch.autograd.Function`` whose forward and
backward are Triton kernels, registered as PyTorch operators so that
``torch.compile`` traces through them without graph breaks:

- ``rmsnorm(x, weight, eps=1e-5)``: x (..., d), weight (d,)
- ``swiglu(a, b)``: silu(a) * b, elementwise
- ``apply_rope(x, cos, sin)``: x (..., seq, d); cos, sin (seq, d/2), adjacent pairs
- ``flash_attention(q, k, v, causal=True, scale=None)``: FlashAttention-2, q (..., Nq, D),
  k and v (..., Nk, D); saves only the float32 logsumexp (..., Nq) for backward.
  Grouped-query attention: k and v may have fewer heads (dim -3) than q, Hkv
  dividing Hq; query head h uses K/V head h // (Hq // Hkv), read without a copy
- ``linear_cross_entropy(hidden, weight, targets, ignore_index=-100, reduction="mean", z_loss=0.0)``:
  cross-entropy of hidden @ weight.T without ever holding the (N, V) logits

``flash_attention_tiled`` is the same algorithm in plain PyTorch, written to be
read (and a second reference in the tests).

They run on CUDA devices, and on the CPU through Triton's interpreter when
``TRITON_INTERPRET=1`` is set before Triton is imported (slow; for tests).
The model uses them with ``TransformerLM(..., kernels="triton")``.
"""

from scratchlm.kernels.flash_attention import flash_attention
from scratchlm.kernels.flash_attention_tiled import flash_attention_tiled
from scratchlm.kernels.linear_cross_entropy import linear_cross_entropy
from scratchlm.kernels.rmsnorm import rmsnorm
from scratchlm.kernels.rope import apply_rope
from scratchlm.kernels.swiglu import swiglu

__all__ = ["apply_rope", "flash_attention", "flash_attention_tiled", "linear_cross_entropy", "rmsnorm", "swiglu"]
