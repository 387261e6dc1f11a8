"""Checking a device name before anything is put on it.

PyTorch accepts ``torch.device("cuda:3")`` on any machine and fails only
when memory is first allocated there, with an AssertionError ("Torch not
compiled with CUDA enabled") or a CUDA "invalid device ordinal" from deep
inside. :func:`check_device` turns that into one sentence naming the device
and what this machine has, before a model is read.
"""

from __future__ import annotations

import torch


def default_device() -> torch.device:
    """CUDA when this machine has it, else the CPU (what ``device=None`` means everywhere)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_device(device: torch.device | str | None, name: str = "device") -> torch.device:
    """``device`` as a torch.device that exists here; None means :func:`default_device`.

    >>> check_device("cpu")
    device(type='cpu')
    """
    if device is None:
        return default_device()
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ValueError(f"{name}={str(device)!r} is not a device name; expected e.g. cpu, cuda, cuda:0 or mps") from e
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (parsed.index is None and count == 0) or (parsed.index is not None and parsed.index >= count):
            raise ValueError(f"{name}={str(device)!r}: {parsed} is not available; this machine has {_cuda_devices(count)}")
    elif parsed.type == "mps" and not (torch.backends.mps.is_available()):
        raise ValueError(f"{name}={str(device)!r}: mps is not available on this machine; expected cpu{_cuda_hint()}")
    elif parsed.type not in ("cpu", "cuda", "mps", "meta"):
        # xpu, hpu and the like: accepted when PyTorch has that backend and it reports a device.
        backend = getattr(torch, parsed.type, None)
        is_available = getattr(backend, "is_available", None)
        if not callable(is_available) or not is_available():
            raise ValueError(
                f"{name}={str(device)!r}: {parsed.type} is not available on this machine; expected cpu{_cuda_hint()}"
            )
    return parsed


def _cuda_devices(count: int) -> str:
    if count == 0:
        why = "this PyTorch is built without CUDA" if torch.version.cuda is None else "none is visible"
        return f"no CUDA device ({why}); expected cpu"
    names = ", ".join(f"cuda:{index}" for index in range(count))
    return f"{count} CUDA device{'s' if count > 1 else ''} ({names})"


def _cuda_hint() -> str:
    return " or cuda" if torch.cuda.is_available() else ""
