"""Bounded failure: collective timeouts from the config and a heartbeat watchdog per rank.

Two layers end a job whose rank is stopped (SIGSTOP), dead or hung:
- `parallel.timeout_s` is the timeout of the process groups mohge creates (the default group and
  the checkpoint writer's gloo group): a collective waiting longer on a peer raises on the ranks
  that wait (NCCL aborts the communicator; PyTorch enables its async error handling by default).
  Sub-groups that DeviceMesh creates take PyTorch's own default (10 min NCCL, 30 min gloo).
- `train.watchdog_s`: a daemon thread in every rank ends the process (exit code 124, with every
  thread's stack on stderr) when the training loop has not finished a step, a save or an
  evaluation for that long, whatever it is stuck in: a collective of any group, I/O, a deadlock.
When one rank exits, torchrun stops the others (SIGTERM, then SIGKILL, which also ends a
stopped process), so the whole job ends within about train.watchdog_s of the last progress.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from datetime import timedelta

from mohge.model.config import ConfigError

WATCHDOG_EXIT_CODE = 124  # as timeout(1)


def validate_timeouts(collective_s: float, watchdog_s: float) -> None:
    if not 0 < collective_s < 1e9:
        raise ConfigError(f"parallel.timeout_s: {collective_s} must be a number of seconds > 0 "
                          "(how long a collective may wait)")
    if not 0 <= watchdog_s < 1e9:
        raise ConfigError(f"train.watchdog_s: {watchdog_s} must be a number of seconds >= 0 (0 turns the watchdog off)")


def collective_timeout(seconds: float) -> timedelta:
    return timedelta(seconds=seconds)


class Watchdog:
    """`beat(phase)` after each unit of progress; no beat for `timeout_s` ends the process."""

    def __init__(self, timeout_s: float, rank: int = 0, exit_code: int = WATCHDOG_EXIT_CODE):
        self.timeout_s, self.rank, self.exit_code = timeout_s, rank, exit_code
        self.phase = "start"
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="mohge-watchdog", daemon=True)

    def __enter__(self) -> "Watchdog":
        if self.timeout_s > 0:
            self._last = time.monotonic()
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()

    def beat(self, phase: str) -> None:
        self.phase = phase
        self._last = time.monotonic()

    def _watch(self) -> None:
        poll = min(max(self.timeout_s / 10, 0.05), 5.0)
        while not self._stop.wait(poll):
            idle = time.monotonic() - self._last
            if idle > self.timeout_s:
                self._fire(idle)

    def _fire(self, idle: float) -> None:
        sys.stderr.write(f"mohge watchdog: rank {self.rank}: no progress for {idle:.0f}s after {self.phase} "
                         f"(train.watchdog_s={self.timeout_s:g}); another rank is stopped, dead or hung, or this "
                         f"one is stuck; ending the job (exit {self.exit_code}). Stacks follow.\n")
        sys.stderr.flush()
        try:
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        finally:
            os._exit(self.exit_code)
