"""Data-parallel training across processes: DDP or FSDP2, launched with torchrun.

    torchrun --nproc_per_node=8 -m scratchlm.train --parallel fsdp ...

torchrun starts one process per GPU (or per CPU slot with the gloo backend)
and tells each its ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` through the
environment. Every rank builds the same model from the same seed, draws the
same global batch of window starts, and trains on its own slice of it:

- ``ddp``: every rank holds the whole model; DistributedDataParallel averages
  the gradients across ranks during backward.
- ``fsdp``: ``fully_shard`` (FSDP2) splits every block's parameters, gradients
  and AdamW moments across the ranks; a block's full weights exist only while
  it runs. Memory per rank falls roughly as 1/world_size.

Checkpoints are always written in the single-process format (full state dicts
gathered to rank 0), so they load with any number of ranks, or none.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

PARALLEL_CHOICES = ("none", "ddp", "fsdp")


@dataclass(frozen=True)
class Parallel:
    """Where this process sits in the run: its rank among ``world_size`` and the scheme in use."""

    mode: str = "none"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.mode != "none"

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over all ranks (in place, and returned); a no-op for one process."""
        if self.distributed and self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def max(self, tensor: torch.Tensor) -> torch.Tensor:
        """The elementwise maximum of ``tensor`` over all ranks (in place, and returned)."""
        if self.distributed and self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def launched_world_size() -> int:
    """The WORLD_SIZE torchrun set for this process (1 when not launched by it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    """The RANK torchrun set for this process (0 when not launched by it)."""
    return int(os.environ.get("RANK", "0"))


def check_launch(mode: str) -> None:
    """Refuse the mismatches between ``--parallel`` and the launcher before anything starts."""
    if mode not in PARALLEL_CHOICES:
        raise ValueError(f"--parallel={mode!r}: expected one of {list(PARALLEL_CHOICES)}")
    world = launched_world_size()
    if mode == "none" and world > 1:
        raise ValueError(
            f"--parallel=none, but torchrun started {world} processes (WORLD_SIZE={world}); "
            "pass --parallel ddp or --parallel fsdp, or launch a single process"
        )
    if mode != "none" and "RANK" not in os.environ:
        raise ValueError(
            f"--parallel={mode} needs the torchrun launcher, which sets RANK and WORLD_SIZE; "
            f"e.g. torchrun --nproc_per_node=2 -m scratchlm.train --parallel {mode} ..."
        )


def start(mode: str, device: str) -> tuple[Parallel, torch.device]:
    """Join the process group (for ddp/fsdp) and pick this rank's device.

    ``device`` is the run's device type: with ``cuda`` each rank takes
    ``cuda:LOCAL_RANK`` and talks over NCCL; with ``cpu`` the ranks use gloo.
    """
    check_launch(mode)
    if mode == "none":
        return Parallel(), torch.device(device)
    rank, world, local_rank = (int(os.environ[name]) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    kind = torch.device(device).type
    if kind == "cuda":
        torch.cuda.set_device(local_rank)
        here = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        here = torch.device(kind)
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return Parallel(mode, rank, world, local_rank), here


def stop(parallel: Parallel) -> None:
    if parallel.distributed and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, parallel: Parallel, device: torch.device) -> nn.Module:
    """The module to train: ``model`` itself, DDP around it, or ``model`` sharded in place by FSDP2.

    FSDP2 shards block by block (each ``TransformerBlock`` is one unit that is
    gathered, run and freed), then the root for the embedding, final norm and
    head.
    """
    if parallel.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if parallel.mode == "fsdp":
        fully_shard, init_device_mesh = _fsdp2()
        mesh = init_device_mesh(device.type, (parallel.world_size,))
        for block in model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def _fsdp2():
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6 kept FSDP2 under a private name
        from torch.distributed._composable.fsdp import fully_shard
    from torch.distributed.device_mesh import init_device_mesh

    return fully_shard, init_device_mesh


def gradient_sync(module: nn.Module, parallel: Parallel, sync: bool):
    """A context for one micro-batch's backward: reduce gradients across ranks only when ``sync``.

    With gradient accumulation, only the last micro-batch needs the (costly)
    cross-rank reduction; the others just add into the local gradients.
    """
    if parallel.mode == "ddp" and not sync:
        return module.no_sync()
    if parallel.mode == "fsdp":
        module.set_requires_gradient_sync(sync)
    return nullcontext()


# ---------------------------------------------------------------- full state for checkpoints


def _state_dict_api():
    from torch.distributed.checkpoint import state_dict as api

    return api


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer, parallel: Parallel) -> tuple[dict, dict] | None:
    """The model's and optimizer's full state dicts, in single-process format, on rank 0 (None elsewhere).

    ``model`` is the unwrapped model (for FSDP, the sharded one). Every rank
    must call this: with FSDP the shards are gathered collectively.
    """
    if parallel.mode != "fsdp":
        return (model.state_dict(), optimizer.state_dict()) if parallel.is_main else None
    api = _state_dict_api()
    options = api.StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = api.get_model_state_dict(model, options=options)
    optimizer_state = api.get_optimizer_state_dict(model, optimizer, options=options)
    if not parallel.is_main:
        return None
    return model_state, _names_to_indices(optimizer_state)


def load_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, parallel: Parallel
) -> None:
    """Load a single-process optimizer state dict into this rank's optimizer (each rank passes the full dict)."""
    if parallel.mode != "fsdp":
        optimizer.load_state_dict(state)
        return
    api = _state_dict_api()
    named = _indices_to_names(state, optimizer, model)
    api.set_optimizer_state_dict(model, optimizer, named, options=api.StateDictOptions(full_state_dict=True))


# torch.optim numbers parameters 0, 1, 2, ... across its groups in order;
# torch.distributed.checkpoint names them by module path instead. The two
# conversions below map one onto the other, so a checkpoint reads the same
# whichever way it was written.


def _names_to_indices(named: dict) -> dict:
    order = [name for group in named["param_groups"] for name in group["params"]]
    index = {name: i for i, name in enumerate(order)}
    groups = [{**group, "params": [index[name] for name in group["params"]]} for group in named["param_groups"]]
    return {"state": {index[name]: value for name, value in named["state"].items()}, "param_groups": groups}


def _indices_to_names(indexed: dict, optimizer: torch.optim.Optimizer, model: nn.Module) -> dict:
    name_of = {id(param): name for name, param in model.named_parameters()}
    order = [name_of[id(param)] for group in optimizer.param_groups for param in group["params"]]
    if len(order) != sum(len(group["params"]) for group in indexed["param_groups"]):
        raise ValueError("the checkpoint's optimizer state covers a different number of parameters than this model")
    groups = [{**group, "params": [order[i] for i in group["params"]]} for group in indexed["param_groups"]]
    return {"state": {order[i]: value for i, value in indexed["state"].items()}, "param_groups": groups}
