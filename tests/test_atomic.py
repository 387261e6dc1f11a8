"""Files scratchlm writes: the mode the umask gives, and a full disk reported in one line, nothing left behind."""

from __future__ import annotations

import errno
import os
import stat

import pytest
import torch

from scratchlm.atomic import NoSpaceLeftError, atomic_write, disk_full_cause
from scratchlm.tokenizer import Tokenizer
from scratchlm.tokenizer.token_file import write_token_file
from scratchlm.train import save_checkpoint, train

TINY_TRAIN = os.path.join(os.path.dirname(__file__), "train")


@pytest.fixture(params=[0o022, 0o002], ids=["umask022", "umask002"])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_written_files_get_the_mode_open_would_give(tmp_path, umask, monkeypatch):
    expected = 0o666 & ~umask
    with atomic_write(tmp_path / "plain.txt", "w", encoding="utf-8") as f:
        f.write("x")
    model = torch.nn.Linear(2, 2)
    save_checkpoint(model, torch.optim.SGD(model.parameters(), lr=0.1), 0, tmp_path / "model.pt")
    write_token_file(tmp_path / "ids.npy", [1, 2, 3], 256)
    Tokenizer({i: bytes([i]) for i in range(256)}, []).save(tmp_path / "tok.json")
    for name in ("plain.txt", "model.pt", "ids.npy", "tok.json"):
        assert _mode(tmp_path / name) == expected, f"{name}: {oct(_mode(tmp_path / name))} != {oct(expected)}"

    # A training run's files too: config, metrics, checkpoint and the folder's lock.
    monkeypatch.syspath_prepend(TINY_TRAIN)
    from tiny_run import tiny_config

    summary = train(tiny_config(tmp_path, total_iters=2, checkpoint_interval=2), progress=False)
    run = tmp_path / "run"
    for name in ("train_config.json", "metrics.jsonl", os.path.basename(summary["checkpoint"]), ".scratchlm.lock"):
        assert _mode(run / name) == expected, f"{name}: {oct(_mode(run / name))} != {oct(expected)}"


def test_a_full_disk_is_one_line_naming_the_file_and_leaves_the_old_contents(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(TINY_TRAIN)
    from tiny_run import DiskFillsUp

    target = tmp_path / "checkpoint.pt"
    target.write_bytes(b"previous")
    with pytest.raises(NoSpaceLeftError) as raised:
        with atomic_write(target, "wb") as f:
            # torch.save hides the ENOSPC inside a RuntimeError from its zip writer; it must still be found.
            torch.save({"w": torch.zeros(100_000)}, DiskFillsUp(f, room=50_000))
    assert str(raised.value) == f"no space left on device writing {target}"
    assert raised.value.errno == errno.ENOSPC
    assert isinstance(raised.value.__cause__, RuntimeError), "torch's own error stays reachable as the cause"
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"], "the half-written temporary file is removed"


def test_other_errors_pass_through_unchanged(tmp_path):
    with pytest.raises(PermissionError):
        with atomic_write(tmp_path / "a.txt", "w", encoding="utf-8"):
            raise PermissionError(errno.EACCES, "denied")
    assert list(tmp_path.iterdir()) == []
    assert disk_full_cause(RuntimeError("unrelated")) is None
