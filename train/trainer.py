"""One rank's training step: the model, AdamW, mixed precision, the batch sampler and the skip counters.

``Trainer.train_step`` takes one optimizer step:
 1. Draw ``batch_size`` window starts from the sampler generator. Every rank
    draws the same starts; rank r trains on its slice, split into
    ``grad_accum_steps`` micro-batches.
 2. Per micro-batch: forward to the loss under autocast (the model's "loss"
    backend, so the torch/triton ones never form the logits), loss /
    grad_accum_steps, backward. With ``document_mask`` the inputs' document
    ids (counting ``eos_token_id`` tokens) go along, so attention stays
    inside each document of a window.
    Gradients are reduced across ranks on the last micro-batch only.
    The all-reduce of the loss also carries each rank's stop request
    (train/stopping.py), so all ranks agree on ``stop_agreed``.
 3. Unscale (fp16), measure the global gradient norm and clip it.
 4. If the loss or the norm is not finite, skip: no update, the step count
    and so the schedule stay where they were, and the skip is counted.
    Otherwise AdamW steps.

The loop around it (evaluation, logging, checkpoint files) is in loop.py.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from scratchlm.model import ModelConfig, TransformerLM, document_ids_from_eos, load_pretrained, resolve_kernels
from scratchlm.model.pretrained import CHECKPOINT_TOKENIZER_KEY as TOKENIZER_KEY
from scratchlm.train import distributed
from scratchlm.train.checkpoint import (
    CheckpointError,
    apply_checkpoint,
    checkpoint_payload,
    prune_checkpoints,
    restore_rng_state,
    write_checkpoint,
)
from scratchlm.train.config import MISSING_EOS_TOKEN_ID, TrainConfig, check_eos_token_id
from scratchlm.train.data import estimate_loss, windows_at
from scratchlm.train.optim import AdamW, global_grad_norm, gradient_clipping
from scratchlm.train.precision import MixedPrecision
from scratchlm.train.schedule import learning_rate_schedule
from scratchlm.train.throughput import mfu, peak_tflops_for

# The name under which the batch sampler's generator is stored in checkpoints.
SAMPLER = "train_sampler"


def model_config_of(config: TrainConfig, pretrained: ModelConfig | None = None) -> ModelConfig:
    """The model a run trains: ``pretrained``'s (with --init_from), else the one the flags describe."""
    if pretrained is not None:
        return pretrained
    return ModelConfig(
        vocab_size=config.vocab_size,
        context_length=config.context_length,
        d_model=config.d_model,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        d_ff=config.d_ff,
        rope_theta=float(config.rope_theta),
        num_kv_heads=config.num_kv_heads,
        tie_embeddings=config.tie_embeddings,
    )


def adopt_pretrained_shape(config: TrainConfig, pretrained: ModelConfig) -> TrainConfig:
    """``config`` with the model flags filled from --init_from's model; flags given must agree with it.

    --context_length is the training window: it defaults to the model's
    context length and may be shorter (the model keeps its own, so an export
    still describes the original model).
    """
    values = config.to_dict()
    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "d_ff", "rope_theta", "num_kv_heads"):
        given, stored = values[name], getattr(pretrained, name)
        if given is not None and given != stored:
            raise ValueError(
                f"--{name}={given!r} but --init_from {config.init_from!r} holds a model with {name}={stored!r}; "
                f"leave --{name} out (the checkpoint decides the model's shape)"
            )
        values[name] = stored
    if config.tie_embeddings and not pretrained.tie_embeddings:
        raise ValueError(f"--tie_embeddings, but --init_from {config.init_from!r} holds a model with untied embeddings")
    values["tie_embeddings"] = pretrained.tie_embeddings
    window = values["context_length"]
    if window is None:
        values["context_length"] = pretrained.context_length
    elif window > pretrained.context_length:
        raise ValueError(
            f"--context_length={window} is longer than --init_from {config.init_from!r}'s context length "
            f"{pretrained.context_length}; expected at most that"
        )
    return TrainConfig(**values)


def resolve_train_kernels(config: TrainConfig) -> dict[str, str]:
    try:
        return resolve_kernels(config.kernels, config.device)
    except ValueError as e:
        raise type(e)(f"--kernels={config.kernels!r}: {e}") from e


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


def _tokenizer_of(document: dict):
    """The Tokenizer a checkpoint carries as plain data (to look its end-of-text id up)."""
    from scratchlm.tokenizer import Tokenizer

    try:
        return Tokenizer.from_document(document, source=f"--resume checkpoint extra[{TOKENIZER_KEY!r}]")
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"--resume checkpoint holds a tokenizer that does not load: {e}") from e


def _load_pretrained(path: str, kernels: dict[str, str], device: torch.device):
    """--init_from's model in float32 (the master weights; autocast makes the 16-bit copies) and tokenizer."""
    try:
        model, tokenizer = load_pretrained(path, kernels=kernels, device=device, dtype=torch.float32)
    except (ValueError, FileNotFoundError) as e:
        raise type(e)(f"--init_from: {e}") from e
    return model.train(), tokenizer


