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

One optimizer step is ``Trainer.train_step`` (train/trainer.py). A step whose
loss or gradient is not finite is skipped, logged and counted;
``max_skipped_steps`` skips in a row end the run.

Resume is exact: a checkpoint carries the model, AdamW's moments, the loss
scaler, the step and skip counts, and the state of every RNG including the
batch sampler's, so a run stopped at step k and resumed takes the same steps,
on the same batches, as one that never stopped. On the CPU that holds bit
for bit at any thread count: the run turns on torch's deterministic
algorithms there (the embedding's backward otherwise adds rows with racing
atomics, so two runs drift apart by an ulp now and then). The checkpoint
format does not depend on the number of ranks.

While it runs, ``train`` owns its output folder and its stopping:
- rank 0 holds an exclusive lock on ``output_dir`` (scratchlm/folder_lock.py),
  so a second run aimed at the folder is refused before it touches anything;
- SIGTERM, SIGINT and SIGHUP end the run at the next step boundary, on
  every rank alike, with a checkpoint, raising ``TrainingStopped``
  (train/stopping.py).
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from tqdm.auto import tqdm

from scratchlm.atomic import atomic_write
from scratchlm.folder_lock import RUN_LOCK_NAME, FolderLock
from scratchlm.model import ModelConfig, TransformerLM
from scratchlm.model.pretrained import load_pretrained, read_pretrained_config
from scratchlm.train import distributed
from scratchlm.train.checkpoint import (
    CheckpointError,
    checkpoint_path,
    list_checkpoints,
    read_file_or_newest,
    remove_partial_checkpoints,
)
from scratchlm.train.config import TrainConfig
from scratchlm.train.data import load_token_dataset
from scratchlm.train.metrics import METRICS_NAME, MetricsLog, format_step
from scratchlm.train.stopping import StopRequests, TrainingStopped
from scratchlm.train.trainer import SAMPLER, Trainer, adopt_pretrained_shape, model_config_of, resolve_train_kernels

CONFIG_NAME = "train_config.json"


def _check_batch_split(config: TrainConfig, world_size: int) -> None:
    parts = world_size * config.grad_accum_steps
    if config.batch_size % parts != 0:
        raise ValueError(
            f"--batch_size={config.batch_size} must be divisible by {world_size} ranks x "
            f"--grad_accum_steps={config.grad_accum_steps} = {parts}: each rank trains on equal micro-batches"
        )


def _read_resume_checkpoint(config: TrainConfig) -> tuple[Path, dict, ModelConfig]:
    """The checkpoint --resume names, its contents and the model config it stores."""
    try:
        path, payload = read_file_or_newest(config.resume)
    except (FileNotFoundError, CheckpointError) as e:
        raise type(e)(f"--resume: {e}") from e
    where = repr(str(path))
    stored = payload.get("model_config")
    if not isinstance(stored, dict):
        raise CheckpointError(f"--resume {where} stores no model config to check against the flags")
    try:
        return path, payload, ModelConfig.from_dict(stored)
    except ValueError as e:
        raise CheckpointError(f"--resume {where} has an unusable model config: {e}") from e


