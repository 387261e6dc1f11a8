"""The training loop: AdamW on random windows, mixed precision, data parallelism, exact resume.

``train(config)`` first checks everything that could fail (settings, kernels,
device, both data files, the checkpoint to resume from, the output folder) and
only then builds the model and takes steps, so bad input never costs a
half-finished run or a stray checkpoint.

Each run writes into ``output_dir`` (rank 0 only, when distributed):
    checkpoint_<step>.pt  the newest ``keep_checkpoints`` checkpoints, each written atomically
    metrics.jsonl         one JSON record per line (see train/metrics.py); TensorBoard
                          event files under tensorboard/ when tensorboard is installed
    train_config.json     the resolved settings of the run

One optimizer step, in ``Trainer.train_step``:
 1. Draw ``batch_size`` window starts from the sampler generator. Every rank
    draws the same starts; rank r trains on its slice, split into
    ``grad_accum_steps`` micro-batches.
 2. Per micro-batch: forward under autocast, loss / grad_accum_steps, backward.
    Gradients are reduced across ranks on the last micro-batch only.
 3. Unscale (fp16), measure the global gradient norm and clip it.
 4. If the loss or the norm is not finite, skip: no update, the step count
    and so the schedule stay where they were, and the skip is logged and
    counted; ``max_skipped_steps`` skips in a row end the run. Otherwise
    AdamW steps.

Resume is exact: a checkpoint carries the model, AdamW's moments, the loss
scaler, the step and skip counts, and the state of every RNG including the
batch sampler's, so a run stopped at step k and resumed takes the same steps,
on the same batches, as one that never stopped (bit for bit on CPU). The
checkpoint format does not depend on the number of ranks.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from scratchlm.atomic import atomic_write
from scratchlm.model import ModelConfig, TransformerLM, resolve_kernels
from scratchlm.train import distributed
from scratchlm.train.checkpoint import (
    CheckpointError,
    apply_checkpoint,
    checkpoint_path,
    checkpoint_payload,
    list_checkpoints,
    prune_checkpoints,
    read_checkpoint,
    read_newest_checkpoint,
    remove_partial_checkpoints,
    resolve_checkpoint,
    restore_rng_state,
    write_checkpoint,
)
from scratchlm.train.config import TrainConfig
from scratchlm.train.data import estimate_loss, load_token_dataset, windows_at
from scratchlm.train.loss import cross_entropy_loss
from scratchlm.train.metrics import METRICS_NAME, MetricsLog, format_step
from scratchlm.train.optim import AdamW, global_grad_norm, gradient_clipping
from scratchlm.train.precision import MixedPrecision
from scratchlm.train.schedule import learning_rate_schedule
from scratchlm.train.throughput import mfu, peak_tflops_for

CONFIG_NAME = "train_config.json"
# The name under which the batch sampler's generator is stored in checkpoints.
_SAMPLER = "train_sampler"


def model_config_of(config: TrainConfig) -> ModelConfig:
    return ModelConfig(
        vocab_size=config.vocab_size,
        context_length=config.context_length,
        d_model=config.d_model,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        d_ff=config.d_ff,
        rope_theta=float(config.rope_theta),
    )


def _resolve_kernels(config: TrainConfig) -> dict[str, str]:
    try:
        return resolve_kernels(config.kernels, config.device)
    except ValueError as e:
        raise type(e)(f"--kernels={config.kernels!r}: {e}") from e


def _check_batch_split(config: TrainConfig, world_size: int) -> None:
    parts = world_size * config.grad_accum_steps
    if config.batch_size % parts != 0:
        raise ValueError(
            f"--batch_size={config.batch_size} must be divisible by {world_size} ranks x "
            f"--grad_accum_steps={config.grad_accum_steps} = {parts}: each rank trains on equal micro-batches"
        )


def _read_resume_checkpoint(config: TrainConfig, model_config: ModelConfig) -> tuple[Path, dict]:
    try:
        if Path(config.resume).is_dir():
            path, payload = read_newest_checkpoint(config.resume)
        else:
            path = Path(config.resume)
            payload = read_checkpoint(path)
    except (FileNotFoundError, CheckpointError) as e:
        raise type(e)(f"--resume: {e}") from e
    where = repr(str(path))
    stored = payload.get("model_config")
    if stored != model_config.to_dict():
        if not isinstance(stored, dict):
            raise CheckpointError(f"--resume {where} stores no model config to check against the flags")
        differing = {
            key: (stored.get(key), value) for key, value in model_config.to_dict().items() if stored.get(key) != value
        }
        raise ValueError(
            f"--resume {where} was trained with a different model; "
            f"(checkpoint, flags) differ in {differing}"
        )
    iteration = payload["iteration"]
    if iteration > config.total_iters:
        raise ValueError(
            f"--resume {where} is at iteration {iteration}, past --total_iters={config.total_iters}; "
            "raise --total_iters to train further"
        )
    if "generators" not in (payload.get("rng") or {}) or _SAMPLER not in payload["rng"]["generators"]:
        raise CheckpointError(f"--resume {where} holds no batch-sampler state, so it cannot resume a training run")
    return path, payload


def _check_output_dir(config: TrainConfig, resume_iteration: int | None) -> tuple[Path, list[Path]]:
    """The output folder, and the checkpoints in it that this run will replace (deleted once it starts).

    A fresh run refuses a folder holding another run unless ``--overwrite``
    (then all its checkpoints go). A run resumed from step k refuses a folder
    holding checkpoints past step k, from a course it no longer follows
    (a later bare ``--resume`` would pick them up), unless ``--overwrite``
    (then those go).
    """
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output_dir={str(out)!r} exists and is not a folder")
    existing = list_checkpoints(out)
    if resume_iteration is None:
        previous = [path.name for _, path in existing[-1:]]
        previous += [METRICS_NAME] if (out / METRICS_NAME).exists() else []
        if previous and not config.overwrite:
            raise ValueError(
                f"--output_dir={str(out)!r} already holds a run ({', '.join(previous)}); "
                "pass --resume to continue it, --overwrite to replace it, or choose another --output_dir"
            )
        return out, [path for _, path in existing]
    later = [(step, path) for step, path in existing if step > resume_iteration]
    if later and not config.overwrite:
        raise ValueError(
            f"--output_dir={str(out)!r} holds checkpoints from after the resumed step {resume_iteration} "
            f"(steps {[step for step, _ in later]}); pass --overwrite to delete them, "
            "or resume into another --output_dir"
        )
    return out, [path for _, path in later]


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _adamw_for(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    # Decay matrices only: shrinking RMSNorm gains towards 0 would fight the
    # normalisation they exist to rescale.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [g for g in ({"params": decay}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    settings = dict(
        lr=config.learning_rate, betas=(config.beta1, config.beta2), eps=config.eps, weight_decay=config.weight_decay
    )
    kind = config.adamw
    if kind == "auto":
        kind = "fused" if device.type == "cuda" and config.parallel != "fsdp" else "foreach"
    if kind == "fused":
        # torch's single-kernel AdamW: the same update as ours, and the same state_dict layout.
        return torch.optim.AdamW(groups, fused=True, **settings)
    return AdamW(groups, foreach=kind == "foreach", **settings)


class Trainer:
    """The moving parts of one run on one rank: model, optimizer, precision, sampler and counters.

    ``model`` is the plain TransformerLM (sharded in place under FSDP);
    ``module`` is what the forward pass calls (DDP's wrapper, or ``model``).
    ``step`` counts applied optimizer steps; skipped steps do not advance it.
    """

    def __init__(
        self,
        config: TrainConfig,
        parallel: distributed.Parallel,
        device: torch.device,
        resume_payload: dict | None = None,
    ):
        self.config = config
        self.parallel = parallel
        self.device = device
        self.model_config = model_config_of(config)
        # The seed fixes the initial weights and the batch order, on every rank alike.
        _seed_everything(config.seed)
        self.model = TransformerLM(self.model_config, kernels=_resolve_kernels(config), device=device)
        self.model.activation_checkpointing = config.activation_checkpointing
        if resume_payload is not None:
            # Before wrapping: FSDP then shards the loaded weights.
            apply_checkpoint(resume_payload, self.model, restore_rng=False, source="--resume checkpoint")
        self.module = distributed.wrap(self.model, parallel, device)
        if config.compile:
            self.module.compile()
        self.optimizer = _adamw_for(self.model, config, device)
        self.precision = MixedPrecision(config.precision, device)
        self.sampler = torch.Generator().manual_seed(config.seed)
        self.step = 0
        self.skipped_steps = 0
        self.skipped_in_a_row = 0
        if resume_payload is not None:
            self._resume(resume_payload)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.tokens_per_step = config.batch_size * config.context_length
        self.flops_per_token = self.model.flops_per_token()
        self.peak_tflops = config.peak_tflops if config.peak_tflops is not None else peak_tflops_for(device)

    def _resume(self, payload: dict) -> None:
        try:
            distributed.load_optimizer_state(self.model, self.optimizer, payload["optimizer"], self.parallel)
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"--resume checkpoint does not fit this optimizer: {e}") from e
        state = (payload.get("extra") or {}).get("train_state") or {}
        self.precision.load_state_dict(state.get("scaler"))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.skipped_in_a_row = int(state.get("skipped_in_a_row", 0))
        self.step = int(payload["iteration"])
        # Last: building the model above drew from the global RNGs.
        restore_rng_state(payload["rng"], {_SAMPLER: self.sampler})

    # ------------------------------------------------------------ one step

    def train_step(self, data: np.ndarray) -> dict:
        """Take one optimizer step (or skip it); returns the record to log."""
        config, parallel = self.config, self.parallel
        started = time.perf_counter()
        lr = learning_rate_schedule(
            self.step, config.learning_rate, config.min_learning_rate, config.warmup_iters, config.total_iters
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr

        # Every rank draws the whole batch, so all samplers stay in step; each keeps its slice.
        starts = torch.randint(0, len(data) - config.context_length, (config.batch_size,), generator=self.sampler)
        micro_batches = starts.view(parallel.world_size, config.grad_accum_steps, -1)[parallel.rank]
        loss_sum = torch.zeros((), device=self.device)
        for index, micro_starts in enumerate(micro_batches):
            inputs, targets = windows_at(data, micro_starts, config.context_length, self.device)
            last = index == len(micro_batches) - 1
            with distributed.gradient_sync(self.module, parallel, sync=last):
                with self.precision.autocast():
                    logits = self.module(inputs, check_ids=False)  # the data was checked when loaded
                loss = cross_entropy_loss(logits, targets) / len(micro_batches)
                self.precision.backward(loss)
            loss_sum += loss.detach()
        loss_value = float(parallel.sum(loss_sum)) / parallel.world_size

        self.precision.unscale(self.optimizer)
        if config.max_grad_norm > 0:
            grad_norm = gradient_clipping(self.params, config.max_grad_norm)
        else:
            grad_norm = global_grad_norm(self.params)
        finite = math.isfinite(loss_value) and math.isfinite(grad_norm)
        if finite:
            self.precision.step(self.optimizer)
            self.step += 1
            self.skipped_in_a_row = 0
        else:
            self.precision.skip()
            self.skipped_steps += 1
            self.skipped_in_a_row += 1
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            # The update's kernels are still queued; wait so ms_per_step covers the whole step.
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - started

        if not finite:
            what = "loss" if not math.isfinite(loss_value) else "gradient norm"
            value = loss_value if what == "loss" else grad_norm
            return {"step": self.step, "skipped": f"non-finite {what} ({value})", "skipped_steps": self.skipped_steps}
        record = {
            "step": self.step,
            "loss": loss_value,
            "lr": lr,
            "grad_norm": grad_norm,
            "ms_per_step": 1000.0 * elapsed,
            "tokens_per_s": self.tokens_per_step / elapsed,
        }
        if self.peak_tflops is not None:
            record["mfu"] = mfu(self.flops_per_token, record["tokens_per_s"], self.peak_tflops, parallel.world_size)
        return record

    def evaluate(self, data: np.ndarray) -> float:
        """Validation loss over the fixed windows, shared out across ranks."""
        config, parallel = self.config, self.parallel
        with self.precision.autocast():
            local = estimate_loss(
                self.module,
                data,
                context_length=config.context_length,
                batch_size=config.batch_size,
                num_batches=config.eval_batches,
                device=self.device,
                shard=(parallel.rank, parallel.world_size),
            )
        # Every rank scored as many windows, so the mean of the ranks' means is the overall mean.
        return float(parallel.sum(torch.tensor(local, device=self.device))) / parallel.world_size

    # ------------------------------------------------------------ checkpoints

    def save(self, path: Path) -> None:
        """Gather the full state (collectively) and write it from rank 0, then keep the newest K."""
        state = distributed.full_state(self.model, self.optimizer, self.parallel)
        if state is not None:
            model_state, optimizer_state = state
            train_state = {
                "skipped_steps": self.skipped_steps,
                "skipped_in_a_row": self.skipped_in_a_row,
                "scaler": self.precision.state_dict(),
            }
            payload = checkpoint_payload(
                model_state,
                optimizer_state,
                self.step,
                model_config=self.model_config.to_dict(),
                generators={_SAMPLER: self.sampler},
                extra={"train_config": self.config.to_dict(), "train_state": train_state},
            )
            write_checkpoint(payload, path)
            prune_checkpoints(path.parent, self.config.keep_checkpoints)
        self.parallel.barrier()


def train(config: TrainConfig, *, progress: bool = True) -> dict:
    """Train (or resume) a TransformerLM as ``config`` says; returns a summary.

    Summary keys: ``initial_val_loss`` (measured before this invocation's first
    step), ``final_val_loss``, ``iterations`` (steps done in total),
    ``start_iteration``, ``train_losses`` (this invocation's steps),
    ``skipped_steps`` (non-finite steps skipped, in the whole run),
    ``checkpoint`` (the newest), ``metrics``, ``output_dir``, ``device``,
    ``backends``, ``precision``, ``world_size``, ``num_parameters``,
    ``tokens_per_s`` (mean over this invocation's steps).
    """
    # ---- 1. Everything that can be checked, before anything is built or written.
    config = config.resolved()
    distributed.check_launch(config.parallel)
    _check_batch_split(config, distributed.launched_world_size() if config.parallel != "none" else 1)
    model_config = model_config_of(config)
    backends = _resolve_kernels(config)
    train_data = load_token_dataset(
        config.train_data_path, config.vocab_size, config.context_length, argument="--train_data_path"
    )
    val_data = load_token_dataset(
        config.val_data_path, config.vocab_size, config.context_length, argument="--val_data_path"
    )
    resume_payload = _read_resume_checkpoint(config, model_config)[1] if config.resume is not None else None
    out_dir, replaced = _check_output_dir(config, None if resume_payload is None else resume_payload["iteration"])

    # ---- 2. Join the other ranks and build.
    parallel, device = distributed.start(config.parallel, config.device)
    try:
        trainer = Trainer(config, parallel, device, resume_payload)
        del resume_payload  # the optimizer state is loaded; let the CPU copy go
        if parallel.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            remove_partial_checkpoints(out_dir)
            for old in replaced:
                old.unlink()
            with atomic_write(out_dir / CONFIG_NAME, "w", encoding="utf-8") as f:
                f.write(json.dumps(config.to_dict(), indent=2) + "\n")
        parallel.barrier()
        summary = _train_loop(trainer, train_data, val_data, out_dir, progress=progress and parallel.is_main)
    finally:
        distributed.stop(parallel)
    summary.update(backends=backends, world_size=parallel.world_size, device=str(device))
    return summary


def _train_loop(trainer: Trainer, train_data, val_data, out_dir: Path, *, progress: bool) -> dict:
    config, parallel = trainer.config, trainer.parallel
    start = trainer.step
    train_losses: list[float] = []
    step_seconds: list[float] = []
    metrics = MetricsLog(out_dir, start if config.resume is not None else None) if parallel.is_main else None

    def log(record: dict) -> None:
        if metrics is not None:
            metrics.write(record)

    def say(text: str) -> None:
        if progress:
            tqdm.write(text)

    with metrics if metrics is not None else nullcontext():
        initial_val_loss = val_loss = trainer.evaluate(val_data)
        log({"step": start, "val_loss": initial_val_loss})
        say(f"step {start}: val loss {initial_val_loss:.4f}")
        if progress and trainer.peak_tflops is None and trainer.device.type == "cuda":
            say("MFU is not logged: this GPU's peak rate is unknown; pass --peak_tflops")
        bar = tqdm(total=config.total_iters, initial=start, disable=not progress, unit="step", dynamic_ncols=True)
        trainer.model.train()
        while trainer.step < config.total_iters:
            record = trainer.train_step(train_data)
            log(record)
            if "skipped" in record:
                say(f"step {record['step'] + 1} skipped: {record['skipped']}")
                if trainer.skipped_in_a_row >= config.max_skipped_steps:
                    raise FloatingPointError(
                        f"{trainer.skipped_in_a_row} steps in a row had a non-finite loss or gradient "
                        f"(the last: {record['skipped']}, after step {trainer.step}); stopping. The newest "
                        f"checkpoint in {str(out_dir)!r} is from before them. Try a lower --learning_rate, a "
                        "smaller --max_grad_norm, or --precision bf16"
                    )
                continue
            step = trainer.step
            train_losses.append(record["loss"])
            step_seconds.append(record["ms_per_step"] / 1000.0)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
            if step % config.log_interval == 0:
                say(format_step(record, config.total_iters))
            if step % config.eval_interval == 0 or step == config.total_iters:
                val_loss = trainer.evaluate(val_data)
                log({"step": step, "val_loss": val_loss})
                say(f"step {step}: val loss {val_loss:.4f}")
            if step % config.checkpoint_interval == 0 or step == config.total_iters:
                trainer.save(checkpoint_path(out_dir, step))
        bar.close()
        if not checkpoint_path(out_dir, trainer.step).exists():
            # Resumed at the end: there is nothing to train, but the run still has its final checkpoint.
            trainer.save(checkpoint_path(out_dir, trainer.step))

    return {
        "initial_val_loss": initial_val_loss,
        "final_val_loss": val_loss,
        "iterations": trainer.step,
        "start_iteration": start,
        "train_losses": train_losses,
        "skipped_steps": trainer.skipped_steps,
        "checkpoint": str(checkpoint_path(out_dir, trainer.step)),
        "metrics": str(out_dir / METRICS_NAME),
        "output_dir": str(out_dir),
        "precision": trainer.precision.name,
        "num_parameters": sum(p.numel() for p in trainer.model.parameters()),
        "tokens_per_s": trainer.tokens_per_step * len(step_seconds) / sum(step_seconds) if step_seconds else None,
    }


def load_model(
    checkpoint_path: str | os.PathLike, device: str | torch.device | None = None, kernels="auto"
) -> TransformerLM:
    """Rebuild the TransformerLM a checkpoint was trained as, with its weights, in eval mode.

    ``checkpoint_path`` is a checkpoint file or a run folder (its newest
    checkpoint). The shape comes from the model config stored in the
    checkpoint, so no flags are needed. ``device`` defaults to CUDA when available.
    """
    checkpoint_path = resolve_checkpoint(checkpoint_path)
    payload = read_checkpoint(checkpoint_path)
    stored = payload.get("model_config")
    if not isinstance(stored, dict):
        raise CheckpointError(f"checkpoint {str(checkpoint_path)!r} stores no model config to rebuild the model from")
    try:
        model_config = ModelConfig.from_dict(stored)
    except ValueError as e:
        raise CheckpointError(f"checkpoint {str(checkpoint_path)!r} has an unusable model config: {e}") from e
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    model = TransformerLM(model_config, kernels=kernels, device=device)
    apply_checkpoint(payload, model, restore_rng=False, source=repr(str(checkpoint_path)))
    return model.eval()
