"""Training through each loss backend: the chunked "torch" loss takes the same steps as the reference."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close

from scratchlm.train.data import estimate_loss, load_token_dataset
from scratchlm.train.distributed import Parallel
from scratchlm.train.trainer import Trainer
from tiny_run import CONTEXT, VOCAB, tiny_config


def trained(tmp_path, loss_backend: str, steps: int, **overrides) -> tuple[Trainer, list[dict], float]:
    config = tiny_config(tmp_path, kernels={"loss": loss_backend}, **overrides).resolved()
    trainer = Trainer(config, Parallel(), torch.device("cpu"))
    assert trainer.model.backends["loss"] == loss_backend
    data = load_token_dataset(config.train_data_path, VOCAB, CONTEXT)
    records = [trainer.train_step(data) for _ in range(steps)]
    val = load_token_dataset(config.val_data_path, VOCAB, CONTEXT)
    return trainer, records, trainer.evaluate(val)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("overrides", [{}, {"grad_accum_steps": 2, "tie_embeddings": True}])
def test_fused_losses_train_to_the_same_weights_as_the_reference(tmp_path, overrides, backend):
    # "triton" runs under the interpreter here (conftest), on 4 x 16 rows of a 64-token vocabulary.
    reference, reference_log, reference_val = trained(tmp_path / "reference", "reference", 4, **overrides)
    chunked, chunked_log, chunked_val = trained(tmp_path / backend, backend, 4, **overrides)
    for ours, theirs in zip(chunked_log, reference_log):
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5)
        assert ours["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-4)
    assert chunked_val == pytest.approx(reference_val, rel=1e-5)
    expected = reference.model.state_dict()
    for name, weight in chunked.model.state_dict().items():
        assert_close(weight, expected[name], atol=1e-5, rtol=1e-4, name=name)


def test_estimate_loss_through_the_model_equals_the_loss_of_its_logits(tmp_path):
    from scratchlm.train import cross_entropy_loss

    config = tiny_config(tmp_path, kernels={"loss": "torch"}).resolved()
    trainer = Trainer(config, Parallel(), torch.device("cpu"))
    val = load_token_dataset(config.val_data_path, VOCAB, CONTEXT)
    got = estimate_loss(trainer.model, val, context_length=CONTEXT, batch_size=4, num_batches=2, device="cpu")
    # The same windows scored from the logits, the way evaluation worked before the loss op.
    starts = torch.linspace(0, len(val) - CONTEXT - 1, 8, dtype=torch.float64).round().long()
    windows = torch.from_numpy(val[(starts[:, None] + torch.arange(CONTEXT + 1)).numpy()].astype("int64"))
    with torch.no_grad():
        trainer.model.eval()
        expected = float(cross_entropy_loss(trainer.model(windows[:, :-1]), windows[:, 1:]))
    assert got == pytest.approx(expected, rel=1e-6)
