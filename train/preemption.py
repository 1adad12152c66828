"""Preemption: SIGTERM / SIGUSR1 (what SLURM sends before the time limit) ask the run to stop.

The signal handler only sets a flag; the training loop checks it after each step, saves a
checkpoint and exits with REQUEUE_EXIT_CODE, which the SLURM template turns into a requeue.
"""

from __future__ import annotations

import signal
from typing import Optional

import torch
import torch.distributed as dist

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later"
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionHandler:
    """Context manager that records a stop request and restores the previous handlers on exit."""

    def __init__(self, signals=SIGNALS):
        self.signals = signals
        self.signal_name: Optional[str] = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> "PreemptionHandler":
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def should_stop(self, group=None, device: Optional[torch.device] = None) -> bool:
        """True once any rank was signalled; with a process group every rank agrees on the step."""
        flag = self.signal_name is not None
        if group is None or not dist.is_initialized():
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=device or "cpu")
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
        if value.item() and self.signal_name is None:
            self.signal_name = "peer signal"
        return bool(value.item())