def _check_resume_fits(
    config: TrainConfig, model_config: ModelConfig, path: Path, payload: dict, stored_config: ModelConfig
) -> None:
    """Refuse a --resume checkpoint of another model, past --total_iters, or without a sampler state."""
    where = repr(str(path))
    if stored_config != model_config:
        differing = {
            key: (getattr(stored_config, key), getattr(model_config, key))
            for key in ModelConfig.__dataclass_fields__
            if getattr(stored_config, key) != getattr(model_config, key)
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
    if "generators" not in (payload.get("rng") or {}) or SAMPLER not in payload["rng"]["generators"]:
        raise CheckpointError(f"--resume {where} holds no batch-sampler state, so it cannot resume a training run")


def _read_pretrained_config(path: str) -> ModelConfig:
    """The shape of --init_from's model, read from its headers (no weights yet)."""
    try:
        return read_pretrained_config(path)
    except (ValueError, FileNotFoundError) as e:
        raise type(e)(f"--init_from: {e}") from e


def _output_folder(config: TrainConfig) -> Path:
    """``--output_dir`` as a path, refused if something other than a folder is there."""
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output_dir={str(out)!r} exists and is not a folder")
    return out


def _check_output_dir(config: TrainConfig, out: Path, resume_iteration: int | None) -> list[Path]:
    """The checkpoints in the output folder that this run will replace (deleted once it starts).

    A fresh run refuses a folder holding another run unless ``--overwrite``
    (then all its checkpoints go). A run resumed from step k refuses a folder
    holding checkpoints past step k, from a course it no longer follows
    (a later bare ``--resume`` would pick them up), unless ``--overwrite``
    (then those go). Called with the folder's lock held, so the run judged
    here cannot be a live one.
    """
    existing = list_checkpoints(out)
    if resume_iteration is None:
        previous = [path.name for _, path in existing[-1:]]
        previous += [METRICS_NAME] if (out / METRICS_NAME).exists() else []
        if previous and not config.overwrite:
            raise ValueError(
                f"--output_dir={str(out)!r} already holds a run ({', '.join(previous)}); "
                "pass --resume to continue it, --overwrite to replace it, or choose another --output_dir"
            )
        return [path for _, path in existing]
    later = [(step, path) for step, path in existing if step > resume_iteration]
    if later and not config.overwrite:
        raise ValueError(
            f"--output_dir={str(out)!r} holds checkpoints from after the resumed step {resume_iteration} "
            f"(steps {[step for step, _ in later]}); pass --overwrite to delete them, "
            "or resume into another --output_dir"
        )
    return [path for _, path in later]


def _run_lock(config: TrainConfig, out: Path):
    """The output folder's lock, taken by rank 0 alone (the only rank that writes there); else a no-op.

    Other ranks may sit on machines that do not even share the folder; a
    refused rank 0 exits, and torchrun then stops the others.
    """
    if config.parallel != "none" and distributed.launched_rank() != 0:
        return nullcontext()
    return FolderLock(
        out / RUN_LOCK_NAME, f"--output_dir={str(out)!r}", "scratchlm train", elsewhere="another --output_dir"
    )


@contextmanager
def deterministic_on_cpu(device: str) -> Iterator[None]:
    """Turn torch's deterministic algorithms on for a CPU run, restoring the previous setting afterwards.

    On the CPU the default indexing backward (the token embedding's) adds
    rows with atomics from several threads, so the order of the additions,
    and the last bit of the sums, change from run to run. The deterministic
    kernel sorts the indices first; on two threads it was no slower for a
    whole step. warn_only: an op without a deterministic CPU kernel warns
    instead of stopping the run. CUDA runs are left as they are (there the
    setting also needs CUBLAS_WORKSPACE_CONFIG, and costs speed).
    """
    if torch.device(device).type != "cpu":
        yield
        return
    was_on = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_on, warn_only=was_warn_only)


def resume_command(out_dir: Path, parallel: distributed.Parallel) -> str:
    """The command line that continues the run in ``out_dir`` from its newest checkpoint."""
    settings = shlex.quote(str(out_dir / CONFIG_NAME))
    if parallel.distributed:
        return f"torchrun <the same launch flags> -m scratchlm.train --config {settings} --resume"
    return f"scratchlm train --config {settings} --resume"


def train(config: TrainConfig, *, progress: bool = True) -> dict:
    """Train (or resume) a TransformerLM as ``config`` says; returns a summary.

    Summary keys: ``initial_val_loss`` (measured before this invocation's first
    step), ``final_val_loss``, ``iterations`` (steps done in total),
    ``start_iteration``, ``train_losses`` (this invocation's steps),
    ``skipped_steps`` (non-finite steps skipped, in the whole run),
    ``checkpoint`` (the newest), ``metrics``, ``output_dir``, ``device``,
    ``backends``, ``precision``, ``world_size``, ``num_parameters``,
    ``tokens_per_s`` (mean over this invocation's steps).

    Raises ``FolderInUseError`` (a ValueError) while another run holds
    ``output_dir``, and ``TrainingStopped`` after SIGTERM, SIGINT or SIGHUP
    (when called from the main thread), once the checkpoint is written.
    """
    with StopRequests() as stop:
        return _train(config, stop, progress=progress)


def _train(config: TrainConfig, stop: StopRequests, *, progress: bool) -> dict:
    # ---- 1. Everything that can be checked, before anything is built or written.
    config = config.resolved()
    resumed = _read_resume_checkpoint(config) if config.resume is not None else None
    pretrained = None
    if config.init_from is not None:
        # A resumed fine-tuning run has its model in the checkpoint: --init_from need not exist any more.
        pretrained = resumed[2] if resumed is not None else _read_pretrained_config(config.init_from)
        config = adopt_pretrained_shape(config, pretrained)
    distributed.check_launch(config.parallel)
    _check_batch_split(config, distributed.launched_world_size() if config.parallel != "none" else 1)
    model_config = model_config_of(config, pretrained)
    backends = resolve_train_kernels(config)
    train_data = load_token_dataset(
        config.train_data_path, config.vocab_size, config.context_length, argument="--train_data_path"
    )
    val_data = load_token_dataset(
        config.val_data_path, config.vocab_size, config.context_length, argument="--val_data_path"
    )
    resume_payload = None
    if resumed is not None:
        path, resume_payload, stored_config = resumed
        _check_resume_fits(config, model_config, path, resume_payload, stored_config)
        del resumed
    out_dir = _output_folder(config)

    # ---- 2. Own the output folder (creating it), then judge what it holds.
    with _run_lock(config, out_dir), deterministic_on_cpu(config.device):
        replaced = _check_output_dir(config, out_dir, None if resume_payload is None else resume_payload["iteration"])

        # ---- 3. Join the other ranks, build, train.
        parallel, device = distributed.start(config.parallel, config.device)
        try:
            trainer = Trainer(config, parallel, device, resume_payload, model_config)
            del resume_payload  # the optimizer state is loaded; let the CPU copy go
            if parallel.is_main:
                remove_partial_checkpoints(out_dir)
                for old in replaced:
                    old.unlink()
                with atomic_write(out_dir / CONFIG_NAME, "w", encoding="utf-8") as f:
                    # The trainer's config: it knows settings found only on building (the default --eos_token_id).
                    f.write(json.dumps(trainer.config.to_dict(), indent=2) + "\n")
            parallel.barrier()
            summary = _train_loop(trainer, train_data, val_data, out_dir, stop, progress=progress and parallel.is_main)
        finally:
            distributed.stop(parallel)
    summary.update(backends=backends, world_size=parallel.world_size, device=str(device))
    return summary


