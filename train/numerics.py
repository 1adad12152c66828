"""Step health: non-finite and spiking losses, and the stop after too many bad steps in a row.

A loss spike is a finite loss more than `train.loss_spike_factor` times the mean of the last
`train.loss_spike_window` accepted losses (megatron-core checks for spiky losses the same way
before the optimizer step). It is always reported; with `train.loss_spike_skip=true` the update
is skipped exactly like a non-finite step, and counts toward `train.max_bad_steps`.
The verdict is taken on the data-parallel mean loss, so every rank decides the same.
"""

from __future__ import annotations

import math
from collections import deque
from pathlib import Path
from typing import Optional

from mohge.model.config import ConfigError
from mohge.train.errors import DivergenceError  # noqa: F401  (raised here, defined with the other errors)

MIN_HISTORY = 10  # accepted losses needed before spikes are judged (the first steps fall fast)



def validate_loss_spike(t) -> None:
    """ConfigError naming the field for impossible loss-spike settings (t: TrainConfig)."""
    if t.loss_spike_factor != 0 and not t.loss_spike_factor > 1:
        raise ConfigError(f"train.loss_spike_factor: {t.loss_spike_factor} must be > 1 (a multiple of the running "
                          "mean loss), or 0 to turn spike detection off")
    if t.loss_spike_window < 1:
        raise ConfigError(f"train.loss_spike_window: {t.loss_spike_window} must be >= 1")
    if t.loss_spike_skip and t.loss_spike_factor == 0:
        raise ConfigError("train.loss_spike_skip=true: does nothing with train.loss_spike_factor=0; "
                          "set a factor (e.g. 3.0) or drop loss_spike_skip")
    if t.max_bad_steps < 1:
        raise ConfigError(f"train.max_bad_steps: {t.max_bad_steps} must be >= 1")


class LossGuard:
    """Judges each step's (data-parallel mean) loss: skip or not, and what to report."""

    def __init__(self, factor: float, window: int, skip_spikes: bool):
        self.factor, self.skip_spikes = factor, skip_spikes
        self.history: deque[float] = deque(maxlen=window)
        self.spikes = 0

    @property
    def mean(self) -> Optional[float]:
        if len(self.history) < min(MIN_HISTORY, self.history.maxlen):
            return None
        return sum(self.history) / len(self.history)

    def judge(self, step: int, loss: float) -> tuple[bool, Optional[str]]:
        """(skip the update?, a line to report or None) for step `step`'s loss."""
        if not math.isfinite(loss):
            return True, f"step {step}: non-finite loss {loss}, update skipped"
        mean = self.mean
        if self.factor and mean is not None and loss > self.factor * mean:
            self.spikes += 1
            action = "update skipped" if self.skip_spikes else "update kept (train.loss_spike_skip=false)"
            message = (f"step {step}: loss spike {loss:.4f} is {loss / mean:.1f}x the mean {mean:.4f} of the last "
                       f"{len(self.history)} steps (train.loss_spike_factor={self.factor}); {action}")
            if self.skip_spikes:
                return True, message
            self.history.append(loss)
            return False, message
        self.history.append(loss)
        return False, None

    def state_dict(self) -> dict:
        return {"history": list(self.history), "spikes": self.spikes}


def divergence_message(step: int, streak: int, max_bad: int, last_good: Optional[Path]) -> str:
    """The stop message; names the checkpoint saved before the bad run (pruning keeps it)."""
    if last_good is not None:
        where = (f"the last checkpoint saved before them is kept: {last_good} (resume with "
                 f"checkpoint.resume={last_good})")
    else:
        where = "no checkpoint was saved before them"
    return (f"step {step}: {streak} consecutive steps with a non-finite loss or gradient norm, or a skipped loss "
            f"spike (train.max_bad_steps={max_bad}); stopping: {where}. Lower train.lr or inspect the data.")
