"""Nothing lost: SIGKILL after or during a save, non-finite steps, untrusted checkpoints.

The kills are real: a child process trains and sends itself SIGKILL at a chosen
point, and the run is then resumed here and compared bit for bit with a run
that was never interrupted.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from scratchlm.model import TransformerLM
from scratchlm.train import CheckpointError, read_checkpoint, train
from scratchlm.train.checkpoint import list_checkpoints, read_newest_checkpoint
from scratchlm.train.data import load_token_dataset
from scratchlm.train.distributed import Parallel
from scratchlm.train.schedule import learning_rate_schedule
from scratchlm.train.trainer import Trainer
from tiny_run import read_run_metrics, tiny_config

# Runs a training config (JSON file, argv[1]) and SIGKILLs itself at step argv[3]:
# "after_save" once that step's checkpoint is on disk, "during_save" halfway through writing it.
KILLER = textwrap.dedent(
    """
    import io, json, os, signal, sys
    import torch
    from scratchlm.train.trainer import Trainer
    from scratchlm.train import TrainConfig, train

    config = TrainConfig.from_dict(json.load(open(sys.argv[1])))
    mode, at_step = sys.argv[2], int(sys.argv[3])
    if mode == "after_save":
        real_save = Trainer.save

        def save_then_die(self, path):
            real_save(self, path)
            if self.step == at_step:
                os.kill(os.getpid(), signal.SIGKILL)

        Trainer.save = save_then_die
    else:
        real_torch_save = torch.save

        def half_then_die(obj, f, *args, **kwargs):
            if isinstance(obj, dict) and obj.get("iteration") == at_step:
                buffer = io.BytesIO()
                real_torch_save(obj, buffer, *args, **kwargs)
                f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                f.flush()
                os.fsync(f.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
            return real_torch_save(obj, f, *args, **kwargs)

        torch.save = half_then_die
    train(config, progress=False)
    """
)


def _run_and_kill(tmp_path, config, mode: str, at_step: int) -> None:
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    (tmp_path / "killer.py").write_text(KILLER)
    result = subprocess.run(
        [sys.executable, str(tmp_path / "killer.py"), str(tmp_path / "config.json"), mode, str(at_step)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == -9, f"expected death by SIGKILL, got {result.returncode}: {result.stderr[-2000:]}"


def _assert_same_checkpoint(a: dict, b: dict) -> None:
    assert a["iteration"] == b["iteration"]
    for name, weight in a["model"].items():
        assert torch.equal(weight, b["model"][name]), name
    for index, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            other = b["optimizer"]["state"][index][key]
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(other)), (index, key)
    assert torch.equal(a["rng"]["generators"]["train_sampler"], b["rng"]["generators"]["train_sampler"])


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """20 uninterrupted steps, checkpoints every 5."""
    tmp_path = tmp_path_factory.mktemp("straight")
    config = tiny_config(tmp_path, checkpoint_interval=5)
    summary = train(config, progress=False)
    return config, summary, read_checkpoint(summary["checkpoint"])


def _losses(run_dir) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_run_metrics(run_dir) if "loss" in r]


def test_sigkill_after_a_checkpoint_then_resume_equals_the_straight_run(tmp_path, straight):
    straight_config, straight_summary, straight_final = straight
    config = tiny_config(tmp_path, checkpoint_interval=5)
    _run_and_kill(tmp_path, config, "after_save", 10)
    assert [step for step, _ in list_checkpoints(tmp_path / "run")] == [5, 10]

    # Bare --resume: the newest complete checkpoint in output_dir.
    resumed = train(dataclasses.replace(config, resume=config.output_dir), progress=False)
    assert resumed["start_iteration"] == 10 and resumed["iterations"] == 20
    _assert_same_checkpoint(read_checkpoint(resumed["checkpoint"]), straight_final)
    assert resumed["train_losses"] == straight_summary["train_losses"][10:]
    assert _losses(tmp_path / "run") == _losses(straight_config.output_dir)


def test_sigkill_during_a_save_keeps_the_previous_checkpoint(tmp_path, straight):
    _, _, straight_final = straight
    config = tiny_config(tmp_path, checkpoint_interval=5)
    _run_and_kill(tmp_path, config, "during_save", 15)
    run = tmp_path / "run"
    # The half-written step-15 file never got its final name.
    partial = list(run.glob(".checkpoint_00000015.pt.*.tmp"))
    assert len(partial) == 1 and partial[0].stat().st_size > 0
    assert [step for step, _ in list_checkpoints(run)] == [5, 10]
    path, payload = read_newest_checkpoint(run)
    assert path.name == "checkpoint_00000010.pt" and payload["iteration"] == 10

    resumed = train(dataclasses.replace(config, resume=str(run)), progress=False)
    assert resumed["start_iteration"] == 10
    assert not list(run.glob(".checkpoint_*.tmp")), "the resumed run clears the dead save's leftovers"
    _assert_same_checkpoint(read_checkpoint(resumed["checkpoint"]), straight_final)
    # keep_checkpoints=3: 10, 15 and 20 remain.
    assert [step for step, _ in list_checkpoints(run)] == [10, 15, 20]


def test_newest_checkpoint_skips_an_unreadable_file(tmp_path):
    config = tiny_config(tmp_path, total_iters=4, checkpoint_interval=2)
    train(config, progress=False)
    run = tmp_path / "run"
    (run / "checkpoint_00000006.pt").write_bytes(b"PK\x03\x04 garbage")
    with pytest.warns(UserWarning, match=r"checkpoint_00000006\.pt"):
        path, payload = read_newest_checkpoint(run)
    assert path.name == "checkpoint_00000004.pt" and payload["iteration"] == 4


# ---------------------------------------------------------------- non-finite steps


def _trainer(tmp_path, **overrides):
    config = tiny_config(tmp_path, **overrides).resolved()
    trainer = Trainer(config, Parallel(), torch.device("cpu"))
    data = load_token_dataset(config.train_data_path, config.vocab_size, config.context_length)
    return trainer, data


def _snapshot(trainer) -> dict:
    return {
        "params": [p.detach().clone() for p in trainer.model.parameters()],
        "moments": [
            (s["exp_avg"].clone(), s["exp_avg_sq"].clone(), int(s["step"])) for s in trainer.optimizer.state.values()
        ],
        "step": trainer.step,
    }


def _assert_unchanged(before: dict, after: dict) -> None:
    assert after["step"] == before["step"]
    for a, b in zip(before["params"], after["params"]):
        assert torch.equal(a, b)
    assert len(before["moments"]) == len(after["moments"])
    for (m0, v0, t0), (m1, v1, t1) in zip(before["moments"], after["moments"]):
        assert torch.equal(m0, m1) and torch.equal(v0, v1) and t0 == t1


@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_a_non_finite_step_is_skipped_leaving_everything_unchanged(tmp_path, where):
    trainer, data = _trainer(tmp_path)
    trainer.train_step(data)
    trainer.train_step(data)
    before = _snapshot(trainer)
    if where == "loss":
        handle = trainer.model.register_forward_hook(lambda module, args, out: out * float("nan"))
    else:
        handle = trainer.model.lm_head.weight.register_hook(lambda grad: grad * float("inf"))
    record = trainer.train_step(data)
    handle.remove()
    assert record["skipped"].startswith("non-finite loss" if where == "loss" else "non-finite gradient norm")
    assert record["step"] == 2 and record["skipped_steps"] == 1
    _assert_unchanged(before, _snapshot(trainer))
    assert all(p.grad is None for p in trainer.model.parameters())

    # The next good step takes the learning rate the skipped one would have had.
    config = trainer.config
    expected_lr = learning_rate_schedule(
        2, config.learning_rate, config.min_learning_rate, config.warmup_iters, config.total_iters
    )
    record = trainer.train_step(data)
    assert record["step"] == 3 and record["lr"] == expected_lr and math.isfinite(record["loss"])
    assert trainer.skipped_steps == 1 and trainer.skipped_in_a_row == 0


def _poison_training_forwards(which):
    """Make the TransformerLM's training-mode forwards number ``which(n)`` return NaN logits."""
    calls = {"n": 0}

    def hook(module, args, output):
        if isinstance(module, TransformerLM) and module.training:
            calls["n"] += 1
            if which(calls["n"]):
                return output * float("nan")
        return None

    return torch.nn.modules.module.register_module_forward_hook(hook)


def test_a_run_with_one_bad_step_skips_it_logs_it_and_finishes(tmp_path):
    handle = _poison_training_forwards(lambda n: n == 3)
    try:
        summary = train(tiny_config(tmp_path), progress=False)
    finally:
        handle.remove()
    assert summary["iterations"] == 20 and summary["skipped_steps"] == 1
    assert len(summary["train_losses"]) == 20
    skipped = [r for r in read_run_metrics(tmp_path / "run") if "skipped" in r]
    assert skipped == [{"step": 2, "skipped": "non-finite loss (nan)", "skipped_steps": 1}]
    assert read_checkpoint(summary["checkpoint"])["extra"]["train_state"]["skipped_steps"] == 1


def test_repeated_bad_steps_stop_the_run_with_a_clear_message(tmp_path):
    handle = _poison_training_forwards(lambda n: n >= 6)
    try:
        with pytest.raises(FloatingPointError, match=r"3 steps in a row had a non-finite loss.*after step 5"):
            train(tiny_config(tmp_path, max_skipped_steps=3, checkpoint_interval=5), progress=False)
    finally:
        handle.remove()
    assert [step for step, _ in list_checkpoints(tmp_path / "run")] == [5]


# ---------------------------------------------------------------- untrusted checkpoints


class _Payload:
    """Unpickling this runs code: it would create ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "scratchlm.checkpoint", "version": 1, "iteration": 0, "model": _Payload(marker)}, evil)
    with pytest.raises(CheckpointError, match=r"evil\.pt.*could not be read"):
        read_checkpoint(evil)
    assert not marker.exists(), "loading must never execute the pickle's code"
    config = tiny_config(tmp_path, resume=str(evil))
    with pytest.raises(CheckpointError, match=r"--resume: checkpoint .*evil\.pt"):
        train(config, progress=False)
    assert not marker.exists()
    # Unrestricted unpickling of the same file does run the code, so the checks above mean something.
    torch.load(evil, weights_only=False)
    assert marker.is_dir()
