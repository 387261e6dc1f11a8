"""Writing files so that a crash never leaves half of one under the real name.

Tokenizers, token files, checkpoints and run configs are all written through
:func:`atomic_write`: the bytes go to a temporary file in the target's folder
(same filesystem, so the final rename is atomic), are flushed to disk, and only
then renamed over the target. On an exception the temporary file is removed and
the target keeps its previous contents, or stays absent.

Files get the permissions ``open()`` would give them (0o666 less the umask),
so a group sharing a folder can read them as it reads anything else there.

A full disk (or an exhausted quota) surfaces as :class:`NoSpaceLeftError`,
one line naming the file, whatever wrapped the ``OSError`` on its way up
(``torch.save`` turns it into a RuntimeError from its zip writer).
"""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

# The errors that mean "the disk (or this user's quota) is full".
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class NoSpaceLeftError(OSError):
    """The disk filled up while writing ``filename``; the target was left as it was."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(errno.ENOSPC, "no space left on device", str(path))

    def __str__(self) -> str:
        return f"no space left on device writing {self.filename}"


def disk_full_cause(error: BaseException) -> OSError | None:
    """The ENOSPC/EDQUOT ``OSError`` behind ``error`` (itself, or in its chain of causes), else None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _DISK_FULL_ERRNOS:
            return error
        error = error.__cause__ or error.__context__
    return None


def _create_temporary(path: Path) -> tuple[int, Path]:
    """Create a new, empty, hidden file beside ``path``; returns its descriptor and name.

    Unlike ``tempfile.mkstemp`` (always mode 0o600), the mode is 0o666 less
    the umask, as for ``open()``. O_EXCL makes the name ours alone.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    while True:
        temp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(temp, flags, 0o666), temp
        except FileExistsError:
            continue


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary file to be renamed to ``path`` when the block succeeds.

    Raises :class:`NoSpaceLeftError` naming ``path`` when the disk fills up
    on the way (the temporary file is removed, ``path`` is untouched).

    >>> with atomic_write("run/config.json", "w", encoding="utf-8") as f:  # doctest: +SKIP
    ...     f.write("{}")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = _create_temporary(path)
    try:
        with os.fdopen(fd, mode, encoding=encoding) as file:
            yield file
            file.flush()
            # The data must be on disk before the rename makes it the real file.
            os.fsync(file.fileno())
        os.replace(temp, path)
    except Exception as error:
        if disk_full_cause(error) is not None:
            raise NoSpaceLeftError(path) from error
        raise
    finally:
        if temp.exists():
            temp.unlink()
