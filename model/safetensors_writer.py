"""Writing a safetensors file one tensor at a time.

``safetensors.torch.save_file`` takes every tensor at once and serialises
them together, which for a billion parameters means a second copy of the
weights in memory. The format is simple enough to stream:

    8 bytes      N, the header length, little-endian unsigned
    N bytes      JSON: {name: {"dtype": "BF16", "shape": [...], "data_offsets": [begin, end]},
                        "__metadata__": {str: str}}, padded with spaces to a multiple of 8
    data         each tensor's bytes, C order, little-endian, back to back in offset order

So the header is written first from the names, dtypes and shapes, and each
tensor's bytes follow as it is produced.
"""

from __future__ import annotations

import json
import math
import sys
from typing import BinaryIO

import torch

SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


class SafetensorsStreamWriter:
    """Write tensors declared up front, in that order, into an open binary file.

    >>> with open("model.safetensors", "wb") as f:  # doctest: +SKIP
    ...     writer = SafetensorsStreamWriter(f, [("w", torch.float32, (2, 3))], {"format": "pt"})
    ...     writer.write("w", torch.zeros(2, 3))
    ...     writer.close()
    """

    def __init__(
        self,
        file: BinaryIO,
        entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
        metadata: dict[str, str] | None = None,
    ) -> None:
        if sys.byteorder != "little":
            raise NotImplementedError("safetensors data is little-endian; this host is big-endian")
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = dict(metadata)
        self._order: list[tuple[str, int]] = []
        offset = 0
        for name, dtype, shape in entries:
            if name in header or name == "__metadata__":
                raise ValueError(f"tensor name {name!r} is given twice (or is reserved)")
            if dtype not in SAFETENSORS_DTYPES:
                raise ValueError(f"tensor {name!r} has dtype {dtype}; expected one of {list(SAFETENSORS_DTYPES)}")
            size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {
                "dtype": SAFETENSORS_DTYPES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
            self._order.append((name, size))
            offset += size
        encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
        encoded += b" " * (-len(encoded) % 8)
        self._file = file
        self._declared = {name: (dtype, tuple(shape)) for name, dtype, shape in entries}
        self._next = 0
        file.write(len(encoded).to_bytes(8, "little"))
        file.write(encoded)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next declared tensor; its name, dtype and shape must be the declared ones."""
        if self._next >= len(self._order) or self._order[self._next][0] != name:
            expected = self._order[self._next][0] if self._next < len(self._order) else "nothing more"
            raise ValueError(f"wrote tensor {name!r}; expected {expected!r} next")
        dtype, shape = self._declared[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(
                f"tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}; declared {dtype} {shape}"
            )
        data = tensor.detach().to("cpu").contiguous()
        # numpy has no bfloat16: write the same bytes through an integer view.
        if data.numel() > 0:
            as_int = data.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[data.element_size()])
            self._file.write(memoryview(as_int.numpy()).cast("B"))
        self._next += 1

    def close(self) -> None:
        """Check every declared tensor was written (the file is the caller's to close)."""
        if self._next != len(self._order):
            missing = [name for name, _ in self._order[self._next :]]
            raise ValueError(f"safetensors file ended before tensors {missing[:3]}... were written")
