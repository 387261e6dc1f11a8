"""The fused RMSNorm kernel against float64, forward and backward."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close, assert_within_torch_error
from scratchlm.kernels.rmsnorm import launch_settings, rmsnorm

# The module itself: the package's attribute of that name is the function it exports.
rmsnorm_module = importlib.import_module("scratchlm.kernels.rmsnorm")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
on_cuda_only = pytest.mark.skipif(not CUDA, reason="large shapes are for the GPU; the interpreter is too slow")

# (2, 40000) is longer than the largest block in every dtype: the column loop.
SHAPES = [(1, 8), (4, 64), (3, 113, 1000), (2, 5, 33), (7, 4096), (2, 40000)]
LARGE_SHAPES = [pytest.param((4096, 8192), marks=on_cuda_only), pytest.param((16, 32768), marks=on_cuda_only)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NAMES = ("y", "dx", "dweight")


def _inputs(shape, dtype, weight_dtype=None):
    x = torch.randn(shape, device=DEVICE, dtype=dtype) * 3 + 0.5
    weight = torch.randn(shape[-1], device=DEVICE, dtype=weight_dtype or dtype)
    dy = torch.randn(shape, device=DEVICE, dtype=dtype)
    return x, weight, dy


def _reference(x, weight, dy, dtype, eps=1e-5):
    """The formula and its gradients by PyTorch autograd, in ``dtype``."""
    x = x.detach().to(dtype).requires_grad_()
    weight = weight.detach().to(dtype).requires_grad_()
    y = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * weight
    y.backward(dy.to(dtype))
    return y.detach(), x.grad, weight.grad


def _torch_same_dtype(x, weight, dy, eps=1e-5):
    """PyTorch's own fused op in the inputs' dtype, forward and backward."""
    x = x.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    y = F.rms_norm(x, (x.shape[-1],), weight, eps)
    y.backward(dy)
    return y.detach(), x.grad, weight.grad


def _run_kernel(x, weight, dy, eps=1e-5):
    x = x.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    y = rmsnorm(x, weight, eps)
    y.backward(dy)
    return y.detach(), x.grad, weight.grad


def _assert_float32_close(got, want):
    # dweight sums a row count of terms, so it gets a looser absolute tolerance.
    for g, w, name, atol in zip(got, want, NAMES, (1e-5, 1e-5, 1e-4)):
        assert_close(g, w, atol=atol, rtol=1e-5, name=name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [*SHAPES, *LARGE_SHAPES])
def test_matches_float64_reference(shape, dtype):
    x, weight, dy = _inputs(shape, dtype)
    got = _run_kernel(x, weight, dy)
    want = _reference(x, weight, dy, torch.float64)
    assert all(g.dtype == dtype for g in got)
    if dtype == torch.float32:
        _assert_float32_close(got, want)
    else:
        for g, t, w, name in zip(got, _torch_same_dtype(x, weight, dy), want, NAMES):
            assert_within_torch_error(g, t, w, name=f"{name} {dtype}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_float32_weight_with_16_bit_activations(dtype):
    x, weight, dy = _inputs((3, 50, 96), dtype, weight_dtype=torch.float32)
    y, dx, dweight = _run_kernel(x, weight, dy)
    assert y.dtype == dx.dtype == dtype and dweight.dtype == torch.float32
    want = _reference(x, weight, dy, torch.float64)
    # PyTorch's own mixed-precision result: float32 math, 16-bit activations and gradients.
    same = _reference(x.float(), weight, dy.float(), torch.float32)
    same = (same[0].to(dtype), same[1].to(dtype), same[2])
    for g, t, w, name in zip((y, dx, dweight), same, want, NAMES):
        assert_within_torch_error(g.to(t.dtype), t, w, name=f"{name} {dtype} x, float32 weight")


def test_long_rows_loop_over_column_blocks(monkeypatch):
    # 256-byte blocks (64 float32 columns, the last one masked) force both
    # kernels' column loops, with 11 rows per backward program summed into one dw row.
    monkeypatch.setattr(rmsnorm_module, "MAX_BLOCK_BYTES", 256)
    assert not launch_settings(42, 300, 4, torch.device(DEVICE)).one_block
    x, weight, dy = _inputs((2, 21, 300), torch.float32)
    _assert_float32_close(_run_kernel(x, weight, dy), _reference(x, weight, dy, torch.float64))


def test_non_contiguous_inputs_and_inputs_untouched():
    x = torch.randn(40, 6, device=DEVICE).t()  # (6, 40), transposed
    weight = torch.randn(80, device=DEVICE)[::2]  # stride 2
    dy = torch.randn(6, 80, device=DEVICE)[:, 1::2]  # sliced
    before = (x.clone(), weight.clone(), dy.clone())
    got = _run_kernel(x, weight, dy)
    _assert_float32_close(got, _reference(x, weight, dy, torch.float64))
    assert all(torch.equal(t, b) for t, b in zip((x, weight, dy), before))


def test_inputs_untouched_by_forward_and_backward():
    x, weight, dy = _inputs((5, 33), torch.bfloat16)
    x.requires_grad_()
    weight.requires_grad_()
    before = (x.detach().clone(), weight.detach().clone(), dy.clone())
    rmsnorm(x, weight).backward(dy)
    assert all(torch.equal(t.detach(), b) for t, b in zip((x, weight, dy), before))


@pytest.mark.parametrize("shape", [(3, 113, 1000), pytest.param((4096, 8192), marks=on_cuda_only)])
def test_backward_is_bitwise_deterministic(shape):
    x, weight, dy = _inputs(shape, torch.float32)
    first, second = _run_kernel(x, weight, dy), _run_kernel(x, weight, dy)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("eps", [0.0, 1e-5, 0.1])
@pytest.mark.parametrize("path", ["one block", "column loop"])
def test_eps_is_honoured_on_every_path(monkeypatch, path, eps):
    # RMS ~3e-3, so mean(x^2) ~1e-5 is the size of eps: where eps sits decides the result.
    if path == "column loop":
        monkeypatch.setattr(rmsnorm_module, "MAX_BLOCK_BYTES", 256)  # 64 float32 columns a block
    x, weight, dy = _inputs((4, 300), torch.float32)
    x = (x - 0.5) * 1e-3
    assert launch_settings(4, 300, 4, torch.device(DEVICE)).one_block == (path == "one block")
    got = _run_kernel(x, weight, dy, eps=eps)
    want = _reference(x, weight, dy, torch.float64, eps=eps)
    for g, w, name in zip(got, want, NAMES):
        assert_close(g, w, atol=1e-5, rtol=1e-5, name=f"{name} eps={eps} {path}")
    if eps:
        # eps outside the square root, or dropped, would be off by far more than the tolerance.
        x64, w64 = x.double(), weight.double()
        rms = x64.pow(2).mean(dim=-1, keepdim=True).sqrt()
        for wrong in (x64 / (rms + eps) * w64, x64 / rms * w64):
            assert (wrong - want[0]).abs().max() > 1e-2, "the inputs must make eps's place visible"


def test_saves_only_a_float32_rstd_beside_x_and_weight():
    x, weight, _ = _inputs((3, 7, 64), torch.bfloat16)
    weight.requires_grad_()
    y = rmsnorm(x.requires_grad_(), weight)
    saved = y.grad_fn.saved_tensors
    assert len(saved) == 3
    saved_x, saved_weight, rstd = saved
    # x and weight are kept as views (no copy of a contiguous input) ...
    assert saved_x.data_ptr() == x.data_ptr() and saved_weight.data_ptr() == weight.data_ptr()
    # ... and the only new tensor is one float32 per row.
    assert rstd.shape == (21,) and rstd.dtype == torch.float32
    want = torch.rsqrt(x.detach().double().pow(2).mean(dim=-1) + 1e-5).flatten()
    assert_close(rstd, want, atol=0, rtol=1e-5, name="rstd")


def test_empty_rows():
    x = torch.randn(0, 5, device=DEVICE, requires_grad=True)
    weight = torch.randn(5, device=DEVICE, requires_grad=True)
    y = rmsnorm(x, weight)
    y.sum().backward()
    assert y.shape == (0, 5) and x.grad.shape == (0, 5)
    assert torch.equal(weight.grad, torch.zeros(5, device=DEVICE))


def test_traced_by_torch_compile_without_graph_breaks():
    backend = "inductor" if CUDA else "aot_eager"
    compiled = torch.compile(lambda x, w: (rmsnorm(x, w) * 2).sum(), fullgraph=True, backend=backend)
    x, weight, _ = _inputs((2, 3, 40), torch.float32)
    x.requires_grad_()
    weight.requires_grad_()
    out = compiled(x, weight)
    out.backward()
    eager = _run_kernel(x, weight, torch.full((2, 3, 40), 2.0, device=DEVICE))
    assert_close(out, eager[0].sum() * 2, atol=1e-4, rtol=1e-6, name="output under compile")
    assert_close(x.grad, eager[1], atol=1e-6, rtol=1e-6, name="dx under compile")
    assert_close(weight.grad, eager[2], atol=1e-6, rtol=1e-6, name="dweight under compile")


def test_launch_settings_rule():
    cpu = torch.device("cpu")
    assert launch_settings(8, 1000, 4, cpu) == (1024, True, 4, 4)
    assert launch_settings(2, 4096, 2, cpu) == (4096, True, 8, 2)
    # 4096-column blocks on 8 warps for every dtype (16 warps cap a thread at 128 registers and the
    # one-block backward spills, test_gpu_compilation); longer rows loop over blocks.
    assert launch_settings(8, 8192, 4, cpu) == (4096, False, 8, 4)
    assert launch_settings(8, 4096, 2, cpu) == (4096, True, 8, 4)
    assert launch_settings(8, 40000, 2, cpu) == (4096, False, 8, 4)
    if CUDA:
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        assert launch_settings(10**6, 4096, 2, torch.device("cuda")).backward_programs == 4 * sms
        assert launch_settings(3, 4096, 2, torch.device("cuda")).backward_programs == 3


def _meta_weight():
    return torch.ones(3, device="meta")


@pytest.mark.parametrize(
    "x, weight, eps, error, match",
    [
        (torch.ones(2, 3, dtype=torch.int32), torch.ones(3), 1e-5, TypeError, "x has dtype torch.int32"),
        (torch.ones(2, 3), torch.ones(3, dtype=torch.int64), 1e-5, TypeError, "weight has dtype torch.int64"),
        (torch.ones(2, 3), torch.ones(4), 1e-5, ValueError, r"weight has shape \(4,\) but x has last dim 3"),
        (torch.ones(2, 3), torch.ones(1, 3), 1e-5, ValueError, r"weight has shape \(1, 3\).*expected \(3,\)"),
        (
            torch.ones(2, 3, dtype=torch.bfloat16),
            torch.ones(3, dtype=torch.float16),
            1e-5,
            TypeError,
            "weight has dtype torch.float16 but x has torch.bfloat16",
        ),
        (
            torch.ones(2, 3),
            torch.ones(3, dtype=torch.bfloat16),
            1e-5,
            TypeError,
            "weight has dtype torch.bfloat16 but x has torch.float32",
        ),
        (torch.ones(2, 3), _meta_weight(), 1e-5, ValueError, "weight is on meta but x is on cpu"),
        (torch.tensor(1.0), torch.ones(1), 1e-5, ValueError, r"x has shape \(\); expected \(\.\.\., d\)"),
        (torch.ones(2, 0), torch.ones(0), 1e-5, ValueError, r"x has shape \(2, 0\)"),
        (torch.ones(2, 3), torch.ones(3), -1.0, ValueError, "eps is -1.0; expected a finite number >= 0"),
        (torch.ones(2, 3), torch.ones(3), float("nan"), ValueError, "eps is nan"),
        ([1.0, 2.0, 3.0], torch.ones(3), 1e-5, TypeError, "x must be a torch.Tensor"),
    ],
)
def test_bad_input_is_refused(x, weight, eps, error, match):
    with pytest.raises(error, match=match):
        rmsnorm(x, weight, eps)


@pytest.mark.skipif(CUDA, reason="checks the error for CPU tensors without the interpreter")
def test_cpu_tensors_without_interpreter_are_refused(monkeypatch):
    monkeypatch.setattr(rmsnorm_module, "INTERPRETING", False)
    with pytest.raises(ValueError, match="x is on cpu; the Triton kernels need a CUDA device"):
        rmsnorm(torch.ones(2, 3), torch.ones(3))


@on_cuda_only
def test_rows_past_two_to_the_31_elements():
    # 524,291 rows of 4096: the last rows start past 2^31 elements, where a 32-bit row offset wraps.
    free, _ = torch.cuda.mem_get_info()
    if free < 30 * 2**30:
        pytest.skip("needs about 25 GiB of free GPU memory")
    cols = 4096
    rows = 2**31 // cols + 3
    x, weight, dy = _inputs((rows, cols), torch.bfloat16)
    assert x.numel() > 2**31
    y, dx, _ = _run_kernel(x, weight, dy)
    for part in (slice(0, 2), slice(rows - 3, rows)):
        want = _reference(x[part], weight, dy[part], torch.float64)
        same = _torch_same_dtype(x[part], weight, dy[part])
        for g, t, w, name in zip((y[part], dx[part]), same, want, NAMES):
            assert_within_torch_error(g, t, w, name=f"{name} rows {part.start}..{part.stop}")
