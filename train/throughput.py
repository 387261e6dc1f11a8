"""Model FLOPs utilisation: the share of the device's peak arithmetic rate a run achieves.

    MFU = flops_per_token * tokens_per_second / (peak FLOP/s * number of devices)

``flops_per_token`` is TransformerLM.flops_per_token(): 6N + 12 * L * d_model * T
(N non-embedding parameters, L layers, context T), counting the model's own
math only, not recomputation from activation checkpointing. The peak is the
dense bf16 tensor-core rate from each GPU's datasheet (no sparsity), found by
device name; pass ``--peak_tflops`` for a device not listed or another dtype.
"""

from __future__ import annotations

import torch

# (substring of torch.cuda.get_device_name(), dense bf16 TFLOP/s); the first match wins,
# so variants come before the family name.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0),
    ("GH200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H800", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("RTX 4090", 165.0),
    ("RTX 3090", 71.0),
    ("A6000", 155.0),
)


def peak_tflops_for(device: torch.device | str) -> float | None:
    """The datasheet dense bf16 TFLOP/s of a CUDA ``device``, or None when unknown (or not CUDA)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops
    return None


def mfu(flops_per_token: float, tokens_per_s: float, peak_tflops: float, num_devices: int = 1) -> float:
    """Fraction (0..1) of ``num_devices * peak_tflops`` that ``tokens_per_s`` amounts to."""
    return flops_per_token * tokens_per_s / (peak_tflops * 1e12 * num_devices)
