"""The fused RoPE kernel against float64 references, forward and backward, in both layouts.

For adjacent pairs the reference treats each pair (x[2i], x[2i+1]) as the
complex number x[2i] + i x[2i+1] and multiplies it by cos + i sin =
exp(i angle): the same rotation written a different way from the kernel's, so
a shared mistake in the pairing or a sign is not reproduced by the check.
For the half layout (x[i], x[i+d/2]) the reference is Hugging Face's formula,
x * cos_full + rotate_half(x) * sin_full with tables repeated to width d, and
``transformers``' own ``apply_rotary_pos_emb`` is checked too. Every backend
of the "rope" op (reference, torch, triton) is run through ``get_op``.
"""

from __future__ import annotations

import re

import pytest
import torch

from helpers import assert_close, assert_within_torch_error
from scratchlm.kernels.rope import apply_rope
from scratchlm.model.backends import get_op
from scratchlm.model.layers import RotaryPositionEmbedding

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
on_cuda_only = pytest.mark.skipif(not CUDA, reason="large shapes are for the GPU; the interpreter is too slow")

# (..., seq, d): single pair, odd seq, head dim 64, no heads dim, and a row of
# 2050 pairs (over the 1024 pairs one loop step covers).
SHAPES = [(1, 1, 1, 2), (2, 3, 17, 8), (2, 4, 113, 64), (3, 5, 64), (1, 3, 4100)]
LARGE_SHAPES = [
    pytest.param((4, 32, 1024, 128), marks=on_cuda_only),
    pytest.param((1, 8, 8192, 128), marks=on_cuda_only),
    pytest.param((2, 16, 2048, 256), marks=on_cuda_only),
]
# The half layout at head dims 2, 6, 64 and 130 (not powers of two) and a row
# of 2050 pairs, whose partner x[i+d/2] lies a loop step or more away.
HALVES_SHAPES = [(1, 1, 1, 2), (2, 3, 17, 6), (2, 4, 113, 64), (3, 5, 130), (1, 3, 4100)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LAYOUTS = ["pairs", "halves"]
BACKENDS = ["reference", "torch", "triton"]
THETA = 10000.0


def _tables(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of ``shape`` (..., seq, d/2) for random positions below 4096, as the model builds them."""
    n_pairs = shape[-1]
    positions = torch.randint(0, 4096, shape[:-1], dtype=torch.float64)
    frequencies = THETA ** (-torch.arange(0, 2 * n_pairs, 2, dtype=torch.float64) / (2 * n_pairs))
    angles = positions[..., None] * frequencies  # (..., seq, d/2)
    return torch.cos(angles).to(DEVICE, dtype), torch.sin(angles).to(DEVICE, dtype)


def _rotate_halves(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Hugging Face's formula, x * cos_full + rotate_half(x) * sin_full, in x's dtype.

    rotate_half(x) = (-x[d/2:], x[:d/2]); the full tables repeat the d/2
    angles twice, as Hugging Face's rotary embedding builds them.
    """
    half = x.shape[-1] // 2
    rotate_half = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * torch.cat((cos, cos), dim=-1) + rotate_half * torch.cat((sin, sin), dim=-1)


def _reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dy: torch.Tensor, layout: str = "pairs"):
    """Output and dx in float64, dx by autograd: complex multiplication for pairs, Hugging Face's formula for halves."""
    x64 = x.detach().to(torch.float64).contiguous().requires_grad_()
    cos64, sin64 = cos.to(torch.float64), sin.to(torch.float64)
    if layout == "halves":
        out = _rotate_halves(x64, cos64, sin64)
    else:
        pairs = torch.view_as_complex(x64.unflatten(-1, (-1, 2)))  # (..., seq, d/2) complex
        out = torch.view_as_real(pairs * torch.complex(cos64, sin64)).flatten(-2)
    out.backward(dy.to(torch.float64))
    return out.detach(), x64.grad


def _torch_same_dtype(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dy: torch.Tensor, layout: str = "pairs"):
    """The rotation formula evaluated by PyTorch entirely in x's dtype, and its autograd dx."""
    x = x.detach().clone().requires_grad_()
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    if layout == "halves":
        out = _rotate_halves(x, cos, sin)
    else:
        even, odd = x[..., 0::2], x[..., 1::2]
        out = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)
    out.backward(dy)
    return out.detach(), x.grad


def _run_kernel(x, cos, sin, dy, layout: str = "pairs", op=apply_rope):
    """Output and dx of ``op`` (the kernel unless given) in ``layout``."""
    x = x.detach().clone().requires_grad_()
    out = op(x, cos, sin, layout=layout)
    out.backward(dy)
    return out.detach(), x.grad


