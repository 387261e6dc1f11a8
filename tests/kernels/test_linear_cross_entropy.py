"""The fused linear + cross-entropy kernels against float64 logits, forward and backward."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close, assert_within_torch_error
from scratchlm.kernels import linear_cross_entropy
from scratchlm.kernels.linear_cross_entropy import INTERPRETER_SETTINGS, LaunchSettings, launch_settings

# The module itself: the package's attribute of that name is the function it exports.
lce_module = importlib.import_module("scratchlm.kernels.linear_cross_entropy")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
on_cuda_only = pytest.mark.skipif(not CUDA, reason="large shapes are for the GPU; the interpreter is too slow")

# (leading dims..., d, V): none a multiple of the interpreter's 16-row, 32-entry
# and 16-feature tiles, so every kernel meets ragged row, vocab and d tiles.
SHAPES = [(37, 24, 131), (3, 5, 41, 300), (70, 48, 97)]
LARGE_SHAPES = [
    pytest.param((4, 1000, 1024, 32003), marks=on_cuda_only),
    pytest.param((4096, 4096, 4099), marks=on_cuda_only),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NAMES = ("loss", "d_hidden", "d_weight")


def _inputs(shape, dtype, ignored_fraction=0.2):
    *lead, d, vocab = shape
    hidden = torch.randn(*lead, d, device=DEVICE) * 0.5
    weight = torch.randn(vocab, d, device=DEVICE) * d**-0.5 * 2
    targets = torch.randint(0, vocab, tuple(lead), device=DEVICE)
    targets[torch.rand(tuple(lead), device=DEVICE) < ignored_fraction] = -100
    return hidden.to(dtype), weight.to(dtype), targets


def _reference(hidden, weight, targets, dtype, reduction="mean", z_loss=0.0, ignore_index=-100, grad=None):
    """Explicit logits, F.cross_entropy plus the z-loss term, gradients by autograd, all in ``dtype``."""
    hidden = hidden.detach().to(dtype).requires_grad_()
    weight = weight.detach().to(dtype).requires_grad_()
    logits = hidden @ weight.T
    flat_targets = targets.reshape(-1).long()
    flat_logits = logits.reshape(-1, weight.shape[0])
    per_row = F.cross_entropy(flat_logits, flat_targets, ignore_index=ignore_index, reduction="none")
    counted = flat_targets != ignore_index
    if z_loss:
        lse = torch.logsumexp(flat_logits, dim=-1)
        per_row = per_row + torch.where(counted, z_loss * lse * lse, torch.zeros_like(lse))
    if reduction == "none":
        loss = per_row.view(targets.shape)
    elif reduction == "sum":
        loss = per_row.sum()
    else:
        loss = per_row.sum() / counted.sum().clamp_min(1)
    loss.backward(torch.ones_like(loss) if grad is None else grad.to(dtype))
    return loss.detach(), hidden.grad, weight.grad


def _run_kernel(hidden, weight, targets, reduction="mean", z_loss=0.0, ignore_index=-100, grad=None):
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    loss = linear_cross_entropy(hidden, weight, targets, ignore_index=ignore_index, reduction=reduction, z_loss=z_loss)
    loss.backward(torch.ones_like(loss) if grad is None else grad)
    return loss.detach(), hidden.grad, weight.grad


def _assert_float32_close(got, want, what=""):
    for g, w, name in zip(got, want, NAMES):
        assert_close(g, w, atol=2e-5, rtol=2e-5, name=f"{name}{what}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [*SHAPES, *LARGE_SHAPES])
def test_matches_float64_reference(shape, dtype):
    hidden, weight, targets = _inputs(shape, dtype)
    got = _run_kernel(hidden, weight, targets)
    want = _reference(hidden, weight, targets, torch.float64)
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == dtype
    if dtype == torch.float32:
        _assert_float32_close(got, want)
    else:
        same = _reference(hidden, weight, targets, dtype)
        for g, t, w, name in zip(got, same, want, NAMES):
            assert_within_torch_error(g.to(dtype), t, w, name=f"{name} {dtype}")


@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_and_z_loss(reduction, z_loss):
    hidden, weight, targets = _inputs((2, 19, 24, 131), torch.float32, ignored_fraction=0.3)
    grad = torch.randn(targets.shape, device=DEVICE) if reduction == "none" else torch.tensor(1.7, device=DEVICE)
    got = _run_kernel(hidden, weight, targets, reduction, z_loss, grad=grad)
    want = _reference(hidden, weight, targets, torch.float64, reduction, z_loss, grad=grad)
    _assert_float32_close(got, want, f" ({reduction}, z_loss={z_loss})")
    if reduction == "none":
        assert got[0].shape == targets.shape
        assert torch.all(got[0][targets == -100] == 0)


def test_z_loss_changes_the_result():
    hidden, weight, targets = _inputs((21, 16, 40), torch.float32)
    plain, with_z = _run_kernel(hidden, weight, targets), _run_kernel(hidden, weight, targets, z_loss=0.1)
    assert with_z[0] - plain[0] > 1e-2
    assert (with_z[2] - plain[2]).abs().max() > 1e-3


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_gives_zero_loss_and_gradients(reduction):
    hidden, weight, targets = _inputs((9, 20, 33), torch.float32)
    targets.fill_(-100)
    loss, d_hidden, d_weight = _run_kernel(hidden, weight, targets, reduction, z_loss=0.01)
    assert torch.equal(loss, torch.zeros_like(loss))
    assert torch.equal(d_hidden, torch.zeros_like(d_hidden)) and torch.equal(d_weight, torch.zeros_like(d_weight))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_other_integer_targets_and_ignore_index(dtype):
    # ignore_index 7 is a real vocabulary id here: rows targeting it are dropped.
    hidden, weight, targets = _inputs((23, 18, 40), torch.float32, ignored_fraction=0.0)
    targets[::3] = 7
    got = _run_kernel(hidden, weight, targets.to(dtype), ignore_index=7)
    _assert_float32_close(got, _reference(hidden, weight, targets, torch.float64, ignore_index=7), f" {dtype}")


def test_non_contiguous_inputs_and_inputs_untouched():
    hidden = torch.randn(24, 2, 17, device=DEVICE).permute(1, 2, 0)  # (2, 17, 24), transposed
    weight = torch.randn(70, 48, device=DEVICE)[:, ::2] * 0.3  # (70, 24), stride 2
    targets = torch.randint(0, 70, (17, 2), device=DEVICE).t()  # (2, 17), transposed
    before = (hidden.clone(), weight.clone(), targets.clone())
    got = _run_kernel(hidden, weight, targets)
    _assert_float32_close(got, _reference(hidden, weight, targets, torch.float64))
    assert all(torch.equal(t, b) for t, b in zip((hidden, weight, targets), before))


@pytest.mark.parametrize(
    "shape, dtype",
    [
        ((33, 20, 70), torch.float32),
        ((33, 20, 70), torch.bfloat16),
        pytest.param((4096, 2048, 32000), torch.bfloat16, marks=on_cuda_only),
    ],
)
def test_backward_is_bitwise_deterministic(shape, dtype):
    hidden, weight, targets = _inputs(shape, dtype)
    first, second = _run_kernel(hidden, weight, targets, z_loss=1e-3), _run_kernel(hidden, weight, targets, z_loss=1e-3)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_saves_no_logits():
    hidden, weight, targets = _inputs((2, 9, 16, 300), torch.bfloat16)
    hidden.requires_grad_()
    loss = linear_cross_entropy(hidden, weight.requires_grad_(), targets)
    saved = loss.grad_fn.saved_tensors
    # hidden and weight as views, int64 targets, a float32 lse per row and the count: nothing of size V.
    assert saved[0].data_ptr() == hidden.data_ptr() and saved[1].data_ptr() == weight.data_ptr()
    assert all(t.numel() <= 18 for t in saved[2:])
    lse = saved[3]
    want = torch.logsumexp(hidden.detach().double() @ weight.detach().double().T, dim=-1).flatten()
    assert lse.dtype == torch.float32
    assert_close(lse, want, atol=1e-5, rtol=1e-5, name="lse")


def test_empty_rows():
    hidden = torch.randn(0, 5, device=DEVICE, requires_grad=True)
    weight = torch.randn(7, 5, device=DEVICE, requires_grad=True)
    loss = linear_cross_entropy(hidden, weight, torch.zeros(0, dtype=torch.long, device=DEVICE))
    loss.backward()
    assert loss.item() == 0 and hidden.grad.shape == (0, 5)
    assert torch.equal(weight.grad, torch.zeros_like(weight))


def test_traced_by_torch_compile_without_graph_breaks():
    backend = "inductor" if CUDA else "aot_eager"
    compiled = torch.compile(
        lambda h, w, t: linear_cross_entropy(h, w, t, z_loss=1e-3) * 2, fullgraph=True, backend=backend
    )
    hidden, weight, targets = _inputs((20, 16, 50), torch.float32)
    hidden.requires_grad_()
    weight.requires_grad_()
    out = compiled(hidden, weight, targets)
    out.backward()
    eager = _run_kernel(hidden, weight, targets, z_loss=1e-3, grad=torch.tensor(2.0, device=DEVICE))
    assert_close(out, eager[0] * 2, atol=1e-6, rtol=1e-6, name="loss under compile")
    assert_close(hidden.grad, eager[1], atol=1e-7, rtol=1e-6, name="d_hidden under compile")
    assert_close(weight.grad, eager[2], atol=1e-7, rtol=1e-6, name="d_weight under compile")


def test_interpreter_tiles_are_smaller_than_the_test_shapes():
    # The shapes above must span several tiles of each kind for the tests to mean anything.
    block_m, block_v, block_d = INTERPRETER_SETTINGS[:3]
    assert block_m < 37 and block_v < 131 and block_d < 24


def test_launch_settings_rule(monkeypatch):
    if not CUDA:
        assert launch_settings(2) == launch_settings(4) == INTERPRETER_SETTINGS
    monkeypatch.setattr(lce_module, "INTERPRETING", False)
    # The settings that compile without spills from sm_80 to sm_120 (test_gpu_compilation checks them).
    assert launch_settings(2) == LaunchSettings(64, 128, 32, 8, 3)
    assert launch_settings(4) == LaunchSettings(16, 64, 16, 8, 3)


def _ones(*shape, **kwargs):
    return torch.ones(*shape, **kwargs)


def _targets(*shape, values=0, dtype=torch.long):
    return torch.full(shape, values, dtype=dtype)


@pytest.mark.parametrize(
    "hidden, weight, targets, kwargs, error, match",
    [
        (_ones(4, 3, dtype=torch.int32), _ones(5, 3), _targets(4), {}, TypeError, "hidden has dtype torch.int32"),
        (_ones(4, 3), _ones(5, 3, dtype=torch.float64), _targets(4), {}, TypeError, "weight has dtype torch.float64"),
        (_ones(4, 3), _ones(5, 3, dtype=torch.bfloat16), _targets(4), {}, TypeError, "weight has dtype torch.bfloat16"),
        (_ones(4, 3), _ones(5, 4), _targets(4), {}, ValueError, r"weight has shape \(5, 4\) but hidden has d = 3"),
        (_ones(4, 3), _ones(3), _targets(4), {}, ValueError, r"weight has shape \(3,\)"),
        (_ones(4, 3), _ones(0, 3), _targets(4), {}, ValueError, r"expected \(V, 3\) with V >= 1"),
        (torch.tensor(1.0), _ones(5, 1), _targets(), {}, ValueError, r"hidden has shape \(\)"),
        (_ones(4, 0), _ones(5, 0), _targets(4), {}, ValueError, r"hidden has shape \(4, 0\)"),
        (_ones(4, 3), _ones(5, 3), _targets(5), {}, ValueError, r"targets has shape \(5,\).*expected \(4,\)"),
        (_ones(4, 3), _ones(5, 3), _ones(4), {}, TypeError, "targets has dtype torch.float32; expected an integer"),
        (_ones(4, 3), _ones(5, 3), [0, 1, 2, 3], {}, TypeError, "targets must be a torch.Tensor"),
        (_ones(4, 3), _ones(5, 3), _targets(4, values=5), {}, ValueError, r"targets holds 5, outside \[0, 5\)"),
        (_ones(4, 3), _ones(5, 3), _targets(4, values=-1), {}, ValueError, r"targets holds -1, outside \[0, 5\)"),
        (_ones(4, 3), _ones(5, 3), _targets(4), {"reduction": "avg"}, ValueError, "reduction is 'avg'"),
        (_ones(4, 3), _ones(5, 3), _targets(4), {"z_loss": -1.0}, ValueError, "z_loss is -1.0; expected a finite"),
        (_ones(4, 3), _ones(5, 3), _targets(4), {"z_loss": float("nan")}, ValueError, "z_loss is nan"),
        (_ones(4, 3), _ones(5, 3), _targets(4), {"ignore_index": 1.5}, TypeError, "ignore_index is 1.5"),
        ([1.0], _ones(5, 3), _targets(4), {}, TypeError, "hidden must be a torch.Tensor"),
    ],
)
def test_bad_input_is_refused(hidden, weight, targets, kwargs, error, match):
    if isinstance(hidden, torch.Tensor):
        hidden, weight = hidden.to(DEVICE), weight.to(DEVICE)
    if isinstance(targets, torch.Tensor):
        targets = targets.to(DEVICE)
    with pytest.raises(error, match=match):
        linear_cross_entropy(hidden, weight, targets, **kwargs)


def test_targets_equal_to_ignore_index_are_not_range_checked():
    hidden, weight, targets = _inputs((6, 8, 10), torch.float32, ignored_fraction=0.0)
    targets[2] = -1
    got = _run_kernel(hidden, weight, targets, ignore_index=-1)
    _assert_float32_close(got, _reference(hidden, weight, targets, torch.float64, ignore_index=-1))


@pytest.mark.skipif(CUDA, reason="checks the error for CPU tensors without the interpreter")
def test_cpu_tensors_without_interpreter_are_refused(monkeypatch):
    monkeypatch.setattr(lce_module, "INTERPRETING", False)
    with pytest.raises(ValueError, match="hidden is on cpu; the Triton kernels need a CUDA device"):
        linear_cross_entropy(torch.ones(2, 3), torch.ones(4, 3), torch.zeros(2, dtype=torch.long))


@on_cuda_only
def test_rows_past_two_to_the_31_elements():
    # 1,048,579 rows of 2048 features: the last rows start past 2^31 elements of hidden.
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip("needs about 20 GiB of free GPU memory")
    rows, d, vocab = 2**31 // 2048 + 3, 2048, 512
    hidden, weight, targets = _inputs((rows, d, vocab), torch.bfloat16)
    assert hidden.numel() > 2**31
    hidden.requires_grad_()
    loss = linear_cross_entropy(hidden, weight, targets, reduction="none")
    loss.backward(torch.ones_like(loss))
    for part in (slice(0, 2), slice(rows - 3, rows)):
        want = _reference(hidden[part], weight, targets[part], torch.float64, reduction="none")
        same = _reference(hidden[part], weight, targets[part], torch.bfloat16, reduction="none")
        got = (loss[part].detach(), hidden.grad[part])
        for g, t, w, name in zip(got, same, want, NAMES):
            assert_within_torch_error(g.to(t.dtype), t, w, name=f"{name} rows {part.start}..{part.stop}")
