"""Bit-for-bit on the CPU at the default thread count: the op that varied, and two whole runs.

Two identical runs at 2 threads used to differ in the last bit of a few
losses: the token embedding's backward (indexing's backward, index_put_ with
accumulate) adds gradient rows with atomics from several threads, in an
order that changes from run to run. ``train`` turns on torch's deterministic
algorithms for CPU runs, which sort the indices first.
"""

from __future__ import annotations

import pytest
import torch

from scratchlm.model import Embedding
from scratchlm.train import read_checkpoint, train
from scratchlm.train.loop import deterministic_on_cpu
from tiny_run import tiny_config


def _embedding_backward():
    """A function returning the embedding's weight gradient, recomputed from scratch each call."""
    torch.manual_seed(0)
    embedding = Embedding(2048, 128)
    ids = torch.randint(0, 2048, (16, 128))
    upstream = torch.randn(16, 128, 128)

    def gradient() -> torch.Tensor:
        embedding.weight.grad = None
        embedding(ids).backward(upstream)
        return embedding.weight.grad.clone()

    return gradient


def test_the_embedding_backward_repeats_bit_for_bit_inside_a_cpu_run():
    gradient = _embedding_backward()
    first = gradient()
    differing = sum(not torch.equal(gradient(), first) for _ in range(20))
    if differing == 0:
        pytest.skip(f"the racing backward never showed here ({torch.get_num_threads()} threads): nothing to fix")
    with deterministic_on_cpu("cpu"):
        first = gradient()
        assert all(torch.equal(gradient(), first) for _ in range(20))
    assert not torch.are_deterministic_algorithms_enabled(), "the setting is put back afterwards"


def test_two_runs_at_the_default_thread_count_are_identical(tmp_path):
    # A vocabulary and batch large enough for the embedding's backward to use several threads.
    shape = dict(vocab_size=2048, context_length=64, d_model=64, num_layers=1, batch_size=16, total_iters=8)
    runs = []
    for name in ("a", "b"):
        config = tiny_config(tmp_path, output_dir=str(tmp_path / name), checkpoint_interval=8, **shape)
        runs.append(train(config, progress=False))
    assert runs[0]["train_losses"] == runs[1]["train_losses"]
    a, b = (read_checkpoint(run["checkpoint"])["model"] for run in runs)
    assert all(torch.equal(a[name], b[name]) for name in a)
