"""One writer per destination: an exclusive ``flock`` held for a command's whole life.

``scratchlm train`` holds ``<output_dir>/.scratchlm.lock`` while it runs and
``scratchlm convert`` holds ``.<DST name>.lock`` beside its destination, so a
second command aimed at the same place is refused at once, with the holder's
pid and host, instead of interleaving its files with the first one's (or,
with ``--overwrite``, deleting them).

The lock is the kernel's, not the file's existence: it is released when the
holder exits in any way, SIGKILL and crashes included, so a lock file left
behind never blocks anyone. It is never deleted (deleting a lock file while
another process waits on it would let two holders in), and the holder writes
who it is into it, which is all the file is read for. Over NFS, Linux maps
``flock`` onto NFS byte-range locks, so runs on different machines sharing
the folder exclude each other too; on a filesystem without locks the command
warns and goes on unprotected.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
import warnings
from pathlib import Path


class FolderInUseError(ValueError):
    """Another live process holds the lock on a destination."""


# The name of a training run's lock file, inside its output folder.
RUN_LOCK_NAME = ".scratchlm.lock"


class FolderLock:
    """An exclusive, non-blocking lock on ``lock_path``, held from ``acquire`` (or ``with``) to ``release``.

    ``subject`` names the destination in the refusal message, as the user
    gave it (``--output_dir='runs/a'``), and ``elsewhere`` the way out
    (``another --output_dir``); ``command`` says what the holder is doing
    (``scratchlm train``), for the next one to read.

    >>> with FolderLock("runs/a/.scratchlm.lock", "--output_dir='runs/a'", "scratchlm train"):  # doctest: +SKIP
    ...     ...  # nobody else gets this lock until the block ends or the process dies
    """

    def __init__(self, lock_path: str | os.PathLike, subject: str, command: str, elsewhere: str = "another one"):
        self.path = Path(lock_path)
        self.subject = subject
        self.command = command
        self.elsewhere = elsewhere
        self._fd: int | None = None

    def acquire(self) -> "FolderLock":
        """Take the lock (creating its folder and file as needed) or raise ``FolderInUseError``."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # No O_TRUNC: the current holder's note must survive until we hold the lock.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise FolderInUseError(
                f"{self.subject} is in use by {holder}; wait for it to finish or stop it, "
                f"or choose {self.elsewhere}"
            ) from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise
            warnings.warn(
                f"{self.subject}: this filesystem cannot lock {str(self.path)!r} ({e.strerror}); "
                "a second command aimed here would not be stopped",
                stacklevel=2,
            )
        _write_holder(fd, self.command)
        self._fd = fd
        return self

    def release(self) -> None:
        """Let the lock go (closing the descriptor releases the flock); the file stays."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _write_holder(fd: int, command: str) -> None:
    """Record who holds the lock: pid, host, command and start time, as one JSON line."""
    note = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": command,
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(note) + "\n").encode("utf-8"), 0)


def _read_holder(fd: int) -> str:
    """The holder as the lock file describes it, e.g. 'scratchlm train (pid 812 on host gpu3, since ...)'."""
    try:
        note = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
        return f"{note['command']} (pid {note['pid']} on host {note['host']}, since {note['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        # The holder has the lock but has not written its note yet.
        return "another process (it has not recorded its pid yet)"
