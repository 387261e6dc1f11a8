"""FolderLock: one holder at a time, the holder named in the refusal, no stale locks after a kill."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from scratchlm.folder_lock import FolderInUseError, FolderLock

# Takes the lock given as argv[1], says so, then waits to be killed.
HOLDER = textwrap.dedent(
    """
    import sys, time
    from scratchlm.folder_lock import FolderLock

    FolderLock(sys.argv[1], "the folder", "test holder").acquire()
    print("locked", flush=True)
    time.sleep(600)
    """
)


def _start_holder(lock_path) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock_path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_lock_is_refused_naming_the_holder_and_free_again_after_release(tmp_path):
    lock_path = tmp_path / "run" / ".scratchlm.lock"
    first = FolderLock(lock_path, "--output_dir='run'", "scratchlm train", elsewhere="another --output_dir")
    with first:
        assert lock_path.is_file()  # the folder was created for it
        second = FolderLock(lock_path, "--output_dir='run'", "scratchlm train", elsewhere="another --output_dir")
        with pytest.raises(FolderInUseError) as refused:
            second.acquire()
        message = str(refused.value)
        assert message.startswith(f"--output_dir='run' is in use by scratchlm train (pid {os.getpid()} ")
        assert f"on host {socket.gethostname()}, since " in message
        assert message.endswith("or choose another --output_dir") and "\n" not in message
    # Released: the same path can be locked again, and the file stays (it is never deleted).
    with FolderLock(lock_path, "x", "y"):
        assert lock_path.is_file()


def test_the_lock_of_a_killed_process_does_not_block(tmp_path):
    lock_path = tmp_path / ".scratchlm.lock"
    holder = _start_holder(lock_path)
    try:
        with pytest.raises(FolderInUseError, match=rf"in use by test holder \(pid {holder.pid} on host"):
            FolderLock(lock_path, "the folder", "us").acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert f'"pid": {holder.pid}' in lock_path.read_text()  # the dead holder's note is still there...
    with FolderLock(lock_path, "the folder", "us"):  # ...but the kernel let its lock go
        assert f'"pid": {os.getpid()}' in lock_path.read_text()


def test_a_holder_that_has_not_written_its_note_yet_is_still_refused(tmp_path):
    lock_path = tmp_path / ".scratchlm.lock"
    with FolderLock(lock_path, "the folder", "first"):
        lock_path.write_text("")  # as between the first holder's flock and its note
        with pytest.raises(FolderInUseError, match=r"in use by another process \(it has not recorded its pid yet\)"):
            FolderLock(lock_path, "the folder", "second").acquire()
