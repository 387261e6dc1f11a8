"""The one `assert_close` every numerical test uses.

On failure it reports how many elements mismatch, the worst absolute and
relative error and where, and how many NaN/inf values each side holds, which is
what one needs to tell a tolerance problem from a real bug.
"""

from __future__ import annotations

import torch


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float, name: str = "tensor") -> None:
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    bad_nonfinite = (torch.isfinite(a) != torch.isfinite(e)) | (torch.isnan(a) != torch.isnan(e))
    diff = (a - e).abs()
    tolerance = atol + rtol * e.abs()
    mismatch = (diff > tolerance) & torch.isfinite(e)
    mismatch |= bad_nonfinite
    if mismatch.any():
        finite = torch.isfinite(diff)
        worst = int(torch.where(finite, diff, torch.zeros_like(diff)).flatten().argmax())
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), a.shape)) if a.dim() else ()
        rel = diff / e.abs().clamp_min(1e-30)
        raise AssertionError(
            f"{name}: {int(mismatch.sum())} of {a.numel()} elements differ beyond atol={atol}, rtol={rtol}; "
            f"max abs error {float(diff[finite].max()) if finite.any() else float('nan'):.3e} at {index} "
            f"(actual {float(a.flatten()[worst]):.6g}, expected {float(e.flatten()[worst]):.6g}), "
            f"max rel error {float(rel[finite].max()) if finite.any() else float('nan'):.3e}; "
            f"NaN actual/expected {int(torch.isnan(a).sum())}/{int(torch.isnan(e).sum())}, "
            f"inf actual/expected {int(torch.isinf(a).sum())}/{int(torch.isinf(e).sum())}"
        )


def assert_within_torch_error(
    actual: torch.Tensor, torch_same_dtype: torch.Tensor, reference: torch.Tensor, *, name: str = "tensor"
) -> None:
    """The three-way rule for low-precision outputs.

    ``actual`` (the fast path in bf16/fp16) may be at most twice as far from
    ``reference`` (float64 or float32 math) as PyTorch's own result in the same
    dtype, ``torch_same_dtype``, is. A floor of one unit in the last place at
    the largest reference magnitude keeps an exactly-rounded PyTorch result
    from demanding a perfect kernel.
    """
    ref = reference.detach().to(torch.float64)
    kernel_error = (actual.detach().to(torch.float64) - ref).abs().max().item()
    torch_error = (torch_same_dtype.detach().to(torch.float64) - ref).abs().max().item()
    floor = torch.finfo(actual.dtype).eps * ref.abs().max().item()
    if not kernel_error <= 2 * torch_error + floor:
        raise AssertionError(
            f"{name}: max error {kernel_error:.3e} against the reference exceeds 2x PyTorch's own "
            f"{actual.dtype} error {torch_error:.3e} (+ floor {floor:.1e}); "
            f"NaN in actual: {int(torch.isnan(actual).sum())}"
        )
