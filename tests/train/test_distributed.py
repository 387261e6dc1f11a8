"""Data parallelism on the CPU: torchrun with 2 processes over gloo, DDP and FSDP2.

With a global batch of B windows, 2 ranks training on B/2 each must take the
same steps as one process on all B (up to float summation order), and a
checkpoint written by either must resume in the other.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from scratchlm.train import read_checkpoint, train
from scratchlm.train.checkpoint import list_checkpoints
from scratchlm.train.distributed import check_launch
from tiny_run import read_run_metrics, tiny_config

TOTAL = 6


def _torchrun(tmp_path, config, *extra: str) -> subprocess.CompletedProcess:
    settings = tmp_path / f"config_{os.path.basename(config.output_dir)}.json"
    settings.write_text(json.dumps(config.to_dict()))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "scratchlm.train", "--config", str(settings), *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def _config(tmp_path, name: str, **overrides):
    settings = dict(total_iters=TOTAL, checkpoint_interval=3, eval_interval=3, output_dir=str(tmp_path / name))
    return tiny_config(tmp_path, **{**settings, **overrides})


def _losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_run_metrics(run_dir) if "loss" in r]


def _weights(checkpoint) -> dict:
    return read_checkpoint(checkpoint)["model"]


def _assert_same_weights(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=atol, rtol=1e-4), name


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("one")
    config = _config(tmp_path, "one")
    summary = train(config, progress=False)
    return config, summary


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_match_one_process_with_the_same_global_batch(tmp_path, one_process, mode):
    single_config, single = one_process
    config = _config(tmp_path, mode, parallel=mode)
    result = _torchrun(tmp_path, config)
    run = tmp_path / mode
    # Only rank 0 reports and writes.
    assert result.stdout.count("trained to step 6") == 1
    written = sorted(p.name for p in run.iterdir() if p.name != "tensorboard")
    assert written == [
        ".scratchlm.lock", "checkpoint_00000003.pt", "checkpoint_00000006.pt", "metrics.jsonl", "train_config.json"
    ]
    assert _losses(run) == pytest.approx(single["train_losses"], rel=1e-5)
    assert [r["val_loss"] for r in read_run_metrics(run) if "val_loss" in r] == pytest.approx(
        [r["val_loss"] for r in read_run_metrics(single_config.output_dir) if "val_loss" in r], rel=1e-5
    )
    ours, theirs = read_checkpoint(run / "checkpoint_00000006.pt"), read_checkpoint(single["checkpoint"])
    _assert_same_weights(ours["model"], theirs["model"])
    # The optimizer state is stored in the single-process layout, whatever the sharding.
    assert ours["optimizer"]["param_groups"][0]["params"] == theirs["optimizer"]["param_groups"][0]["params"]
    for index, state in theirs["optimizer"]["state"].items():
        assert torch.allclose(ours["optimizer"]["state"][index]["exp_avg"], state["exp_avg"], atol=1e-6)


def test_gradient_accumulation_matches_the_whole_batch(tmp_path, one_process):
    _, single = one_process
    summary = train(_config(tmp_path, "accum", grad_accum_steps=2), progress=False)
    assert summary["train_losses"] == pytest.approx(single["train_losses"], rel=1e-5)
    _assert_same_weights(_weights(summary["checkpoint"]), _weights(single["checkpoint"]))


def test_an_fsdp_checkpoint_resumes_in_one_process_and_back(tmp_path, one_process):
    _, single = one_process
    # FSDP on 2 ranks for 3 steps, then one process for the rest...
    fsdp = _config(tmp_path, "mixed", parallel="fsdp", total_iters=3)
    _torchrun(tmp_path, fsdp)
    one = dataclasses.replace(fsdp, parallel="none", total_iters=TOTAL, resume=fsdp.output_dir)
    resumed = train(one, progress=False)
    assert resumed["start_iteration"] == 3
    assert resumed["train_losses"] == pytest.approx(single["train_losses"][3:], rel=1e-5)
    _assert_same_weights(_weights(resumed["checkpoint"]), _weights(single["checkpoint"]))

    # ...and a one-process checkpoint picked up by DDP on 2 ranks.
    first_half = _config(tmp_path, "back", total_iters=3)
    train(first_half, progress=False)
    ddp = dataclasses.replace(first_half, parallel="ddp", total_iters=TOTAL)
    _torchrun(tmp_path, ddp, "--resume")
    _assert_same_weights(_weights(tmp_path / "back" / "checkpoint_00000006.pt"), _weights(single["checkpoint"]))


def test_launch_mismatches_are_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"--parallel=none, but torchrun started 2 processes"):
        check_launch("none")
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ValueError, match=r"--parallel=fsdp needs the torchrun launcher"):
        check_launch("fsdp")


def test_a_batch_that_does_not_split_across_ranks_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match=r"--batch_size=4 must be divisible by 3 ranks x --grad_accum_steps=1"):
        train(_config(tmp_path, "odd", parallel="ddp"), progress=False)
    assert not (tmp_path / "odd").exists()


# ---------------------------------------------------------------- stopping on a signal

STOP_TOTAL = 100


def _rank_pid(torchrun_pid: int, rank: int) -> int:
    """The pid of the worker torchrun started as ``rank`` (its children, told apart by their RANK)."""
    for task in os.listdir(f"/proc/{torchrun_pid}/task"):
        for child in open(f"/proc/{torchrun_pid}/task/{task}/children").read().split():
            environ = open(f"/proc/{child}/environ", "rb").read().split(b"\0")
            if f"RANK={rank}".encode() in environ:
                return int(child)
    raise AssertionError(f"torchrun {torchrun_pid} has no worker with RANK={rank}")


@pytest.fixture(scope="module")
def straight_long(tmp_path_factory):
    """One process, STOP_TOTAL steps, uninterrupted."""
    tmp_path = tmp_path_factory.mktemp("straight_long")
    return train(_config(tmp_path, "straight", total_iters=STOP_TOTAL, checkpoint_interval=1000), progress=False)


@pytest.mark.parametrize(
    "mode, signalled", [("ddp", "rank 1"), ("fsdp", "torchrun")], ids=["ddp-rank1", "fsdp-torchrun"]
)
def test_sigterm_stops_every_rank_at_one_step_and_the_collective_save_completes(
    tmp_path, straight_long, mode, signalled
):
    """SIGTERM to one worker only (the others must learn of it), or to torchrun (which forwards it)."""
    config = _config(tmp_path, mode, parallel=mode, total_iters=STOP_TOTAL, checkpoint_interval=1000)
    run = tmp_path / mode
    settings = tmp_path / "config.json"
    settings.write_text(json.dumps(config.to_dict()))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "scratchlm.train", "--config", str(settings),
    ]  # fmt: skip
    with open(tmp_path / "out.txt", "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.monotonic() + 300
        while len(_losses(run) if (run / "metrics.jsonl").exists() else []) < 3:
            assert process.poll() is None, (tmp_path / "out.txt").read_text()[-4000:]
            assert time.monotonic() < deadline, "timed out waiting for 3 logged steps"
            time.sleep(0.02)
        os.kill(_rank_pid(process.pid, 1) if signalled == "rank 1" else process.pid, signal.SIGTERM)
        assert process.wait(timeout=300) != 0
    output = (tmp_path / "out.txt").read_text()

    # Rank 0 alone reports, once; every rank stopped after the same step, or the gathered save would have hung.
    lines = [line for line in output.splitlines() if line.startswith("scratchlm train: stopped by SIGTERM")]
    assert len(lines) == 1, output[-4000:]
    step = int(re.match(r"scratchlm train: stopped by SIGTERM after step (\d+);", lines[0])[1])
    assert 3 <= step < STOP_TOTAL
    assert [s for s, _ in list_checkpoints(run)] == [step]
    assert len(_losses(run)) == step

    # Resumed in one process, it goes on as the uninterrupted one-process run did (the same batches
    # and steps; the ranks' sums were taken in another order, hence approx).
    resumed = train(dataclasses.replace(config, parallel="none", resume=str(run)), progress=False)
    assert resumed["start_iteration"] == step
    assert resumed["train_losses"] == pytest.approx(straight_long["train_losses"][step:], rel=1e-4)
    _assert_same_weights(_weights(resumed["checkpoint"]), _weights(straight_long["checkpoint"]), atol=1e-4)
