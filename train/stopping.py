"""Stopping a run on request: SIGTERM, SIGINT (Ctrl-C) and SIGHUP end it at a step boundary, saved.

Clusters stop jobs with SIGTERM (SLURM, Kubernetes, spot reclaims), a closed
terminal sends SIGHUP and people press Ctrl-C. While ``train`` runs, each of
these only sets a flag; the loop finishes the step in progress, writes a
checkpoint and raises :class:`TrainingStopped`, which the CLI turns into one
line saying how to resume and an exit code of 128 + the signal number (130
for Ctrl-C, 143 for SIGTERM), as a shell reports a process killed by it.

A second Ctrl-C means "now": it raises KeyboardInterrupt at once, with no
checkpoint (the newest earlier one remains). A repeated SIGTERM or SIGHUP
does not: under torchrun and SLURM a worker is often sent the same signal
twice, by the scheduler and again by the launcher forwarding it.

Under torchrun each rank reads its own flag, and the flags travel in the
all-reduce that already averages the loss every step (Trainer.train_step),
so all ranks learn at the same step that some rank was signalled, stop
together and join the collective save, at no extra communication.
"""

from __future__ import annotations

import signal
import threading

# The signals that ask a run to stop.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class TrainingStopped(Exception):
    """A run stopped by a signal after saving ``checkpoint`` at ``step``; ``resume_command`` continues it."""

    def __init__(self, signal_number: int, step: int, checkpoint: str, resume_command: str):
        self.signal_number = signal_number
        self.step = step
        self.checkpoint = checkpoint
        self.resume_command = resume_command
        self.exit_code = 128 + signal_number
        super().__init__(
            f"stopped by {signal.Signals(signal_number).name} after step {step}; checkpoint {checkpoint}; "
            f"resume with: {resume_command}"
        )


class StopRequests:
    """Turns STOP_SIGNALS into a flag for the duration of a ``with`` block, then puts the old handlers back.

    ``received`` is the first signal's number, or None. Handlers can only be
    installed from the main thread; elsewhere (a notebook's worker thread)
    the block changes nothing and the signals keep their usual effect.
    """

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def _handle(self, signal_number: int, frame) -> None:
        if self.received is not None and signal_number == signal.SIGINT:
            raise KeyboardInterrupt("second Ctrl-C: stopping at once, without a checkpoint")
        if self.received is None:
            self.received = signal_number

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for signal_number in STOP_SIGNALS:
                self._previous[signal_number] = signal.signal(signal_number, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signal_number, handler in self._previous.items():
            # None: the old handler was set outside Python; the default is the closest we can restore.
            signal.signal(signal_number, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()
