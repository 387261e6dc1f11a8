"""The training loop end to end on a tiny model: learning, exact resume, and refusing bad input early."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from scratchlm.tokenizer.token_file import write_token_file
from scratchlm.train import load_model, read_checkpoint, save_checkpoint, train
from scratchlm.train.trainer import Trainer

from tiny_run import CONTEXT, VOCAB, crash_at_step, read_run_metrics, tiny_config


def test_training_writes_outputs_and_lowers_validation_loss(tmp_path):
    config = tiny_config(tmp_path, total_iters=40)
    summary = train(config, progress=False)
    run = tmp_path / "run"
    assert summary["iterations"] == 40 and summary["start_iteration"] == 0
    assert summary["checkpoint"] == str(run / "checkpoint_00000040.pt") and summary["output_dir"] == str(run)
    assert summary["final_val_loss"] < summary["initial_val_loss"] - 0.5
    # An untrained model is close to uniform over the vocabulary.
    assert abs(summary["initial_val_loss"] - np.log(VOCAB)) < 1.0
    records = read_run_metrics(run)
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 41))
    assert set(steps[0]) == {"step", "loss", "lr", "grad_norm", "ms_per_step", "tokens_per_s"}
    assert steps[0]["lr"] == 0.0 and steps[2]["lr"] == pytest.approx(1e-2)  # warmup, then the peak
    assert [r["step"] for r in records if "val_loss" in r] == [0, 5, 10, 15, 20, 25, 30, 35, 40]
    saved = json.loads((run / "train_config.json").read_text())
    assert saved["min_learning_rate"] == pytest.approx(1e-3) and saved["total_iters"] == 40
    assert read_checkpoint(run / "checkpoint_00000040.pt")["iteration"] == 40
    # checkpoint_interval=10 and keep_checkpoints=3: steps 20, 30 and 40 remain.
    assert sorted(p.name for p in run.glob("checkpoint_*.pt")) == [
        "checkpoint_00000020.pt", "checkpoint_00000030.pt", "checkpoint_00000040.pt"
    ]


def test_overfits_a_single_batch(tmp_path):
    # A training file of exactly one window: every batch is that window.
    ids = np.random.default_rng(1).integers(0, VOCAB, size=CONTEXT + 1)
    one_window = write_token_file(tmp_path / "one.npy", ids, VOCAB)
    config = tiny_config(
        tmp_path, train_data_path=str(one_window), val_data_path=str(one_window), batch_size=2,
        total_iters=150, eval_interval=150, checkpoint_interval=150, weight_decay=0.0, min_learning_rate=1e-2,
    )  # fmt: skip
    summary = train(config, progress=False)
    assert summary["train_losses"][0] > 3.0
    assert summary["final_val_loss"] < 0.1, summary["train_losses"][-10:]


def test_resume_continues_bit_for_bit(tmp_path, monkeypatch):
    straight = train(tiny_config(tmp_path / "a", output_dir=str(tmp_path / "a" / "run")), progress=False)

    # Crash in the 12th step: the checkpoint from step 10 survives, step 11 got logged.
    config = tiny_config(tmp_path / "b", output_dir=str(tmp_path / "b" / "run"))
    crash_at_step(monkeypatch, 12)
    with pytest.raises(KeyboardInterrupt):
        train(config, progress=False)
    monkeypatch.undo()
    assert read_checkpoint(tmp_path / "b" / "run" / "checkpoint_00000010.pt")["iteration"] == 10

    torch.manual_seed(1234)  # whatever the global RNGs hold now must not matter
    np.random.seed(99)
    resume_from = str(tmp_path / "b" / "run" / "checkpoint_00000010.pt")
    resumed = train(dataclasses.replace(config, resume=resume_from), progress=False)
    assert resumed["start_iteration"] == 10 and len(resumed["train_losses"]) == 10

    a = read_checkpoint(tmp_path / "a" / "run" / "checkpoint_00000020.pt")
    b = read_checkpoint(tmp_path / "b" / "run" / "checkpoint_00000020.pt")
    assert a["iteration"] == b["iteration"] == 20
    for name, weight in a["model"].items():
        assert torch.equal(weight, b["model"][name]), name
    for key, state in a["optimizer"]["state"].items():
        assert torch.equal(state["exp_avg_sq"], b["optimizer"]["state"][key]["exp_avg_sq"])
    assert straight["train_losses"][10:] == resumed["train_losses"]
    assert resumed["final_val_loss"] == straight["final_val_loss"]
    # The metrics file reads as one uninterrupted run: step 11 from the crashed run was dropped.
    losses_a = [(r["step"], r["loss"]) for r in read_run_metrics(tmp_path / "a" / "run") if "loss" in r]
    losses_b = [(r["step"], r["loss"]) for r in read_run_metrics(tmp_path / "b" / "run") if "loss" in r]
    assert losses_a == losses_b
    val_b = [r["step"] for r in read_run_metrics(tmp_path / "b" / "run") if "val_loss" in r]
    assert val_b == [0, 5, 10, 15, 20]


def test_load_model_rebuilds_the_trained_model(tmp_path):
    summary = train(tiny_config(tmp_path, total_iters=3), progress=False)
    model = load_model(summary["checkpoint"], device="cpu", kernels="torch")
    stored = read_checkpoint(summary["checkpoint"])
    assert not model.training and model.config.d_model == 32
    assert model.backends["attention"] == "torch"
    for name, weight in model.state_dict().items():
        assert torch.equal(weight, stored["model"][name]), name
    logits = model(torch.zeros(1, 5, dtype=torch.long))
    assert logits.shape == (1, 5, VOCAB)


def test_trains_a_grouped_query_model_with_tied_embeddings_from_scratch(tmp_path):
    summary = train(tiny_config(tmp_path, num_kv_heads=2, tie_embeddings=True, total_iters=10), progress=False)
    assert summary["final_val_loss"] < summary["initial_val_loss"]
    stored = read_checkpoint(summary["checkpoint"])
    assert stored["model_config"]["num_kv_heads"] == 2 and stored["model_config"]["tie_embeddings"] is True
    model = load_model(summary["checkpoint"], device="cpu", kernels="reference")
    assert model.lm_head.weight is model.token_embeddings.weight
    assert model.layers[0].attn.k_proj.weight.shape == (2 * 8, 32)
    # AdamW updated the one tied matrix once per step: its moments exist for it once.
    assert len(stored["optimizer"]["state"]) == len(list(model.parameters()))


def test_load_model_needs_a_model_config(tmp_path):
    module = torch.nn.Linear(2, 2)
    save_checkpoint(module, torch.optim.SGD(module.parameters(), lr=0.1), 0, tmp_path / "c.pt")
    with pytest.raises(ValueError, match=r"c\.pt.*no model config"):
        load_model(tmp_path / "c.pt", device="cpu")


# ---------------------------------------------------------------- bad input, refused before any step


def _write_bad_vocab(tmp_path):
    return str(write_token_file(tmp_path / "big_ids.npy", np.arange(200) % (VOCAB + 5), VOCAB + 5))


def _write_short(tmp_path):
    return str(write_token_file(tmp_path / "short.npy", np.arange(CONTEXT), VOCAB))


def _write_float(tmp_path):
    np.save(tmp_path / "floats.npy", np.zeros(500, dtype=np.float32))
    return str(tmp_path / "floats.npy")


def _write_truncated(tmp_path):
    good = write_token_file(tmp_path / "good.npy", np.arange(500) % VOCAB, VOCAB)
    (tmp_path / "cut.npy").write_bytes(good.read_bytes()[:-7])
    return str(tmp_path / "cut.npy")


def _write_corrupt_checkpoint(tmp_path):
    (tmp_path / "broken.pt").write_bytes(b"PK\x03\x04 not really a checkpoint")
    return str(tmp_path / "broken.pt")


def _write_other_model_checkpoint(tmp_path):
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    train(tiny_config(other_dir, d_model=16, total_iters=2, output_dir=str(other_dir / "run")), progress=False)
    return str(other_dir / "run" / "checkpoint_00000002.pt")


# fmt: off
BAD_INPUTS = {
    "id >= vocab_size": ("train_data_path", _write_bad_vocab, ValueError, r"--train_data_path=.*holds id 68, but vocab_size is 64"),
    "short val file": ("val_data_path", _write_short, ValueError, r"--val_data_path=.*holds 16 tokens.*at least 17"),
    "wrong dtype": ("train_data_path", _write_float, ValueError, r"--train_data_path=.*float32.*expected a 1-D uint16"),
    "truncated data": ("val_data_path", _write_truncated, ValueError, r"--val_data_path=.*truncated or corrupt"),
    "missing data": ("train_data_path", lambda p: str(p / "absent.npy"), FileNotFoundError, r"--train_data_path=.*absent\.npy"),
    "corrupt checkpoint": ("resume", _write_corrupt_checkpoint, ValueError, r"--resume: checkpoint .*broken\.pt.*truncated, corrupt"),
    "missing checkpoint": ("resume", lambda p: str(p / "nope.pt"), FileNotFoundError, r"--resume: checkpoint .*nope\.pt.*does not exist"),
    "other model's checkpoint": ("resume", _write_other_model_checkpoint, ValueError, r"different model.*'d_model': \(16, 32\)"),
    "unknown kernels": ("kernels", lambda p: "fastest", ValueError, r"--kernels='fastest'.*expected one of"),
    "unknown kernel op": ("kernels", lambda p: {"matmul": "torch"}, ValueError, r"--kernels=.*unknown ops \['matmul'\]"),
    "heads do not divide d_model": ("num_heads", lambda p: 5, ValueError, r"--d_model=32 must be divisible by --num_heads=5"),
    "odd head size": ("num_heads", lambda p: 32, ValueError, r"--d_model / --num_heads = 1 must be even"),
    "warmup past the end": ("warmup_iters", lambda p: 21, ValueError, r"--warmup_iters=21 must not exceed --total_iters=20"),
    "min lr above peak": ("min_learning_rate", lambda p: 1.0, ValueError, r"--min_learning_rate=1.0 must not exceed"),
    "zero batch": ("batch_size", lambda p: 0, ValueError, r"--batch_size must be an int >= 1, got 0"),
    "float iterations": ("total_iters", lambda p: 20.5, ValueError, r"--total_iters must be an int >= 1, got 20.5"),
    "bad device": ("device", lambda p: "tpu", ValueError, r"--device='tpu'"),
    "negative lr": ("learning_rate", lambda p: -1e-3, ValueError, r"--learning_rate must be a finite number >= 0.0, got -0.001"),
    "kv heads do not divide heads": ("num_kv_heads", lambda p: 3, ValueError, r"--num_kv_heads=3 must divide --num_heads=4"),
    "no model shape": ("d_model", lambda p: None, ValueError, r"\['d_model'\] are required for a new model \(or give --init_from\)"),
    "missing init_from": ("init_from", lambda p: str(p / "absent"), FileNotFoundError, r"--init_from: path .*absent"),
}
# fmt: on
if not torch.cuda.is_available():
    BAD_INPUTS["cuda without a GPU"] = ("device", lambda p: "cuda", ValueError, r"--device='cuda'.*no CUDA device")


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_raises_before_any_step(tmp_path, monkeypatch, case):
    field, make_value, error, message = BAD_INPUTS[case]
    config = tiny_config(tmp_path)
    config = dataclasses.replace(config, **{field: make_value(tmp_path)})

    def no_step_allowed(*args, **kwargs):
        raise AssertionError("a training step ran despite bad input")

    monkeypatch.setattr(Trainer, "train_step", no_step_allowed)
    with pytest.raises(error, match=message):
        train(config, progress=False)
    # Nothing was written: no checkpoint, no metrics, not even the folder.
    assert not (tmp_path / "run").exists()


def test_refuses_to_overwrite_a_previous_run_unless_asked(tmp_path):
    config = tiny_config(tmp_path, total_iters=2)
    train(config, progress=False)
    before = (tmp_path / "run" / "checkpoint_00000002.pt").read_bytes()
    with pytest.raises(ValueError, match=r"--output_dir=.*already holds a run.*--resume.*--overwrite"):
        train(config, progress=False)
    assert (tmp_path / "run" / "checkpoint_00000002.pt").read_bytes() == before
    summary = train(dataclasses.replace(config, overwrite=True), progress=False)
    assert [r["step"] for r in read_run_metrics(tmp_path / "run") if "loss" in r] == [1, 2]
    assert summary["iterations"] == 2


def test_resume_past_total_iters_is_refused(tmp_path):
    config = tiny_config(tmp_path, total_iters=4, checkpoint_interval=4)
    summary = train(config, progress=False)
    shorter = dataclasses.replace(config, total_iters=3, warmup_iters=0, resume=summary["checkpoint"])
    with pytest.raises(ValueError, match=r"iteration 4, past --total_iters=3"):
        train(shorter, progress=False)


def test_resuming_an_earlier_checkpoint_refuses_to_mix_with_later_ones(tmp_path):
    config = tiny_config(tmp_path, checkpoint_interval=5)
    straight = train(config, progress=False)
    run = tmp_path / "run"
    earlier = dataclasses.replace(config, resume=str(run / "checkpoint_00000010.pt"))
    with pytest.raises(ValueError, match=r"checkpoints from after the resumed step 10 \(steps \[15, 20\]\).*--overwrite"):
        train(earlier, progress=False)
    # --overwrite replaces the later ones with this run's own.
    again = train(dataclasses.replace(earlier, overwrite=True, learning_rate=5e-3), progress=False)
    assert again["start_iteration"] == 10
    assert sorted(p.name for p in run.glob("checkpoint_*.pt")) == [
        "checkpoint_00000010.pt", "checkpoint_00000015.pt", "checkpoint_00000020.pt"
    ]
    assert read_checkpoint(run / "checkpoint_00000020.pt")["extra"]["train_config"]["learning_rate"] == 5e-3
    losses = [r["loss"] for r in read_run_metrics(run) if "loss" in r]
    assert losses[:10] == straight["train_losses"][:10] and losses[10:] == again["train_losses"]
