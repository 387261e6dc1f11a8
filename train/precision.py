"""Mixed precision: which dtype the forward runs in, and the loss scaler fp16 needs.

``--precision``:
    fp32  everything in float32.
    bf16  matmuls and activations in bfloat16 under ``torch.autocast``; the
          weights, AdamW moments, loss and gradient reductions stay float32
          ("fp32 master weights"). bfloat16 has float32's exponent range, so
          nothing overflows and no scaling is needed.
    fp16  the same with float16, whose range ends at 65504: small gradients
          underflow to 0 unless the loss is first multiplied by a large scale.
          ``torch.amp.GradScaler`` does that, divides the gradients back before
          clipping, and shrinks the scale whenever a step overflows (that
          step is skipped, like any non-finite step).
    auto  bf16 on a CUDA device that supports it, fp16 on older GPUs, fp32 on CPU.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

PRECISION_CHOICES = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(name: str, device: torch.device | str) -> str:
    """``auto`` made concrete for ``device``; other names are checked and returned."""
    if name not in PRECISION_CHOICES:
        raise ValueError(f"--precision={name!r}: expected one of {list(PRECISION_CHOICES)}")
    if name != "auto":
        return name
    if torch.device(device).type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


class MixedPrecision:
    """The autocast context and (for fp16) the gradient scaler of one run."""

    def __init__(self, name: str, device: torch.device | str):
        self.name = resolve_precision(name, device)
        self.device_type = torch.device(device).type
        self.dtype = _DTYPES[self.name]
        self.scaler = torch.amp.GradScaler(self.device_type) if self.name == "fp16" else None

    def autocast(self):
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the gradients by the loss scale, so clipping and the norm see true values."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()

    def skip(self) -> None:
        """A step was dropped for non-finite values: with fp16, halve the loss scale."""
        if self.scaler is not None:
            self.scaler.update()

    def state_dict(self) -> dict | None:
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: dict | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
