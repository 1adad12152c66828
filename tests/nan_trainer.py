"""A Trainer whose gradients turn NaN at chosen steps (non-finite step handling tests)."""

from __future__ import annotations

import math

from mohge.train.trainer import Trainer


class NanAt(Trainer):
    """Poisons the gradient of the listed (0-based) steps; set `bad_steps` before building."""

    bad_steps: set = set()

    def forward_backward(self):
        loss = super().forward_backward()
        if self.step in self.bad_steps:
            next(self.model.parameters()).grad.fill_(math.nan)
        return loss
