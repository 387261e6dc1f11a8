"""Writing files so that a crash never leaves half of one under the real name.

Tokenizers, token files, checkpoints and run configs are all written through
:func:`atomic_write`: the bytes go to a temporary file in the target's folder
(same filesystem, so the final rename is atomic), are flushed to disk, and only
then renamed over the target. On an exception the temporary file is removed and
the target keeps its previous contents, or stays absent.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary file to be renamed to ``path`` when the block succeeds.

    >>> with atomic_write("run/config.json", "w", encoding="utf-8") as f:  # doctest: +SKIP
    ...     f.write("{}")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=encoding) as file:
            yield file
            file.flush()
            # The data must be on disk before the rename makes it the real file.
            os.fsync(file.fileno())
        os.replace(temp_name, path)
    finally:
        if os.path.exists(temp_name):
            os.unlink(temp_name)