# Looked up in a run's tokenizer when --document_mask is on and --eos_token_id is not given.
END_OF_TEXT = "<|endoftext|>"


def resolve_eos_token_id(config: TrainConfig, tokenizer, vocab_size: int) -> TrainConfig:
    """``config`` with --eos_token_id filled in where --document_mask needs it, and checked.

    The default is ``tokenizer``'s id of <|endoftext|> (what ``scratchlm
    tokenizer train`` and the demo put between documents), else its eos
    token (Llama 3's <|end_of_text|>); without a tokenizer, or one with
    neither, the flag is required.
    """
    eos = config.eos_token_id
    if eos is None and config.document_mask:
        if tokenizer is not None:
            eos = tokenizer.special_token_ids.get(END_OF_TEXT, tokenizer.eos_id)
        if eos is None:
            where = "" if tokenizer is None else f"; the run's tokenizer has neither {END_OF_TEXT} nor an eos token"
            raise ValueError(MISSING_EOS_TOKEN_ID + where)
    if eos is not None:
        check_eos_token_id(eos, vocab_size)
    return config if eos == config.eos_token_id else dataclasses.replace(config, eos_token_id=eos)


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
        model_config: ModelConfig | None = None,
    ):
        self.config = config
        self.parallel = parallel
        self.device = device
        self.model_config = model_config if model_config is not None else model_config_of(config)
        # The seed fixes the initial weights and the batch order, on every rank alike.
        _seed_everything(config.seed)
        kernels = resolve_train_kernels(config)
        # The tokenizer travels in every checkpoint of a run that started from a
        # pretrained model, as plain data, so generate and export find it there.
        self.tokenizer_document = None
        tokenizer = None
        if resume_payload is None and config.init_from is not None:
            self.model, tokenizer = _load_pretrained(config.init_from, kernels, device)
            if self.model.config != self.model_config:
                raise ValueError(f"--init_from {config.init_from!r} changed while this run started; its model differs")
            self.tokenizer_document = None if tokenizer is None else tokenizer.to_document()
        else:
            self.model = TransformerLM(self.model_config, kernels=kernels, device=device)
        self.model.activation_checkpointing = config.activation_checkpointing
        if resume_payload is not None:
            # Before wrapping: FSDP then shards the loaded weights.
            apply_checkpoint(resume_payload, self.model, restore_rng=False, source="--resume checkpoint")
            self.tokenizer_document = (resume_payload.get("extra") or {}).get(TOKENIZER_KEY)
            if self.tokenizer_document is not None and config.document_mask and config.eos_token_id is None:
                tokenizer = _tokenizer_of(self.tokenizer_document)
        # The resolved id is part of the run's settings: train_config.json and checkpoints hold it.
        self.config = config = resolve_eos_token_id(config, tokenizer, self.model_config.vocab_size)
        # The token that closes each document when attention is masked per document, else None.
        self.document_eos: int | None = config.eos_token_id if config.document_mask else None
        self.module = distributed.wrap(self.model, parallel, device)
        if config.compile:
            self.module.compile()
        self.optimizer = _adamw_for(self.model, config, device)
        self.precision = MixedPrecision(config.precision, device)
        self.sampler = torch.Generator().manual_seed(config.seed)
        self.step = 0
        # Whether any rank asked to stop during the last train_step; the same on every rank.
        self.stop_agreed = False
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
        restore_rng_state(payload["rng"], {SAMPLER: self.sampler})

    # ------------------------------------------------------------ one step

    def train_step(self, data: np.ndarray, stop_requested: Callable[[], bool] | None = None) -> dict:
        """Take one optimizer step (or skip it); returns the record to log.

        ``stop_requested`` says whether this rank was asked to stop; it is
        read once the gradients are in, so a request made during the step
        ends the run after this step. Afterwards ``stop_agreed`` says whether
        any rank was asked.
        """
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
            document_ids = None if self.document_eos is None else document_ids_from_eos(inputs, self.document_eos)
            last = index == len(micro_batches) - 1
            with distributed.gradient_sync(self.module, parallel, sync=last):
                with self.precision.autocast():
                    # forward with targets returns the float32 mean loss; the data was checked when loaded.
                    loss = self.module(inputs, targets=targets, check_ids=False, document_ids=document_ids)
                loss = loss / len(micro_batches)
                self.precision.backward(loss)
            loss_sum += loss.detach()
        # One all-reduce carries both the loss and the stop requests: agreement costs no extra collective.
        stop = torch.tensor(float(stop_requested is not None and stop_requested()), device=self.device)
        loss_total, stops = parallel.sum(torch.stack([loss_sum, stop])).tolist()
        loss_value = loss_total / parallel.world_size
        self.stop_agreed = stops > 0

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
                eos_token_id=self.document_eos,
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
                generators={SAMPLER: self.sampler},
                extra={
                    "train_config": self.config.to_dict(),
                    "train_state": train_state,
                    TOKENIZER_KEY: self.tokenizer_document,
                },
            )
            write_checkpoint(payload, path)
            prune_checkpoints(path.parent, self.config.keep_checkpoints)
        self.parallel.barrier()