def _train_loop(trainer: Trainer, train_data, val_data, out_dir: Path, stop: StopRequests, *, progress: bool) -> dict:
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

    def save() -> None:
        trainer.save(checkpoint_path(out_dir, trainer.step))

    with metrics if metrics is not None else nullcontext():
        initial_val_loss = val_loss = trainer.evaluate(val_data)
        log({"step": start, "val_loss": initial_val_loss})
        say(f"step {start}: val loss {initial_val_loss:.4f}")
        if progress and trainer.peak_tflops is None and trainer.device.type == "cuda":
            say("MFU is not logged: this GPU's peak rate is unknown; pass --peak_tflops")
        bar = tqdm(total=config.total_iters, initial=start, disable=not progress, unit="step", dynamic_ncols=True)
        trainer.model.train()
        try:
            while trainer.step < config.total_iters:
                record = trainer.train_step(train_data, stop_requested=lambda: stop.requested)
                log(record)
                if "skipped" in record:
                    say(f"step {record['step'] + 1} skipped: {record['skipped']}")
                    _stop_after_repeated_skips(trainer, record, out_dir)
                else:
                    train_losses.append(record["loss"])
                    step_seconds.append(record["ms_per_step"] / 1000.0)
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
                    if trainer.step % config.log_interval == 0:
                        say(format_step(record, config.total_iters))
                if trainer.stop_agreed and trainer.step < config.total_iters:
                    break  # asked to stop: save at once, skipping this step's evaluation
                if "skipped" in record:
                    continue
                step = trainer.step
                if step % config.eval_interval == 0 or step == config.total_iters:
                    val_loss = trainer.evaluate(val_data)
                    log({"step": step, "val_loss": val_loss})
                    say(f"step {step}: val loss {val_loss:.4f}")
                if step % config.checkpoint_interval == 0 or step == config.total_iters:
                    save()
        finally:
            bar.close()
        if trainer.stop_agreed and trainer.step < config.total_iters:
            # Every rank agreed on this in train_step, so all of them join the (collective) save.
            save()
            raise _stopped(trainer, stop, out_dir)
        if not checkpoint_path(out_dir, trainer.step).exists():
            # Resumed at the end: there is nothing to train, but the run still has its final checkpoint.
            save()

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


def _stop_after_repeated_skips(trainer: Trainer, record: dict, out_dir: Path) -> None:
    """Raise FloatingPointError once --max_skipped_steps steps in a row were skipped."""
    if trainer.skipped_in_a_row >= trainer.config.max_skipped_steps:
        raise FloatingPointError(
            f"{trainer.skipped_in_a_row} steps in a row had a non-finite loss or gradient "
            f"(the last: {record['skipped']}, after step {trainer.step}); stopping. The newest "
            f"checkpoint in {str(out_dir)!r} is from before them. Try a lower --learning_rate, a "
            "smaller --max_grad_norm, or --precision bf16"
        )


def _stopped(trainer: Trainer, stop: StopRequests, out_dir: Path) -> TrainingStopped:
    """The exception that ends a run stopped by a signal, once every rank has saved.

    Ranks that were not signalled themselves learn which signal stopped the
    run here (the highest number, should ranks have had different ones), so
    every process exits with the same code.
    """
    signal_number = torch.tensor(stop.received or 0, device=trainer.device)
    signal_number = int(trainer.parallel.max(signal_number))
    return TrainingStopped(
        signal_number,
        trainer.step,
        str(checkpoint_path(out_dir, trainer.step)),
        resume_command(out_dir, trainer.parallel),
    )


def load_model(
    checkpoint_path: str | os.PathLike, device: str | torch.device | None = None, kernels="auto"
) -> TransformerLM:
    """Rebuild the TransformerLM a checkpoint was trained as, with its weights, in eval mode.

    ``checkpoint_path`` is a checkpoint file or a run folder (its newest
    checkpoint). The shape comes from the model config stored in the
    checkpoint, so no flags are needed. ``device`` defaults to CUDA when
    available. ``scratchlm.model.load_pretrained`` does the work (and also
    reads Hugging Face folders and GGUF files, and returns the tokenizer).
    """
    return load_pretrained(checkpoint_path, kernels=kernels, device=device)[0]
