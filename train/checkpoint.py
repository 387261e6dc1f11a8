"""Checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint is a ``torch.save``'d dict of plain data only, so it loads with
``torch.load(weights_only=True)`` (which never executes code from the file)::

    {
        "format": "scratchlm.checkpoint", "version": 1,
        "iteration": int,                 # optimizer steps taken so far
        "model": model.state_dict(),      # weights only (RoPE tables are non-persistent)
        "optimizer": optimizer.state_dict(),
        "model_config": dict | None,      # ModelConfig.to_dict(), to rebuild the model
        "rng": {                          # every random stream the run draws from
            "torch": ByteTensor, "cuda": [ByteTensor, ...],
            "python": {"version", "state": int64 tensor, "gauss_next"},
            "numpy": {"kind", "keys": int64 tensor, "pos", "has_gauss", "cached_gaussian"},
            "generators": {name: ByteTensor},   # e.g. the training batch sampler
        },
        "extra": dict | None,             # caller's plain data, e.g. the training config
    }

Saving to a path writes a temporary file in the same folder and renames it over
the target with ``os.replace`` (atomic on POSIX and Windows), so a crash while
saving leaves the previous checkpoint untouched and no partial file.

A training run keeps its checkpoints in its output folder as
``checkpoint_<step, 8 digits>.pt``; ``newest_checkpoint`` finds the latest one
that reads back whole and ``prune_checkpoints`` keeps the newest K.
"""

from __future__ import annotations

import os
import random
import re
import warnings
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from scratchlm.atomic import atomic_write

FORMAT = "scratchlm.checkpoint"
VERSION = 1
_REQUIRED_KEYS = ("format", "version", "iteration", "model", "optimizer")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: truncated, corrupt, or not one of ours."""


def _describe(src) -> str:
    """How error messages name a checkpoint: its path, a file object's name, or its type."""
    if isinstance(src, (str, os.PathLike)):
        return repr(str(src))
    name = getattr(src, "name", None)
    return repr(name) if isinstance(name, str) else f"<{type(src).__name__}>"


# ---------------------------------------------------------------- RNG state


def capture_rng_state(generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Every RNG state as tensors and primitives (safe for ``weights_only`` loading)."""
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss_next": py_gauss},
        "numpy": {
            "kind": np_kind,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }


def restore_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator] | None = None) -> None:
    """Put back what ``capture_rng_state`` recorded (CUDA streams only where CUDA is present)."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])
    python = state["python"]
    random.setstate((python["version"], tuple(int(x) for x in python["state"].tolist()), python["gauss_next"]))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    restore_generators(state, generators)


def restore_generators(state: dict[str, Any], generators: dict[str, torch.Generator] | None) -> None:
    """Set only the named generators from a captured RNG state, leaving the global RNGs alone."""
    for name, generator in (generators or {}).items():
        if name not in state["generators"]:
            raise CheckpointError(
                f"checkpoint has no state for generator {name!r}; it holds {sorted(state['generators'])}"
            )
        generator.set_state(state["generators"][name])


# ---------------------------------------------------------------- save


def _atomic_torch_save(payload: dict, path: Path) -> None:
    with atomic_write(path, "wb") as f:
        torch.save(payload, f)


def save_checkpoint(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    iteration: int,
    out: str | os.PathLike | IO[bytes],
    *,
    model_config: dict | None = None,
    generators: dict[str, torch.Generator] | None = None,
    extra: dict | None = None,
) -> None:
    """Save model, optimizer, iteration, model config and all RNG states to ``out``.

    ``out`` is a path (written atomically, see the module docstring) or a
    binary file object. ``model_config`` defaults to ``model.config.to_dict()``
    when the model has one. ``generators`` are extra ``torch.Generator``s, by
    name, whose states are saved too (the training loop's batch sampler).
    """
    if model_config is None and hasattr(getattr(model, "config", None), "to_dict"):
        model_config = model.config.to_dict()
    payload = checkpoint_payload(
        model.state_dict(), optimizer.state_dict(), iteration,
        model_config=model_config, generators=generators, extra=extra,
    )  # fmt: skip
    write_checkpoint(payload, out)


def checkpoint_payload(
    model_state: dict,
    optimizer_state: dict,
    iteration: int,
    *,
    model_config: dict | None = None,
    generators: dict[str, torch.Generator] | None = None,
    extra: dict | None = None,
) -> dict:
    """The checkpoint dict from already gathered state dicts (the distributed loop gathers them first)."""
    if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
        raise ValueError(f"iteration must be an int >= 0, got {iteration!r}")
    return {
        "format": FORMAT,
        "version": VERSION,
        "iteration": iteration,
        "model": model_state,
        "optimizer": optimizer_state,
        "model_config": model_config,
        "rng": capture_rng_state(generators),
        "extra": extra,
    }


def write_checkpoint(payload: dict, out: str | os.PathLike | IO[bytes]) -> None:
    """Write a checkpoint dict to a path (atomically) or to a binary file object."""
    if isinstance(out, (str, os.PathLike)):
        _atomic_torch_save(payload, Path(out))
    else:
        torch.save(payload, out)


# ---------------------------------------------------------------- load


def read_checkpoint(src: str | os.PathLike | IO[bytes], map_location: str | torch.device = "cpu") -> dict:
    """Load and check a checkpoint dict without applying it to anything.

    Raises ``FileNotFoundError`` for a missing path and ``CheckpointError``
    (a ``ValueError``) naming the source for a truncated, corrupt or foreign file.
    """
    where = _describe(src)
    if isinstance(src, (str, os.PathLike)) and not Path(src).is_file():
        raise FileNotFoundError(f"checkpoint {where} does not exist")
    try:
        # A path is memory-mapped: tensors are read as they are copied out, so loading a
        # model from a checkpoint never holds a second whole copy of its weights.
        is_path = isinstance(src, (str, os.PathLike))
        payload = torch.load(src, map_location=map_location, weights_only=True, **({"mmap": True} if is_path else {}))
    except Exception as e:  # torch reports truncation as RuntimeError, EOFError or UnpicklingError
        raise CheckpointError(
            f"checkpoint {where} could not be read ({type(e).__name__}: {e}); "
            "it is truncated, corrupt, or not a scratchlm checkpoint"
        ) from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {where} is not a scratchlm checkpoint (no format={FORMAT!r} marker)")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {where} has version {payload.get('version')!r}; this code reads {VERSION}")
    missing = [key for key in _REQUIRED_KEYS if key not in payload]
    if missing:
        raise CheckpointError(f"checkpoint {where} lacks {missing}")
    return payload


