"""The throughput options of a training run: precision, accumulation, recomputation, compile, AdamW paths, MFU,
TensorBoard and `scratchlm plot`."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from scratchlm.cli import main as scratchlm_main
from scratchlm.model import TransformerLM
from scratchlm.train import read_checkpoint, train
from scratchlm.train.metrics import format_step
from scratchlm.train.throughput import mfu, peak_tflops_for
from tiny_run import VOCAB, crash_at_step, read_run_metrics, tiny_config


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("fp32")
    return train(tiny_config(tmp_path), progress=False)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_close_to_fp32_and_resumes_exactly(tmp_path, monkeypatch, fp32_run, precision):
    straight_config = tiny_config(tmp_path / "a", precision=precision, output_dir=str(tmp_path / "a" / "run"))
    straight = train(straight_config, progress=False)
    assert straight["precision"] == precision
    _assert_follows_the_fp32_run(straight, fp32_run, precision)
    stored = read_checkpoint(straight["checkpoint"])
    # Master weights and moments stay float32.
    assert all(w.dtype == torch.float32 for w in stored["model"].values())
    scaler = stored["extra"]["train_state"]["scaler"]
    assert (scaler is not None and scaler["scale"] > 0) if precision == "fp16" else scaler is None

    config = tiny_config(tmp_path / "b", precision=precision, output_dir=str(tmp_path / "b" / "run"))
    crash_at_step(monkeypatch, 13)
    with pytest.raises(KeyboardInterrupt):
        train(config, progress=False)
    monkeypatch.undo()
    resumed = train(dataclasses.replace(config, resume=config.output_dir), progress=False)
    assert resumed["start_iteration"] == 10
    assert resumed["train_losses"] == straight["train_losses"][10:]
    final = read_checkpoint(resumed["checkpoint"])
    for name, weight in stored["model"].items():
        assert torch.equal(weight, final["model"][name]), name
    assert final["extra"]["train_state"]["scaler"] == scaler


def _assert_follows_the_fp32_run(mixed: dict, fp32: dict, precision: str) -> None:
    """Half-precision matmuls move each step a little, not the run's course. The tolerances come from
    the fp32 run's own spread, so they scale with the run rather than being fixed numbers:
    - gradient norms: each step's within a quarter of the fp32 run's median step-to-step change
      (a loss scale left in the norm, or clipping before unscaling, is off by 2^16);
    - losses: the mean gap within a quarter of the fp32 run's median step-to-step change of loss,
      and the validation loss within half of it (updates shrunk or skipped drift the run away)."""
    mixed_steps, fp32_steps = read_run_metrics(mixed["output_dir"]), read_run_metrics(fp32["output_dir"])
    mixed_norms = [r["grad_norm"] for r in mixed_steps if "grad_norm" in r]
    fp32_norms = [r["grad_norm"] for r in fp32_steps if "grad_norm" in r]
    assert len(mixed_norms) == len(fp32_norms) == 20
    norm_spread = float(np.median(np.abs(np.diff(fp32_norms))))
    norm_gaps = np.abs(np.subtract(mixed_norms, fp32_norms))
    assert norm_gaps.max() <= 0.25 * norm_spread, (precision, norm_gaps.max(), norm_spread)
    loss_spread = float(np.median(np.abs(np.diff(fp32["train_losses"]))))
    loss_gaps = np.abs(np.subtract(mixed["train_losses"], fp32["train_losses"]))
    assert loss_gaps.mean() <= 0.25 * loss_spread, (precision, loss_gaps.mean(), loss_spread)
    assert abs(mixed["final_val_loss"] - fp32["final_val_loss"]) <= 0.5 * loss_spread


def test_activation_checkpointing_recomputes_to_the_same_gradients():
    model = TransformerLM(vocab_size=VOCAB, context_length=16, d_model=32, num_layers=3, num_heads=4, d_ff=64,
                          kernels="reference")  # fmt: skip
    ids = torch.randint(0, VOCAB, (2, 16))
    grads = {}
    for recompute in (False, True):
        model.zero_grad()
        model.activation_checkpointing = recompute
        model(ids).logsumexp(-1).mean().backward()
        grads[recompute] = {name: p.grad.clone() for name, p in model.named_parameters()}
    for name, grad in grads[False].items():
        assert torch.equal(grad, grads[True][name]), name


def test_activation_checkpointing_run_matches_the_plain_run(tmp_path, fp32_run):
    summary = train(tiny_config(tmp_path, activation_checkpointing=True), progress=False)
    assert summary["train_losses"] == fp32_run["train_losses"]


def test_unchecked_ids_give_the_same_logits_and_checking_stays_on_by_default():
    model = TransformerLM(vocab_size=VOCAB, context_length=16, d_model=32, num_layers=1, num_heads=4, d_ff=64)
    ids = torch.randint(0, VOCAB, (2, 8))
    assert torch.equal(model(ids, check_ids=False), model(ids))
    with pytest.raises(ValueError, match=r"token_ids contains id 64"):
        model(torch.full((1, 4), VOCAB))


@pytest.mark.parametrize("adamw", ["loop", "fused"])
def test_every_adamw_path_takes_the_same_steps(tmp_path, fp32_run, adamw):
    summary = train(tiny_config(tmp_path, adamw=adamw), progress=False)
    if adamw == "loop":  # the default on CPU is our foreach path: the same arithmetic, bit for bit
        assert summary["train_losses"] == fp32_run["train_losses"]
    else:
        assert isinstance(read_checkpoint(summary["checkpoint"])["optimizer"]["state"][0]["step"], torch.Tensor)
        assert summary["train_losses"] == pytest.approx(fp32_run["train_losses"], rel=1e-5)


def test_compiled_model_trains_like_eager(tmp_path, fp32_run):
    summary = train(tiny_config(tmp_path, compile=True, total_iters=20), progress=False)
    assert summary["train_losses"] == pytest.approx(fp32_run["train_losses"], rel=1e-4)
    # The compiled module saves under the model's own parameter names.
    assert set(read_checkpoint(summary["checkpoint"])["model"]) == set(
        read_checkpoint(fp32_run["checkpoint"])["model"]
    )


# ---------------------------------------------------------------- MFU and the log line


@pytest.mark.parametrize(
    "name, expected",
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA L4", 121.0),
        ("Some Future GPU", None),
    ],
)
def test_peak_rate_is_looked_up_by_gpu_name(monkeypatch, name, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_tflops_for("cuda:0") == expected
    assert peak_tflops_for("cpu") is None


def test_mfu_is_achieved_flops_over_peak():
    # 1e9 FLOPs per token at 1e5 tokens/s is 100 TFLOP/s: 10% of 1000, 5% of 2 x 1000.
    assert mfu(1e9, 1e5, 1000.0) == pytest.approx(0.10)
    assert mfu(1e9, 1e5, 1000.0, num_devices=2) == pytest.approx(0.05)


def test_runs_log_mfu_when_the_peak_is_given_and_print_a_log_line(tmp_path, capsys):
    summary = train(tiny_config(tmp_path, peak_tflops=0.5, log_interval=5), progress=True)
    steps = [r for r in read_run_metrics(tmp_path / "run") if "loss" in r]
    model = TransformerLM(vocab_size=VOCAB, context_length=16, d_model=32, num_layers=2, num_heads=4, d_ff=64)
    for record in steps:
        assert record["mfu"] == pytest.approx(model.flops_per_token() * record["tokens_per_s"] / 0.5e12)
    printed = capsys.readouterr()
    lines = [line for line in (printed.out + printed.err).splitlines() if " ms/step" in line]
    assert [line.split(" | ")[0].split("step ")[-1] for line in lines] == ["5/20", "10/20", "15/20", "20/20"]
    assert summary["iterations"] == 20


def test_log_line_format():
    record = {"step": 7, "loss": 2.5, "lr": 3e-4, "grad_norm": 0.8123, "ms_per_step": 152.34,
              "tokens_per_s": 53900.4, "mfu": 0.4123}  # fmt: skip
    assert format_step(record, 100) == (
        "step 7/100 | loss 2.5000 | lr 3.00e-04 | grad norm 0.812 | 152.3 ms/step | 53,900 tok/s | MFU 41.2%"
    )
    del record["mfu"]
    assert format_step(record, 100).endswith("53,900 tok/s")


# ---------------------------------------------------------------- TensorBoard and plots


def test_tensorboard_gets_the_same_scalars(fp32_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(fp32_run["output_dir"] + "/tensorboard"))
    events.Reload()
    losses = [event.value for event in events.Scalars("train/loss")]
    assert losses == pytest.approx(fp32_run["train_losses"], rel=1e-6)
    assert [event.step for event in events.Scalars("val/loss")] == [0, 5, 10, 15, 20]
    assert "train/tokens_per_s" in events.Tags()["scalars"]


def test_plot_command_draws_a_png(fp32_run, tmp_path, capsys):
    out = tmp_path / "curves.png"
    assert scratchlm_main(["plot", fp32_run["output_dir"], "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert scratchlm_main(["plot", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err


# ---------------------------------------------------------------- settings


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"precision": "fp8"}, r"--precision='fp8': expected one of \['auto', 'fp32', 'bf16', 'fp16'\]"),
        ({"adamw": "sparse"}, r"--adamw='sparse': expected one of"),
        ({"parallel": "tp"}, r"--parallel='tp': expected one of \['none', 'ddp', 'fsdp'\]"),
        ({"parallel": "fsdp", "precision": "fp16"}, r"--precision=fp16 with --parallel=fsdp is not supported"),
        ({"grad_accum_steps": 3}, r"--batch_size=4 must be divisible by --grad_accum_steps=3"),
        ({"keep_checkpoints": -1}, r"--keep_checkpoints must be an int >= 0, got -1"),
        ({"compile": "yes"}, r"--compile must be true or false, got 'yes'"),
        ({"parallel": "ddp"}, r"--parallel=ddp needs the torchrun launcher"),
    ],
)
def test_bad_throughput_settings_are_refused_before_anything_is_written(tmp_path, monkeypatch, overrides, message):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match=message):
        train(tiny_config(tmp_path, **overrides), progress=False)
    assert not (tmp_path / "run").exists()
