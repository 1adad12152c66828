"""Preemption: SIGTERM / SIGUSR1 (what SLURM sends before the time limit) ask the run to stop.

The signal handler only sets a flag; the training loop checks it after each step, saves a
checkpoint and exits with REQUEUE_EXIT_CODE, which the SLURM template turns into a requeue.
Ctrl-C (SIGINT) takes the same path but is not a requeue: the checkpoint is saved if the config
saves any, and the exit code is 130 (the shell's code for an interrupted command). A second
Ctrl-C stops at once (KeyboardInterrupt, which mohge-train reports as one line).
"""

from __future__ import annotations

import os
import signal
import time
from typing import Optional

import torch
import torch.distributed as dist

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later"
INTERRUPT_EXIT_CODE = 130  # 128 + SIGINT
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class PreemptionHandler:
    """Context manager that records a stop request and restores the previous handlers on exit."""

    def __init__(self, signals=SIGNALS):
        self.signals = signals
        self.signal_name: Optional[str] = None
        self.interrupted = False  # Ctrl-C (here or on a peer rank): stop without asking for a requeue
        self._first_interrupt = 0.0
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            self.interrupted = True
            self._first_interrupt = time.monotonic()
            signal.signal(signal.SIGINT, self._second_interrupt)
            if int(os.environ.get("RANK", "0")) == 0:  # os.write: safe inside a handler, unlike print
                os.write(2, b"\nmohge-train: Ctrl-C: stopping after this step (saving a checkpoint if the config "
                            b"saves any); press Ctrl-C again to stop now\n")
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name

    def _second_interrupt(self, signum, frame) -> None:
        """A second Ctrl-C stops at once; one within a second of the first is the same key press
        forwarded by torchrun (the terminal signals every process of the job, then torchrun does)."""
        if time.monotonic() - self._first_interrupt > 1.0:
            signal.signal(signal.SIGINT, self._previous[signal.SIGINT])
            raise KeyboardInterrupt

    def __enter__(self) -> "PreemptionHandler":
        for sig in self.signals:
            if sig == signal.SIGINT and signal.getsignal(sig) is signal.SIG_IGN:
                continue  # started with Ctrl-C ignored (nohup, `cmd &` in a script): leave it so
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    @property
    def exit_code(self) -> int:
        return INTERRUPT_EXIT_CODE if self.interrupted else REQUEUE_EXIT_CODE

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
        # 2: Ctrl-C somewhere, 1: a requeue signal; MAX makes every rank stop the same way.
        value = torch.tensor([2.0 if self.interrupted else 1.0 if flag else 0.0], device=device or "cpu")
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
        if value.item() and self.signal_name is None:
            self.signal_name = "peer signal"
        self.interrupted = value.item() == 2.0
        return bool(value.item())