def load_checkpoint(
    src: str | os.PathLike | IO[bytes],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    generators: dict[str, torch.Generator] | None = None,
    restore_rng: bool = True,
) -> int:
    """Restore ``model`` (and ``optimizer``, RNG states, ``generators``) from ``src``.

    Returns the iteration the checkpoint was saved at. Tensors are loaded to the
    CPU and copied into the model's and optimizer's own devices. With
    ``restore_rng`` the torch, CUDA, Python and NumPy global RNGs are set back
    too, so the run continues with the random numbers it would have drawn.
    """
    payload = read_checkpoint(src)
    apply_checkpoint(payload, model, optimizer, generators=generators, restore_rng=restore_rng, source=_describe(src))
    return int(payload["iteration"])


def apply_checkpoint(
    payload: dict,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    generators: dict[str, torch.Generator] | None = None,
    restore_rng: bool = True,
    source: str = "checkpoint",
) -> None:
    """Apply an already read checkpoint dict (see ``load_checkpoint``); ``source`` names it in errors."""
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {source} does not fit this model: {e}") from e
    if optimizer is not None:
        try:
            optimizer.load_state_dict(payload["optimizer"])
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"checkpoint {source} does not fit this optimizer: {e}") from e
    if restore_rng or generators:
        if payload.get("rng") is None:
            raise CheckpointError(f"checkpoint {source} holds no RNG state to restore")
        if restore_rng:
            restore_rng_state(payload["rng"], generators)
        else:
            restore_generators(payload["rng"], generators)


# ---------------------------------------------------------------- a run folder's checkpoints

_CHECKPOINT_FILE = re.compile(r"checkpoint_(\d+)\.pt")


def checkpoint_path(run_dir: str | os.PathLike, iteration: int) -> Path:
    """Where a run saves its checkpoint from ``iteration``: ``run_dir/checkpoint_00000400.pt``."""
    return Path(run_dir) / f"checkpoint_{iteration:08d}.pt"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(iteration, path) of every checkpoint file in ``run_dir``, oldest first.

    Only finished files carry the final name: a save in progress (or killed)
    is a hidden ``.checkpoint_*.tmp`` file, which is never listed.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for path in run_dir.iterdir():
        match = _CHECKPOINT_FILE.fullmatch(path.name)
        if match and path.is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def read_newest_checkpoint(run_dir: str | os.PathLike) -> tuple[Path, dict]:
    """The newest checkpoint in ``run_dir`` that reads back whole, and its contents.

    A file that fails to read (a disk that lost data, a copy cut short) is
    skipped with a warning in favour of the one before it. Raises
    ``FileNotFoundError`` when the folder holds no usable checkpoint.
    """
    candidates = list_checkpoints(run_dir)
    for _, path in reversed(candidates):
        try:
            return path, read_checkpoint(path)
        except CheckpointError as e:
            warnings.warn(f"skipping unreadable checkpoint: {e}", stacklevel=2)
    what = "no readable checkpoint" if candidates else "no checkpoint_*.pt files"
    raise FileNotFoundError(f"{str(run_dir)!r} holds {what}")


def read_file_or_newest(path: str | os.PathLike) -> tuple[Path, dict]:
    """Read a checkpoint file, or a run folder's newest readable checkpoint; returns (file, contents)."""
    path = Path(path)
    if path.is_dir():
        return read_newest_checkpoint(path)
    return path, read_checkpoint(path)


def prune_checkpoints(run_dir: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints (``keep=0`` keeps all); returns what went."""
    if keep <= 0:
        return []
    doomed = [path for _, path in list_checkpoints(run_dir)[:-keep]]
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed


def remove_partial_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Delete temporary files left by a save that was killed (SIGKILL, power loss) mid-write."""
    run_dir = Path(run_dir)
    leftovers = sorted(run_dir.glob(".checkpoint_*.pt.*.tmp")) if run_dir.is_dir() else []
    for path in leftovers:
        path.unlink(missing_ok=True)
    return leftovers
