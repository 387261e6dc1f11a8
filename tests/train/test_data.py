"""get_batch over memory-mapped token files; load_token_dataset's refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scratchlm.tokenizer.token_file import read_token_file, write_token_file
from scratchlm.train import get_batch, load_token_dataset
from scratchlm.train.data import evenly_spaced_starts


@pytest.fixture
def token_file(tmp_path):
    # ids 0..299 in order, so a window's first id is its start position.
    return write_token_file(tmp_path / "tokens.npy", np.arange(300), vocab_size=1000)


def test_get_batch_shapes_targets_and_bounds(token_file):
    data = read_token_file(token_file, 1000)
    generator = torch.Generator().manual_seed(0)
    seen_starts = set()
    for _ in range(50):
        inputs, targets = get_batch(data, 8, 16, "cpu", generator=generator)
        assert inputs.shape == targets.shape == (8, 16)
        assert inputs.dtype == targets.dtype == torch.int64
        assert inputs.device.type == "cpu"
        assert torch.equal(targets[:, :-1], inputs[:, 1:])
        # Consecutive ids: each row is one contiguous window of the file.
        assert torch.equal(targets, inputs + 1)
        assert int(inputs.min()) >= 0 and int(targets.max()) <= 299
        seen_starts.update(inputs[:, 0].tolist())
    # Uniform over every legal start, including the last one (300 - 16 - 1).
    assert 0 in seen_starts and 283 in seen_starts and max(seen_starts) == 283


def test_get_batch_is_reproducible_from_generator_state(token_file):
    data = read_token_file(token_file)
    generator = torch.Generator().manual_seed(5)
    state = generator.get_state()
    first = get_batch(data, 4, 8, "cpu", generator=generator)
    generator.set_state(state)
    again = get_batch(data, 4, 8, "cpu", generator=generator)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


@pytest.mark.parametrize("length", [0, 5, 16])
def test_get_batch_rejects_dataset_shorter_than_a_window(length):
    with pytest.raises(ValueError, match=rf"holds {length} tokens.*context_length=16.*at least 17"):
        get_batch(np.arange(length, dtype=np.uint16), 2, 16, "cpu")


def test_get_batch_accepts_exactly_one_window():
    inputs, targets = get_batch(np.arange(17, dtype=np.uint16), 3, 16, "cpu")
    assert torch.equal(inputs, torch.arange(16).expand(3, 16))
    assert torch.equal(targets, torch.arange(1, 17).expand(3, 16))


def test_evenly_spaced_starts_cover_first_and_last_window():
    starts = evenly_spaced_starts(300, 16, 5)
    assert starts.tolist()[0] == 0 and starts.tolist()[-1] == 283
    assert torch.equal(starts, evenly_spaced_starts(300, 16, 5))


def test_load_token_dataset_names_argument_and_problem(tmp_path, token_file):
    with pytest.raises(ValueError, match=r"--train_data_path=.*holds 300 tokens.*context_length=300"):
        load_token_dataset(token_file, 1000, 300, argument="--train_data_path")
    with pytest.raises(ValueError, match=r"--val_data_path=.*holds id 299, but vocab_size is 200"):
        load_token_dataset(token_file, 200, 16, argument="--val_data_path")
    with pytest.raises(FileNotFoundError, match=r"--train_data_path=.*missing\.npy"):
        load_token_dataset(tmp_path / "missing.npy", 1000, 16, argument="--train_data_path")
    wrong_dtype = tmp_path / "float.npy"
    np.save(wrong_dtype, np.zeros(100, dtype=np.float32))
    with pytest.raises(ValueError, match=r"--train_data_path=.*float32.*expected a 1-D uint16"):
        load_token_dataset(wrong_dtype, 1000, 16, argument="--train_data_path")
    truncated = tmp_path / "truncated.npy"
    truncated.write_bytes(token_file.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"--train_data_path=.*truncated or corrupt"):
        load_token_dataset(truncated, 1000, 16, argument="--train_data_path")
    assert len(load_token_dataset(token_file, 1000, 299)) == 300
