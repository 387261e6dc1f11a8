"""When things go wrong, as a user meets them: signals, two runs in one folder, a full disk.

The signals are real: ``scratchlm train`` runs in a child process (at the
default thread count) and is sent SIGTERM or SIGINT once it has logged a few
steps; the run it leaves is resumed with the command it printed and compared
bit for bit with a run that was never interrupted. Every failure is checked
for its exit code, its one-line message and the absence of a traceback.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from scratchlm.cli import main
from scratchlm.train import read_checkpoint, train
from scratchlm.train.checkpoint import checkpoint_path, list_checkpoints
from scratchlm.train.stopping import TrainingStopped
from scratchlm.train.trainer import Trainer
from tiny_run import DiskFillsUp, read_run_metrics, tiny_config

# Long enough that a signal sent after a few logged steps lands mid-run (10 to 30 ms a step).
TOTAL = 100


def _config_file(tmp_path, config) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config.to_dict()))
    return str(path)


def _start_train(tmp_path, config_file: str, *flags: str) -> subprocess.Popen:
    """``scratchlm train --config FILE ...`` in a child process; its output goes to files (no pipe to fill)."""
    command = [sys.executable, "-m", "scratchlm", "train", "--config", config_file, *flags]
    out, err = open(tmp_path / "stdout.txt", "w"), open(tmp_path / "stderr.txt", "w")
    return subprocess.Popen(command, stdout=out, stderr=err, text=True)


def _stderr(tmp_path) -> str:
    return (tmp_path / "stderr.txt").read_text()


def _training_steps(run_dir) -> list[tuple[int, float]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [(r["step"], r["loss"]) for r in read_run_metrics(run_dir) if "loss" in r]


def _wait_for(condition, process: subprocess.Popen, tmp_path, what: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the run exited ({process.returncode}) before {what}: {_stderr(tmp_path)}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _command_lines(stderr: str) -> list[str]:
    """The lines scratchlm itself wrote to stderr (tqdm's bar shares it, split by carriage returns)."""
    return [line for line in re.split(r"[\r\n]", stderr) if line.startswith("scratchlm train:")]


def _assert_same_state(a: dict, b: dict) -> None:
    """Two checkpoints hold the same run state, bit for bit."""
    assert a["iteration"] == b["iteration"]
    for name, weight in a["model"].items():
        assert torch.equal(weight, b["model"][name]), name
    for index, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["optimizer"]["state"][index][key])), key
    assert torch.equal(a["rng"]["generators"]["train_sampler"], b["rng"]["generators"]["train_sampler"])


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run: TOTAL steps, no checkpoint but the last."""
    tmp_path = tmp_path_factory.mktemp("straight")
    summary = train(tiny_config(tmp_path, total_iters=TOTAL, checkpoint_interval=1000), progress=False)
    return summary, read_checkpoint(summary["checkpoint"])


# ---------------------------------------------------------------- signals


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_ends_the_step_saves_and_the_printed_resume_is_exact(tmp_path, straight, signal_number):
    straight_summary, straight_final = straight
    config = tiny_config(tmp_path, total_iters=TOTAL, checkpoint_interval=1000)
    run = tmp_path / "run"
    process = _start_train(tmp_path, _config_file(tmp_path, config))
    _wait_for(lambda: len(_training_steps(run)) >= 3, process, tmp_path, "3 logged steps")
    process.send_signal(signal_number)
    assert process.wait(timeout=120) == 128 + signal_number
    stderr = _stderr(tmp_path)
    assert "Traceback" not in stderr

    # One line: where the checkpoint is and the exact command that resumes.
    (line,) = _command_lines(stderr)
    name = signal.Signals(signal_number).name
    match = re.fullmatch(rf"scratchlm train: stopped by {name} after step (\d+); checkpoint (\S+); resume with: (.+)", line)
    assert match, line
    step = int(match[1])
    assert 3 <= step < TOTAL
    assert match[2] == str(checkpoint_path(run, step))
    assert [s for s, _ in list_checkpoints(run)] == [step], "the run saved exactly where it stopped"
    assert _training_steps(run)[-1][0] == step, "no step after the saved one was taken"

    command = shlex.split(match[3])
    assert command[:2] == ["scratchlm", "train"]
    assert main(command[1:]) == 0
    _assert_same_state(read_checkpoint(checkpoint_path(run, TOTAL)), straight_final)
    assert [loss for _, loss in _training_steps(run)] == straight_summary["train_losses"]


def test_sighup_during_a_step_stops_after_that_step(tmp_path, monkeypatch, straight):
    """In-process, so the signal's moment is exact: it arrives while step 4 runs."""
    straight_summary, straight_final = straight
    real_step = Trainer.train_step

    def hang_up_during_step_4(self, data, **kwargs):
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGHUP)
        return real_step(self, data, **kwargs)

    monkeypatch.setattr(Trainer, "train_step", hang_up_during_step_4)
    handler_before = signal.getsignal(signal.SIGHUP)
    config = tiny_config(tmp_path, total_iters=TOTAL, checkpoint_interval=1000)
    with pytest.raises(TrainingStopped) as stopped:
        train(config, progress=False)
    assert signal.getsignal(signal.SIGHUP) is handler_before, "train puts the old handlers back"
    assert stopped.value.step == 4 and stopped.value.exit_code == 128 + signal.SIGHUP
    assert str(stopped.value).startswith("stopped by SIGHUP after step 4; checkpoint ")
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [4]

    monkeypatch.setattr(Trainer, "train_step", real_step)
    resumed = train(tiny_config(tmp_path, total_iters=TOTAL, checkpoint_interval=1000, resume=config.output_dir))
    assert resumed["train_losses"] == straight_summary["train_losses"][4:]
    _assert_same_state(read_checkpoint(resumed["checkpoint"]), straight_final)


