"""Batches of next-token windows cut from a memory-mapped token file.

A token file is one long 1-D array of ids (see ``scratchlm.tokenizer.token_file``).
A training example is any window of ``context_length + 1`` consecutive ids:
the first ``context_length`` are the input, the last ``context_length`` (the
same window shifted by one) are the targets. The array is memory-mapped, so a
corpus larger than RAM costs only the pages a batch touches.

Training windows start at random offsets drawn from a ``torch.Generator`` the
caller owns; its state goes into checkpoints, so a resumed run draws exactly
the batches the uninterrupted run would have drawn. Validation uses a fixed set
of evenly spaced windows, so every evaluation scores the same tokens and the
numbers are comparable across a run.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from scratchlm.model.functional import document_ids_from_eos
from scratchlm.tokenizer.token_file import read_token_file


def load_token_dataset(
    path: str | os.PathLike, vocab_size: int, context_length: int, *, argument: str = "path"
) -> np.ndarray:
    """Open a token file for training, refusing any file that would fail later.

    Checks (through ``read_token_file``) the header, dtype and byte size, that
    every id is below ``vocab_size``, and that the file holds at least one
    window of ``context_length + 1`` ids. ``argument`` names the setting the
    path came from (e.g. ``"--train_data_path"``) in error messages.
    """
    try:
        tokens = read_token_file(path, vocab_size)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{argument}={str(path)!r}: {e}") from e
    except ValueError as e:
        raise ValueError(f"{argument}={str(path)!r}: {e}") from e
    if len(tokens) < context_length + 1:
        raise ValueError(
            f"{argument}={str(path)!r} holds {len(tokens)} tokens, but context_length={context_length} "
            f"needs at least {context_length + 1} (one input window plus its next-token target)"
        )
    return tokens


def _check_window_fits(dataset, context_length: int) -> int:
    if dataset.ndim != 1:
        raise ValueError(f"dataset must be a 1-D array of token ids, got shape {tuple(dataset.shape)}")
    if context_length < 1:
        raise ValueError(f"context_length must be >= 1, got {context_length}")
    n = len(dataset)
    if n < context_length + 1:
        raise ValueError(
            f"dataset holds {n} tokens, but context_length={context_length} needs at least {context_length + 1}"
        )
    return n


def windows_at(dataset, starts: torch.Tensor, context_length: int, device: str | torch.device):
    """Inputs and targets for the windows beginning at ``starts`` (1-D ints).

    Returns two int64 tensors of shape (len(starts), context_length) on ``device``;
    ``targets[:, i] == inputs[:, i + 1]`` and ``targets[:, -1]`` is the id after the window.
    """
    offsets = np.arange(context_length + 1, dtype=np.int64)
    index = starts.numpy().astype(np.int64)[:, None] + offsets  # (batch, context_length + 1)
    # Fancy indexing copies just these ids out of the memmap; int64 is what embeddings index with.
    window = torch.from_numpy(np.asarray(dataset[index]).astype(np.int64))
    device = torch.device(device)
    if device.type == "cuda":
        # Pinned memory lets the copy overlap with queued GPU work.
        window = window.pin_memory().to(device, non_blocking=True)
    else:
        window = window.to(device)
    return window[:, :-1], window[:, 1:]


def get_batch(
    dataset,
    batch_size: int,
    context_length: int,
    device: str | torch.device,
    *,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``batch_size`` random windows from ``dataset`` (a 1-D array or memmap).

    Each start is uniform over [0, len(dataset) - context_length - 1], so every
    window, target included, lies inside the data. Returns ``(inputs, targets)``,
    int64 tensors of shape (batch_size, context_length) on ``device``. Pass a
    CPU ``torch.Generator`` to make the draw reproducible and resumable.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = _check_window_fits(dataset, context_length)
    starts = torch.randint(0, n - context_length, (batch_size,), generator=generator)
    return windows_at(dataset, starts, context_length, device)


def evenly_spaced_starts(dataset_length: int, context_length: int, num_windows: int) -> torch.Tensor:
    """``num_windows`` window starts spread evenly from the first to the last possible one.

    Deterministic (no RNG), so every evaluation scores the same windows; they
    overlap when the data holds fewer than ``num_windows`` disjoint windows.
    """
    last_start = dataset_length - context_length - 1
    return torch.linspace(0, last_start, num_windows, dtype=torch.float64).round().long()


@torch.no_grad()
def estimate_loss(
    model: torch.nn.Module,
    dataset,
    *,
    context_length: int,
    batch_size: int,
    num_batches: int,
    device: str | torch.device,
    shard: tuple[int, int] = (0, 1),
    eos_token_id: int | None = None,
) -> float:
    """Mean cross-entropy of ``model`` over ``num_batches * batch_size`` fixed windows.

    ``model`` is called as ``model(inputs, targets=targets)`` and returns the
    mean loss (``TransformerLM``'s forward does; so do DDP/FSDP wrappers of
    it), through the model's "loss" backend, so no logits are formed.

    The windows are evenly spaced over ``dataset`` (see ``evenly_spaced_starts``),
    so repeated calls measure the same tokens. The model is put in eval mode for
    the call and returned to the mode it was in.

    ``shard=(rank, world_size)`` scores only every world_size-th window from
    ``rank`` on, in batches of ``batch_size // world_size``: with batch_size
    divisible by world_size every rank gets the same number of windows, so the
    mean over ranks of the returned values is the mean over all windows.

    ``eos_token_id`` scores with attention kept inside documents, as training
    with ``--document_mask`` does: the model is also given
    ``document_ids=document_ids_from_eos(inputs, eos_token_id)``.
    """
    if num_batches < 1:
        raise ValueError(f"num_batches must be >= 1, got {num_batches}")
    rank, world_size = shard
    n = _check_window_fits(dataset, context_length)
    starts = evenly_spaced_starts(n, context_length, num_batches * batch_size)[rank::world_size]
    was_training = model.training
    model.eval()
    try:
        total = 0.0
        for batch_starts in starts.split(max(1, batch_size // world_size)):
            inputs, targets = windows_at(dataset, batch_starts, context_length, device)
            documents = {} if eos_token_id is None else {"document_ids": document_ids_from_eos(inputs, eos_token_id)}
            # Weight by windows so a short last batch counts for what it holds.
            total += float(model(inputs, targets=targets, **documents)) * len(batch_starts)
        return total / len(starts)
    finally:
        model.train(was_training)
