"""Training: optimizers, loss, learning-rate schedule, data, checkpoints, the loop and its CLI.

The loop (loop.py) drives one Trainer per rank (trainer.py); a signal ends it
at a step boundary with a checkpoint (stopping.py). Throughput and
scale live beside them: mixed precision (precision.py),
DDP/FSDP2 under torchrun (distributed.py), MFU (throughput.py), metrics and
TensorBoard (metrics.py) and ``scratchlm plot`` (plot.py).

>>> from scratchlm.train import TrainConfig, train  # doctest: +SKIP
>>> summary = train(TrainConfig(train_data_path="train.npy", val_data_path="val.npy", vocab_size=10_000,
...                             context_length=256, d_model=512, num_layers=4, num_heads=16, d_ff=1344,
...                             total_iters=5000, output_dir="runs/tiny"))  # doctest: +SKIP
"""

from scratchlm.train.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    read_checkpoint,
    read_newest_checkpoint,
    save_checkpoint,
)
from scratchlm.train.config import TrainConfig
from scratchlm.train.data import estimate_loss, get_batch, load_token_dataset
from scratchlm.train.loop import load_model, train
from scratchlm.train.loss import cross_entropy_loss
from scratchlm.train.optim import SGD, AdamW, gradient_clipping
from scratchlm.train.schedule import learning_rate_schedule
from scratchlm.train.stopping import TrainingStopped

__all__ = [
    "SGD",
    "AdamW",
    "CheckpointError",
    "TrainConfig",
    "TrainingStopped",
    "cross_entropy_loss",
    "estimate_loss",
    "get_batch",
    "gradient_clipping",
    "learning_rate_schedule",
    "list_checkpoints",
    "load_checkpoint",
    "load_model",
    "load_token_dataset",
    "read_checkpoint",
    "read_newest_checkpoint",
    "save_checkpoint",
    "train",
]
