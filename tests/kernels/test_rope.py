"""The fused RoPE kernel against a float64 complex-number reference, forward and backward.

The reference treats each pair (x[2i], x[2i+1]) as the complex number
x[2i] + i x[2i+1] and multiplies it by cos + i sin = exp(i angle): the same
rotation written a different way from the kernel's, so a shared mistake in
the pairing or a sign is not reproduced by the check.
"""

from __future__ import annotations

import pytest
import torch

from helpers import assert_close, assert_within_torch_error
from scratchlm.kernels.rope import apply_rope
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
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
THETA = 10000.0


def _tables(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of ``shape`` (..., seq, d/2) for random positions below 4096, as the model builds them."""
    n_pairs = shape[-1]
    positions = torch.randint(0, 4096, shape[:-1], dtype=torch.float64)
    frequencies = THETA ** (-torch.arange(0, 2 * n_pairs, 2, dtype=torch.float64) / (2 * n_pairs))
    angles = positions[..., None] * frequencies  # (..., seq, d/2)
    return torch.cos(angles).to(DEVICE, dtype), torch.sin(angles).to(DEVICE, dtype)


def _reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dy: torch.Tensor):
    """Output and dx in float64 by complex multiplication, dx by autograd."""
    x64 = x.detach().to(torch.float64).contiguous().requires_grad_()
    pairs = torch.view_as_complex(x64.unflatten(-1, (-1, 2)))  # (..., seq, d/2) complex
    rotation = torch.complex(cos.to(torch.float64), sin.to(torch.float64))
    out = torch.view_as_real(pairs * rotation).flatten(-2)
    out.backward(dy.to(torch.float64))
    return out.detach(), x64.grad


def _torch_same_dtype(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dy: torch.Tensor):
    """The rotation formula evaluated by PyTorch entirely in x's dtype, and its autograd dx."""
    x = x.detach().clone().requires_grad_()
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    even, odd = x[..., 0::2], x[..., 1::2]
    out = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)
    out.backward(dy)
    return out.detach(), x.grad


def _run_kernel(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dy: torch.Tensor):
    x = x.detach().clone().requires_grad_()
    out = apply_rope(x, cos, sin)
    out.backward(dy)
    return out.detach(), x.grad


def _check(got, x, cos, sin, dy, *, atol: float = 1e-6, rtol: float = 1e-5) -> None:
    want = _reference(x, cos, sin, dy)
    assert all(g.dtype == x.dtype and g.shape == x.shape for g in got)
    if x.dtype == torch.float32:
        for g, w, name in zip(got, want, ("out", "dx")):
            assert_close(g, w, atol=atol, rtol=rtol, name=name)
    else:
        same_dtype = _torch_same_dtype(x, cos, sin, dy)
        for g, t, w, name in zip(got, same_dtype, want, ("out", "dx")):
            assert_within_torch_error(g, t, w, name=f"{name} {x.dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [*SHAPES, *LARGE_SHAPES])
def test_matches_float64_reference(shape, dtype):
    x = torch.randn(shape, device=DEVICE, dtype=dtype)
    dy = torch.randn(shape, device=DEVICE, dtype=dtype)
    cos, sin = _tables((shape[-2], shape[-1] // 2))  # float32 tables, as the model keeps them
    _check(_run_kernel(x, cos, sin, dy), x, cos, sin, dy)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tables_in_the_input_dtype(dtype):
    x = torch.randn(2, 3, 17, 8, device=DEVICE, dtype=dtype)
    dy = torch.randn(2, 3, 17, 8, device=DEVICE, dtype=dtype)
    cos, sin = _tables((17, 4), dtype)
    _check(_run_kernel(x, cos, sin, dy), x, cos, sin, dy)


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
def test_broadcast_tables(x_shape, table_shape):
    x = torch.randn(x_shape, device=DEVICE)
    dy = torch.randn(x_shape, device=DEVICE)
    cos, sin = _tables(table_shape)
    _check(_run_kernel(x, cos, sin, dy), x, cos, sin, dy)


def test_matches_the_model_rope_layer():
    rope = RotaryPositionEmbedding(THETA, 16, max_seq_len=64, device=DEVICE)
    x = torch.randn(2, 3, 9, 16, device=DEVICE)
    positions = torch.randint(0, 64, (2, 1, 9), device=DEVICE)  # (batch, 1 for heads, seq)
    got = apply_rope(x, rope.cos[positions], rope.sin[positions])
    assert_close(got, rope(x, positions), atol=1e-6, rtol=1e-5, name="out vs RotaryPositionEmbedding")


def test_non_contiguous_view_and_inputs_untouched():
    base = torch.randn(2, 17, 3, 8, device=DEVICE)  # (batch, seq, heads, d) as a projection yields
    x = base.transpose(1, 2)  # (batch, heads, seq, d), not contiguous
    cos, sin = _tables((17, 4))
    dy = torch.randn(2, 3, 17, 8, device=DEVICE)
    before = (x.clone(), cos.clone(), sin.clone(), dy.clone())
    got = _run_kernel(x, cos, sin, dy)
    _check(got, x, cos, sin, dy)
    assert all(torch.equal(a, b) for a, b in zip((x, cos, sin, dy), before))


def test_backward_is_the_inverse_rotation():
    x = torch.randn(2, 3, 17, 8, device=DEVICE)
    dy = torch.randn(2, 3, 17, 8, device=DEVICE)
    cos, sin = _tables((17, 4))
    _, dx = _run_kernel(x, cos, sin, dy)
    assert torch.equal(dx, apply_rope(dy, cos, -sin))
    round_trip = apply_rope(apply_rope(x, cos, sin), cos, -sin)
    assert_close(round_trip, x, atol=1e-6, rtol=1e-5, name="rotate then rotate back")


def test_tables_get_no_gradient():
    x = torch.randn(1, 5, 4, device=DEVICE, requires_grad=True)
    cos, sin = _tables((5, 2))
    cos.requires_grad_()
    sin.requires_grad_()
    apply_rope(x, cos, sin).sum().backward()
    assert x.grad is not None and cos.grad is None and sin.grad is None


def test_empty_input():
    x = torch.randn(2, 0, 8, device=DEVICE, requires_grad=True)
    cos, sin = _tables((0, 4))
    out = apply_rope(x, cos, sin)
    out.sum().backward()
    assert out.shape == (2, 0, 8) and x.grad.shape == (2, 0, 8)


def test_traced_by_torch_compile_without_graph_breaks():
    backend = "inductor" if CUDA else "aot_eager"
    compiled = torch.compile(lambda x, c, s: (apply_rope(x, c, s) * 2).sum(), fullgraph=True, backend=backend)
    x = torch.randn(2, 3, 17, 8, device=DEVICE, requires_grad=True)
    cos, sin = _tables((2, 1, 17, 4))
    compiled(x, cos, sin).backward()
    eager_out, eager_dx = _run_kernel(x, cos, sin, torch.full_like(x, 2.0))
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
