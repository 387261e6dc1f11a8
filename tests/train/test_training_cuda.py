"""Training on a GPU: every kernel backend under bf16/fp16 autocast, eager and compiled (CUDA only).

A GPU run must follow the fp32 reference run of the same seed closely; the
CPU tests check the same machinery exactly, these check that the CUDA paths
(fused AdamW, pinned non-blocking batches, the Triton kernels under autocast,
torch.compile over them) hold up.
"""

from __future__ import annotations

import pytest
import torch

from scratchlm.train import read_checkpoint, train
from tiny_run import read_run_metrics, tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def fp32_reference(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("cuda_fp32")
    return train(tiny_config(tmp_path, device="cuda", kernels="reference", precision="fp32"), progress=False)


@pytest.mark.parametrize("compile_model", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("kernels", ["torch", "triton"])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_gpu_training_follows_the_fp32_reference(
    tmp_path, fp32_reference, kernels, precision, compile_model
):
    config = tiny_config(tmp_path, device="cuda", kernels=kernels, precision=precision, compile=compile_model)
    summary = train(config, progress=False)
    assert summary["precision"] == precision and summary["skipped_steps"] == 0
    assert summary["train_losses"] == pytest.approx(fp32_reference["train_losses"], abs=0.08)
    assert summary["final_val_loss"] == pytest.approx(fp32_reference["final_val_loss"], abs=0.08)
    stored = read_checkpoint(summary["checkpoint"])
    assert all(weight.dtype == torch.float32 for weight in stored["model"].values())
    # The fused AdamW is the default on CUDA (its step counters are tensors).
    assert isinstance(stored["optimizer"]["state"][0]["step"], torch.Tensor)
    steps = [r for r in read_run_metrics(config.output_dir) if "loss" in r]
    assert all(r["tokens_per_s"] > 0 for r in steps)


def test_gpu_resume_continues_the_run(tmp_path, fp32_reference):
    # The reference run saved at steps 10 and 20; a new run picks up its step-10 checkpoint.
    first = fp32_reference["output_dir"] + "/checkpoint_00000010.pt"
    config = tiny_config(tmp_path, device="cuda", kernels="reference", precision="fp32", resume=first)
    resumed = train(config, progress=False)
    assert resumed["start_iteration"] == 10 and resumed["iterations"] == 20
    assert resumed["train_losses"] == pytest.approx(fp32_reference["train_losses"][10:], rel=1e-4)