def test_a_second_ctrl_c_exits_at_once_without_a_checkpoint(tmp_path):
    # A first evaluation that would take minutes: Ctrl-C lands in it, and only a second one ends it early.
    config = tiny_config(tmp_path, eval_batches=100_000)
    run = tmp_path / "run"
    process = _start_train(tmp_path, _config_file(tmp_path, config))
    _wait_for(lambda: (run / "metrics.jsonl").exists(), process, tmp_path, "the first evaluation")
    process.send_signal(signal.SIGINT)
    time.sleep(1.0)  # two signals sent together may arrive as one
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) == 128 + signal.SIGINT
    stderr = _stderr(tmp_path)
    assert "Traceback" not in stderr
    assert _command_lines(stderr) == [
        "scratchlm train: interrupted: stopped at once, without writing a checkpoint; "
        "--resume continues from the newest one in --output_dir"
    ]
    assert list_checkpoints(run) == [] and read_run_metrics(run) == []


# ---------------------------------------------------------------- two runs, one folder


def test_a_second_run_on_a_live_folder_is_refused_and_a_killed_runs_lock_is_not(tmp_path, capsys):
    config = tiny_config(tmp_path, total_iters=100_000, checkpoint_interval=20, keep_checkpoints=0)
    run = tmp_path / "run"
    config_file = _config_file(tmp_path, config)
    first = _start_train(tmp_path, config_file)
    try:
        _wait_for(lambda: len(list_checkpoints(run)) >= 1, first, tmp_path, "the first checkpoint")
        # Suspended, it stays alive and keeps its lock without taking the CPU the others need here.
        first.send_signal(signal.SIGSTOP)
        files_before = {path.name: path.stat().st_mtime_ns for path in run.iterdir()}
        holder = f"is in use by scratchlm train (pid {first.pid} on host {socket.gethostname()}, since "

        # As a user would start it: refused in one line, before writing anything.
        second = subprocess.run(
            [sys.executable, "-m", "scratchlm", "train", "--config", config_file],
            capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        assert second.returncode == 2
        assert "Traceback" not in second.stderr
        (line,) = second.stderr.strip().splitlines()
        assert line.startswith(f"scratchlm train: error: --output_dir={str(run)!r} {holder}")
        assert line.endswith("; wait for it to finish or stop it, or choose another --output_dir")

        # --overwrite would have deleted the live run's files; --resume would have interleaved with it.
        for flags in (["--overwrite"], ["--resume"]):
            assert main(["train", "--config", config_file, *flags]) == 2
            assert holder in capsys.readouterr().err
        assert first.poll() is None
        assert {path.name: path.stat().st_mtime_ns for path in run.iterdir()} == files_before, "nothing touched"
    finally:
        first.kill()  # kill -9: no chance to clean anything up
        first.wait(timeout=60)

    # Its lock file stays behind, naming the dead process, but the kernel has released the lock.
    assert f'"pid": {first.pid}' in (run / ".scratchlm.lock").read_text()
    assert main(["train", "--config", config_file, "--overwrite", "--total_iters", "2", "--checkpoint_interval", "2"]) == 0
    assert [s for s, _ in list_checkpoints(run)] == [2]


# ---------------------------------------------------------------- a full disk


def test_a_full_disk_while_saving_is_one_line_and_leaves_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    config = tiny_config(tmp_path, total_iters=10, checkpoint_interval=5)
    run = tmp_path / "run"
    real_save = torch.save

    def save_onto_a_filling_disk(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("iteration") == 10:
            f = DiskFillsUp(f, room=20_000)
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_onto_a_filling_disk)
    assert main(["train", "--config", _config_file(tmp_path, config)]) == 1
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr and "inline_container" not in stderr
    assert _command_lines(stderr) == [
        f"scratchlm train: error: no space left on device writing {checkpoint_path(run, 10)}; "
        "free some space, then continue with --resume (the newest complete checkpoint is intact)"
    ]
    assert [s for s, _ in list_checkpoints(run)] == [5]
    assert not list(run.glob(".*.tmp")), "the half-written checkpoint is removed"
    assert read_checkpoint(checkpoint_path(run, 5))["iteration"] == 5