def _check(got, x, cos, sin, dy, *, layout: str = "pairs", atol: float = 1e-6, rtol: float = 1e-5) -> None:
    want = _reference(x, cos, sin, dy, layout)
    assert all(g.dtype == x.dtype and g.shape == x.shape for g in got)
    if x.dtype == torch.float32:
        for g, w, name in zip(got, want, ("out", "dx")):
            assert_close(g, w, atol=atol, rtol=rtol, name=f"{name} {layout}")
    else:
        same_dtype = _torch_same_dtype(x, cos, sin, dy, layout)
        for g, t, w, name in zip(got, same_dtype, want, ("out", "dx")):
            assert_within_torch_error(g, t, w, name=f"{name} {layout} {x.dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [*SHAPES, *LARGE_SHAPES])
def test_matches_float64_reference(shape, dtype):
    x = torch.randn(shape, device=DEVICE, dtype=dtype)
    dy = torch.randn(shape, device=DEVICE, dtype=dtype)
    cos, sin = _tables((shape[-2], shape[-1] // 2))  # float32 tables, as the model keeps them
    _check(_run_kernel(x, cos, sin, dy), x, cos, sin, dy)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [*HALVES_SHAPES, *LARGE_SHAPES])
def test_halves_matches_float64_reference(shape, dtype):
    x = torch.randn(shape, device=DEVICE, dtype=dtype)
    dy = torch.randn(shape, device=DEVICE, dtype=dtype)
    cos, sin = _tables((shape[-2], shape[-1] // 2))
    _check(_run_kernel(x, cos, sin, dy, "halves"), x, cos, sin, dy, layout="halves")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tables_in_the_input_dtype(dtype, layout):
    x = torch.randn(2, 3, 17, 8, device=DEVICE, dtype=dtype)
    dy = torch.randn(2, 3, 17, 8, device=DEVICE, dtype=dtype)
    cos, sin = _tables((17, 4), dtype)
    _check(_run_kernel(x, cos, sin, dy, layout), x, cos, sin, dy, layout=layout)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [2, 6, 64, 130])
def test_halves_matches_transformers_apply_rotary_pos_emb(head_dim, dtype):
    """Hugging Face's Llama RoPE itself: its rotary embedding builds the duplicated (batch, seq, d)
    tables in x's dtype, ``apply_rotary_pos_emb`` rotates q and k (fewer k heads, as with GQA);
    the kernel gets the first half of the same tables."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    batch, seq = 2, 13
    config = LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim, rope_theta=THETA)
    q = torch.randn(batch, 3, seq, head_dim, device=DEVICE, dtype=dtype, requires_grad=True)
    k = torch.randn(batch, 1, seq, head_dim, device=DEVICE, dtype=dtype, requires_grad=True)
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    positions = torch.randint(0, 4096, (batch, seq), device=DEVICE)
    cos_full, sin_full = LlamaRotaryEmbedding(config).to(DEVICE)(q, positions)  # (batch, seq, head_dim)
    half = head_dim // 2
    # The tables hold each angle twice, so their first half is all the kernel needs.
    assert torch.equal(cos_full[..., half:], cos_full[..., :half])
    assert torch.equal(sin_full[..., half:], sin_full[..., :half])
    cos, sin = cos_full[:, None, :, :half], sin_full[:, None, :, :half]  # (batch, 1, seq, d/2)

    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos_full, sin_full)
    torch.autograd.backward((q_hf, k_hf), (dq, dk))
    hf = {"q": (q_hf.detach(), q.grad), "k": (k_hf.detach(), k.grad)}
    for name, x, dy in (("q", q, dq), ("k", k, dk)):
        got = _run_kernel(x, cos, sin, dy, "halves")
        want = _reference(x, cos, sin, dy, "halves")
        for g, h, w, part in zip(got, hf[name], want, ("out", "dx")):
            label = f"{part} of {name} vs transformers, head_dim {head_dim}"
            if dtype == torch.float32:
                assert_close(g, h, atol=1e-5, rtol=1e-5, name=label)
            else:
                # transformers computes in x's dtype: it is PyTorch's own error in the three-way rule.
                assert_within_torch_error(g, h, w, name=f"{label} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_of_the_op(backend, layout, dtype):
    """Each backend through ``get_op``, with per-sequence tables broadcast over the heads."""
    op = get_op("rope", backend)
    x = torch.randn(2, 3, 17, 130, device=DEVICE, dtype=dtype)
    dy = torch.randn(2, 3, 17, 130, device=DEVICE, dtype=dtype)
    cos, sin = _tables((2, 1, 17, 65))
    _check(_run_kernel(x, cos, sin, dy, layout, op), x, cos, sin, dy, layout=layout)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_plain_pytorch_backends_pass_gradcheck(backend, layout):
    op = get_op("rope", backend)
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    cos, sin = (t.to(torch.float64) for t in _tables((2, 1, 5, 3)))
    assert torch.autograd.gradcheck(lambda x: op(x, cos, sin, layout=layout), (x,))


def test_halves_is_pairs_with_the_features_permuted():
    """Rotating (x[i], x[i+d/2]) is rotating adjacent pairs after interleaving the two halves, exactly:
    the same products in the same order, only read from other places."""
    x = torch.randn(2, 3, 17, 130, device=DEVICE)
    cos, sin = _tables((17, 65))
    interleave = torch.arange(130, device=DEVICE).view(2, 65).t().flatten()  # 0, 65, 1, 66, ...
    halves = apply_rope(x, cos, sin, layout="halves")
    pairs = apply_rope(x[..., interleave], cos, sin)
    assert torch.equal(halves[..., interleave], pairs)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(
    "x_shape, table_shape",
    [
        ((2, 3, 17, 8), (1, 17, 4)),  # the model's default positions, unsqueezed for heads
        ((2, 3, 17, 8), (2, 1, 17, 4)),  # per-sequence positions (batch, 1, seq)
        ((2, 3, 17, 8), (3, 17, 4)),  # one table per head
        ((2, 3, 17, 8), (2, 3, 17, 4)),  # nothing broadcast
        ((3, 5, 64), (3, 5, 32)),  # per-sequence positions, no heads dim
        ((2, 2, 3, 5, 8), (2, 1, 1, 5, 4)),  # leading dims that cannot be merged into one
    ],
)
def test_broadcast_tables(x_shape, table_shape, layout):
    x = torch.randn(x_shape, device=DEVICE)
    dy = torch.randn(x_shape, device=DEVICE)
    cos, sin = _tables(table_shape)
    _check(_run_kernel(x, cos, sin, dy, layout), x, cos, sin, dy, layout=layout)


def test_matches_the_model_rope_layer():
    rope = RotaryPositionEmbedding(THETA, 16, max_seq_len=64, device=DEVICE)
    x = torch.randn(2, 3, 9, 16, device=DEVICE)
    positions = torch.randint(0, 64, (2, 1, 9), device=DEVICE)  # (batch, 1 for heads, seq)
    got = apply_rope(x, rope.cos[positions], rope.sin[positions])
    assert_close(got, rope(x, positions), atol=1e-6, rtol=1e-5, name="out vs RotaryPositionEmbedding")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_non_contiguous_view_and_inputs_untouched(layout):
    base = torch.randn(2, 17, 3, 8, device=DEVICE)  # (batch, seq, heads, d) as a projection yields
    x = base.transpose(1, 2)  # (batch, heads, seq, d), not contiguous
    cos, sin = _tables((17, 4))
    dy = torch.randn(2, 3, 17, 8, device=DEVICE)
    before = (x.clone(), cos.clone(), sin.clone(), dy.clone())
    got = _run_kernel(x, cos, sin, dy, layout)
    _check(got, x, cos, sin, dy, layout=layout)
    assert all(torch.equal(a, b) for a, b in zip((x, cos, sin, dy), before))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_backward_is_the_inverse_rotation(layout):
    x = torch.randn(2, 3, 17, 8, device=DEVICE)
    dy = torch.randn(2, 3, 17, 8, device=DEVICE)
    cos, sin = _tables((17, 4))
    _, dx = _run_kernel(x, cos, sin, dy, layout)
    assert torch.equal(dx, apply_rope(dy, cos, -sin, layout=layout))
    round_trip = apply_rope(apply_rope(x, cos, sin, layout=layout), cos, -sin, layout=layout)
    assert_close(round_trip, x, atol=1e-6, rtol=1e-5, name="rotate then rotate back")


def test_tables_get_no_gradient():
    x = torch.randn(1, 5, 4, device=DEVICE, requires_grad=True)
    cos, sin = _tables((5, 2))
    cos.requires_grad_()
    sin.requires_grad_()
    apply_rope(x, cos, sin).sum().backward()
    assert x.grad is not None and cos.grad is None and sin.grad is None


@pytest.mark.parametrize("layout", LAYOUTS)
def test_empty_input(layout):
    x = torch.randn(2, 0, 8, device=DEVICE, requires_grad=True)
    cos, sin = _tables((0, 4))
    out = apply_rope(x, cos, sin, layout=layout)
    out.sum().backward()
    assert out.shape == (2, 0, 8) and x.grad.shape == (2, 0, 8)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_traced_by_torch_compile_without_graph_breaks(layout):
    backend = "inductor" if CUDA else "aot_eager"
    compiled = torch.compile(
        lambda x, c, s: (apply_rope(x, c, s, layout=layout) * 2).sum(), fullgraph=True, backend=backend
    )
    x = torch.randn(2, 3, 17, 8, device=DEVICE, requires_grad=True)
    cos, sin = _tables((2, 1, 17, 4))
    compiled(x, cos, sin).backward()
    eager_out, eager_dx = _run_kernel(x, cos, sin, torch.full_like(x, 2.0), layout)
    assert_close(x.grad, eager_dx, atol=1e-6, rtol=1e-6, name="dx under compile")
    assert_close(compiled(x, cos, sin), (eager_out * 2).sum(), atol=1e-4, rtol=1e-6, name="out under compile")


def _float(*shape: int, dtype: torch.dtype = torch.float32, device: str = DEVICE) -> torch.Tensor:
    return torch.ones(shape, dtype=dtype, device=device)


@pytest.mark.parametrize(
    "x, cos, sin, error, match",
    [
        (_float(2, 5, 7), _float(5, 3), _float(5, 3), ValueError, r"x has shape \(2, 5, 7\); expected .* d even"),
        (_float(8), _float(4), _float(4), ValueError, r"x has shape \(8,\); expected \(\.\.\., seq, d\)"),
        (_float(2, 5, 8), _float(6, 4), _float(6, 4), ValueError, r"cos has shape \(6, 4\); expected \(5, 4\)"),
        (_float(2, 5, 8), _float(5, 3), _float(5, 3), ValueError, r"cos has shape \(5, 3\); expected \(5, 4\)"),
        (_float(2, 5, 8), _float(3, 5, 4), _float(3, 5, 4), ValueError, r"broadcastable to \(2,\)"),
        (_float(2, 5, 8), _float(1, 2, 5, 4), _float(1, 2, 5, 4), ValueError, r"cos has shape \(1, 2, 5, 4\)"),
        (_float(2, 5, 8), _float(4), _float(4), ValueError, r"cos has shape \(4,\)"),
        (_float(2, 5, 8), _float(5, 4), _float(2, 5, 4), ValueError, r"sin has shape \(2, 5, 4\) but cos has"),
        (_float(5, 8, dtype=torch.int32), _float(5, 4), _float(5, 4), TypeError, "x has dtype torch.int32"),
        (_float(5, 8), _float(5, 4, dtype=torch.int64), _float(5, 4), TypeError, "cos has dtype torch.int64"),
        (_float(5, 8), _float(5, 4, dtype=torch.float64), _float(5, 4), TypeError, "cos has dtype torch.float64"),
        (
            _float(5, 8, dtype=torch.bfloat16),
            _float(5, 4, dtype=torch.float16),
            _float(5, 4, dtype=torch.float16),
            TypeError,
            "cos has dtype torch.float16; expected float32 or x's dtype torch.bfloat16",
        ),
        (_float(5, 8), _float(5, 4), _float(5, 4, dtype=torch.float16), TypeError, "sin has dtype torch.float16 but"),
        (_float(5, 8), _float(5, 4, device="meta"), _float(5, 4), ValueError, "cos is on meta but x is on"),
        (_float(5, 8), _float(5, 4), _float(5, 4, device="meta"), ValueError, "sin is on meta but cos is on"),
        ([1.0, 2.0], _float(1, 1), _float(1, 1), TypeError, "x must be a torch.Tensor"),
    ],
)
def test_bad_input_is_refused(x, cos, sin, error, match):
    with pytest.raises(error, match=match):
        apply_rope(x, cos, sin)


@pytest.mark.parametrize("layout", ["half", "Halves", "interleaved", None])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_layout_is_refused(backend, layout):
    op = get_op("rope", backend)
    x, cos, sin = _float(2, 5, 8), _float(5, 4), _float(5, 4)
    expected = rf"layout={re.escape(repr(layout))} is not a RoPE layout; expected one of \('pairs', 'halves'\)"
    with pytest.raises(ValueError, match=expected):
        op(x, cos, sin, layout=layout)


@on_cuda_only
def test_heads_past_two_to_the_31_elements():
    # 16,400 heads of 1024 x 128: the last heads start past 2^31 elements.
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip("needs about 20 GiB of free GPU memory")
    shape = (16400, 1024, 128)
    x = torch.randn(shape, device=DEVICE, dtype=torch.bfloat16).requires_grad_()
    dy = torch.randn(shape, device=DEVICE, dtype=torch.bfloat16)
    assert x.numel() > 2**31
    cos, sin = _tables((1024, 64))
    y = apply_rope(x, cos, sin)
    y.backward(dy)
    for part in (slice(0, 2), slice(shape[0] - 2, shape[0])):
        want = _reference(x[part], cos, sin, dy[part])
        same = _torch_same_dtype(x[part], cos, sin, dy[part])
        for g, t, w, name in zip((y[part].detach(), x.grad[part]), same, want, ("y", "dx")):
            assert_within_torch_error(g, t, w, name=f"{name} heads {part.start}..{part.stop}")
