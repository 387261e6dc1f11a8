"""The training loop: AdamW on random windows, periodic validation, checkpoints, resume.

``train(config)`` first checks everything that could fail (settings, kernels,
device, both data files, the checkpoint to resume from, the output folder) and
only then builds the model and takes steps, so bad input never costs a
half-finished run or a stray checkpoint.

Each run writes into ``output_dir``:
    checkpoint.pt       the latest checkpoint (atomically replaced; see train/checkpoint.py)
    metrics.jsonl       one JSON object per line: a training step
                        {"step", "loss", "lr", "grad_norm", "ms_per_step", "tokens_per_s"[, "mfu"]}
                        or an evaluation {"step", "val_loss"}
    train_config.json   the resolved settings of the run

Resume is exact: the checkpoint carries the model, AdamW's moments, the step
count, and the state of every RNG including the batch sampler's, so a run
stopped at step k and resumed takes the same steps, on the same batches, as one
that never stopped (bit for bit on CPU).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from scratchlm.atomic import atomic_write
from scratchlm.model import ModelConfig, TransformerLM, resolve_kernels
from scratchlm.train.checkpoint import CheckpointError, apply_checkpoint, read_checkpoint, save_checkpoint
from scratchlm.train.config import TrainConfig
from scratchlm.train.data import estimate_loss, get_batch, load_token_dataset
from scratchlm.train.loss import cross_entropy_loss
from scratchlm.train.optim import AdamW, global_grad_norm, gradient_clipping
from scratchlm.train.schedule import learning_rate_schedule

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
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


def _read_resume_checkpoint(config: TrainConfig, model_config: ModelConfig) -> dict:
    try:
        payload = read_checkpoint(config.resume)
    except (FileNotFoundError, CheckpointError) as e:
        raise type(e)(f"--resume: {e}") from e
    where = repr(str(config.resume))
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
    return payload


def _check_output_dir(config: TrainConfig) -> Path:
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output_dir={str(out)!r} exists and is not a folder")
    previous = [name for name in (CHECKPOINT_NAME, METRICS_NAME) if (out / name).exists()]
    if previous and config.resume is None and not config.overwrite:
        raise ValueError(
            f"--output_dir={str(out)!r} already holds a run ({', '.join(previous)}); "
            "pass --resume to continue it, --overwrite to replace it, or choose another --output_dir"
        )
    return out


def _write_text_atomically(path: Path, text: str) -> None:
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)


def _open_metrics(path: Path, resume_iteration: int | None):
    """Open metrics.jsonl for appending; on resume, first drop lines the resumed run will log again.

    A run that crashed between checkpoints logged steps that the resumed run
    takes again, and the resumed run re-measures validation loss at its first
    step; keeping both would give the history two step 57s.
    """
    if resume_iteration is None:
        path.write_text("", encoding="utf-8")
    elif path.exists():
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by the crash
            step = record.get("step", 0)
            if step < resume_iteration or (step == resume_iteration and "val_loss" not in record):
                kept.append(line + "\n")
        _write_text_atomically(path, "".join(kept))
    # Line buffering: every record reaches the file as soon as it is written.
    return open(path, "a", encoding="utf-8", buffering=1)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _adamw_for(model: torch.nn.Module, config: TrainConfig) -> AdamW:
    # Decay matrices only: shrinking RMSNorm gains towards 0 would fight the
    # normalisation they exist to rescale.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    return AdamW(
        [g for g in groups if g["params"]],
        lr=config.learning_rate,
        betas=(config.beta1, config.beta2),
        eps=config.eps,
        weight_decay=config.weight_decay,
    )


def train(config: TrainConfig, *, progress: bool = True) -> dict:
    """Train (or resume) a TransformerLM as ``config`` says; returns a summary.

    Summary keys: ``initial_val_loss`` (measured before this invocation's first
    step), ``final_val_loss``, ``iterations`` (steps done in total),
    ``start_iteration``, ``train_losses`` (this invocation's steps),
    ``checkpoint``, ``metrics``, ``output_dir``, ``device``, ``backends``,
    ``num_parameters``, ``tokens_per_s`` (mean over this invocation's steps).
    """
    # ---- 1. Everything that can be checked, before anything is built or written.
    config = config.resolved()
    model_config = model_config_of(config)
    backends = _resolve_kernels(config)
    train_data = load_token_dataset(
        config.train_data_path, config.vocab_size, config.context_length, argument="--train_data_path"
    )
    val_data = load_token_dataset(
        config.val_data_path, config.vocab_size, config.context_length, argument="--val_data_path"
    )
    resume_payload = _read_resume_checkpoint(config, model_config) if config.resume is not None else None
    out_dir = _check_output_dir(config)

    # ---- 2. Build: the seed fixes the initial weights and the batch order.
    device = torch.device(config.device)
    _seed_everything(config.seed)
    model = TransformerLM(model_config, kernels=backends, device=device)
    optimizer = _adamw_for(model, config)
    sampler = torch.Generator().manual_seed(config.seed)
    start = 0
    if resume_payload is not None:
        apply_checkpoint(
            resume_payload, model, optimizer, generators={_SAMPLER: sampler}, source=repr(str(config.resume))
        )
        start = int(resume_payload["iteration"])

    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = out_dir / CHECKPOINT_NAME
    _write_text_atomically(out_dir / CONFIG_NAME, json.dumps(config.to_dict(), indent=2) + "\n")
    flops_per_token = model.flops_per_token() if hasattr(model, "flops_per_token") else None
    tokens_per_step = config.batch_size * config.context_length

    def evaluate() -> float:
        return estimate_loss(
            model,
            val_data,
            context_length=config.context_length,
            batch_size=config.batch_size,
            num_batches=config.eval_batches,
            device=device,
        )

    def save(iteration: int) -> None:
        save_checkpoint(
            model,
            optimizer,
            iteration,
            checkpoint_path,
            model_config=model_config.to_dict(),
            generators={_SAMPLER: sampler},
            extra={"train_config": config.to_dict()},
        )

    # ---- 3. Train.
    params = [p for p in model.parameters() if p.requires_grad]
    train_losses: list[float] = []
    step_seconds: list[float] = []
    with _open_metrics(out_dir / METRICS_NAME, start if resume_payload is not None else None) as metrics:

        def log(record: dict) -> None:
            metrics.write(json.dumps(record) + "\n")

        initial_val_loss = val_loss = evaluate()
        log({"step": start, "val_loss": initial_val_loss})
        bar = tqdm(total=config.total_iters, initial=start, disable=not progress, unit="step", dynamic_ncols=True)
        if progress:
            tqdm.write(f"step {start}: val loss {initial_val_loss:.4f}")
        model.train()
        for iteration in range(start, config.total_iters):
            started = time.perf_counter()
            lr = learning_rate_schedule(
                iteration, config.learning_rate, config.min_learning_rate, config.warmup_iters, config.total_iters
            )
            for group in optimizer.param_groups:
                group["lr"] = lr
            inputs, targets = get_batch(
                train_data, config.batch_size, config.context_length, device, generator=sampler
            )
            loss = cross_entropy_loss(model(inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            loss_value = float(loss.detach())  # waits for the device, so the timing below is real
            if not math.isfinite(loss_value):
                raise FloatingPointError(
                    f"training loss became {loss_value} at step {iteration + 1}; the last checkpoint in "
                    f"{str(out_dir)!r} is from before it. Try a lower --learning_rate or --max_grad_norm"
                )
            if config.max_grad_norm > 0:
                grad_norm = gradient_clipping(params, config.max_grad_norm)
            else:
                grad_norm = global_grad_norm(params)
            optimizer.step()
            if device.type == "cuda":
                # The update's kernels are still queued; wait so ms_per_step covers the whole step.
                torch.cuda.synchronize(device)
            step = iteration + 1
            elapsed = time.perf_counter() - started

            record = {
                "step": step,
                "loss": loss_value,
                "lr": lr,
                "grad_norm": grad_norm,
                "ms_per_step": 1000.0 * elapsed,
                "tokens_per_s": tokens_per_step / elapsed,
            }
            if config.peak_tflops is not None and flops_per_token is not None:
                record["mfu"] = flops_per_token * record["tokens_per_s"] / (config.peak_tflops * 1e12)
            log(record)
            train_losses.append(loss_value)
            step_seconds.append(elapsed)
            bar.update(1)
            bar.set_postfix(
                loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}", refresh=False
            )

            if step % config.eval_interval == 0 or step == config.total_iters:
                val_loss = evaluate()
                log({"step": step, "val_loss": val_loss})
                if progress:
                    tqdm.write(f"step {step}: val loss {val_loss:.4f}")
            if step % config.checkpoint_interval == 0 or step == config.total_iters:
                save(step)
        bar.close()
    if start == config.total_iters and not checkpoint_path.exists():
        save(start)

    return {
        "initial_val_loss": initial_val_loss,
        "final_val_loss": val_loss,
        "iterations": config.total_iters,
        "start_iteration": start,
        "train_losses": train_losses,
        "checkpoint": str(checkpoint_path),
        "metrics": str(out_dir / METRICS_NAME),
        "output_dir": str(out_dir),
        "device": str(device),
        "backends": backends,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "tokens_per_s": tokens_per_step * len(step_seconds) / sum(step_seconds) if step_seconds else None,
    }


def load_model(
    checkpoint_path: str | os.PathLike, device: str | torch.device | None = None, kernels="auto"
) -> TransformerLM:
    """Rebuild the TransformerLM a checkpoint was trained as, with its weights, in eval mode.

    The shape comes from the model config stored in the checkpoint, so no flags
    are needed. ``device`` defaults to CUDA when available.
    """
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
