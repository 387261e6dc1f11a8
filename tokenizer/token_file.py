"""Token files: a flat array of token ids, stored as a standard ``.npy`` file.

The ``.npy`` header records the dtype and length, so a token file is never read
with the wrong one, and any tool can open it: ``np.load(path, mmap_mode="r")``.
Ids are ``uint16`` when the vocabulary fits in 65,536 ids, ``uint32`` otherwise
(half the disk and page-cache footprint for GPT-2-sized vocabularies).

Writing streams: :class:`TokenFileWriter` appends ids as they are produced into
a temporary file beside the target, then fills in the final length and renames
it into place, so a crash or an exception never leaves a half-written file
under the target name.
"""

from __future__ import annotations

import ast
import os
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from scratchlm.atomic import atomic_write

# A fixed 128-byte header (magic, version, length, padded dict) leaves room for
# any 64-bit length, so the count can be written after the ids are streamed.
_MAGIC = b"\x93NUMPY\x01\x00"
_HEADER_BYTES = 128
_ALLOWED_DTYPES = (np.dtype("<u2"), np.dtype("<u4"))
# Ids are range-checked in chunks when a file is opened with a vocab_size.
_SCAN_CHUNK = 1 << 24


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id below ``vocab_size``."""
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    if vocab_size <= 1 << 16:
        return np.dtype("<u2")
    if vocab_size <= 1 << 32:
        return np.dtype("<u4")
    raise ValueError(f"vocab_size must be at most 2**32 for a token file, got {vocab_size}")


def _header(dtype: np.dtype, length: int) -> bytes:
    meta = f"{{'descr': '{dtype.str}', 'fortran_order': False, 'shape': ({length},), }}"
    body_len = _HEADER_BYTES - len(_MAGIC) - 2
    body = meta.ljust(body_len - 1).encode("latin1") + b"\n"
    return _MAGIC + body_len.to_bytes(2, "little") + body


class TokenFileWriter:
    """Stream token ids into ``path`` atomically.

    >>> with TokenFileWriter("train.npy", vocab_size=10_000) as out:  # doctest: +SKIP
    ...     out.write([15, 42, 7])
    ...     out.write(np.array([3, 9]))
    >>> np.load("train.npy").tolist()  # doctest: +SKIP
    [15, 42, 7, 3, 9]

    Ids outside ``[0, vocab_size)`` raise ``ValueError``; on any exception the
    temporary file is removed and ``path`` is left as it was.
    """

    def __init__(self, path: str | os.PathLike, vocab_size: int):
        self.path = Path(path)
        self.vocab_size = vocab_size
        self.dtype = token_dtype(vocab_size)
        self.count = 0
        self._file = None
        self._cleanup = ExitStack()

    def __enter__(self) -> "TokenFileWriter":
        self._file = self._cleanup.enter_context(atomic_write(self.path, "wb"))
        self._file.write(_header(self.dtype, 0))
        return self

    def write(self, ids) -> None:
        """Append a sequence or array of ids."""
        if self._file is None:
            raise RuntimeError("TokenFileWriter.write called outside its `with` block")
        arr = np.asarray(ids)
        if arr.size == 0:
            return
        if arr.dtype.kind not in "iu":
            raise ValueError(f"token ids must be integers, got dtype {arr.dtype}")
        low, high = int(arr.min()), int(arr.max())
        if low < 0 or high >= self.vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"token id {bad} is outside [0, vocab_size={self.vocab_size}) for {self.path}")
        self._file.write(arr.astype(self.dtype, copy=False).ravel().tobytes())
        self.count += arr.size

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self._file is not None
        if exc_type is None:
            # Now that the length is known, fill it into the header written first.
            self._file.seek(0)
            self._file.write(_header(self.dtype, self.count))
        self._file = None
        self._cleanup.__exit__(exc_type, exc, tb)


def write_token_file(path: str | os.PathLike, ids, vocab_size: int) -> Path:
    """Write all of ``ids`` to ``path`` at once; see :class:`TokenFileWriter`."""
    with TokenFileWriter(path, vocab_size) as out:
        out.write(ids)
    return Path(path)


def read_token_file(path: str | os.PathLike, vocab_size: int | None = None) -> np.memmap:
    """Memory-map a token file read-only, checking its header and size.

    With ``vocab_size`` every id is checked to be below it (a linear scan in
    chunks of 16M ids), so a file made with another tokenizer is refused before
    training instead of crashing an embedding lookup mid-run.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"token file {str(path)!r} does not exist")
    with open(path, "rb") as f:
        magic = f.read(len(_MAGIC) - 2)
        if magic != _MAGIC[:-2]:
            raise ValueError(
                f"token file {str(path)!r} is not a .npy token file (bad magic {magic!r}); "
                "make one with `scratchlm tokenize`"
            )
        version = f.read(2)
        header_len = int.from_bytes(f.read(2 if version[0] == 1 else 4), "little")
        meta = ast.literal_eval(f.read(header_len).decode("latin1"))
        data_offset = f.tell()
    dtype = np.dtype(meta["descr"])
    shape = meta["shape"]
    if dtype not in _ALLOWED_DTYPES or meta["fortran_order"] or len(shape) != 1:
        raise ValueError(
            f"token file {str(path)!r} holds a {dtype} array of shape {shape}; "
            "expected a 1-D uint16 or uint32 array"
        )
    expected = data_offset + shape[0] * dtype.itemsize
    actual = path.stat().st_size
    if actual != expected:
        raise ValueError(
            f"token file {str(path)!r} is {actual} bytes but its header promises {expected} "
            f"({shape[0]} ids of {dtype}); the file is truncated or corrupt"
        )
    if shape[0] == 0:
        tokens = np.zeros(0, dtype=dtype)
    else:
        tokens = np.memmap(path, dtype=dtype, mode="r", offset=data_offset, shape=shape)
    if vocab_size is not None:
        for start in range(0, len(tokens), _SCAN_CHUNK):
            high = int(tokens[start : start + _SCAN_CHUNK].max())
            if high >= vocab_size:
                raise ValueError(
                    f"token file {str(path)!r} holds id {high}, but vocab_size is {vocab_size}; "
                    "the file was made with a different tokenizer or --vocab_size is too small"
                )
    return tokens
