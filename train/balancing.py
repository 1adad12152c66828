"""After each optimizer step: sum every MoE layer's routing counts over the global batch and hand
them to the layers (global-batch loss slots, aux-loss-free bias, balance metrics).

One all-reduce per step over the data-parallel group of this pipeline stage, of E + G + 1 numbers
per MoE layer the stage holds. Tensor-parallel ranks route identical tokens and expert-parallel
ranks are data-parallel ranks, so the dp sum covers every token of the global batch exactly once.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from mohge.model.moe.balance import apply_global_counts
from mohge.model.moe.layer import moe_layers


class BalanceHook:
    """Call `after_step()` once per optimizer step (skipped updates included), on every rank."""

    def __init__(self, model: nn.Module, ctx):
        self.layers = [layer for _, layer in moe_layers(model)]
        self.ctx = ctx
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def after_step(self) -> None:
        if not self.layers:
            return
        parts = [layer.balance.pop(self.device) for layer in self.layers]
        packed = torch.cat(parts)
        if self.ctx.distributed and self.ctx.dims.dp > 1:
            dist.all_reduce(packed, group=self.ctx.group("dp"))
        offset = 0
        for layer, part in zip(self.layers, parts):
            apply_global_counts(layer, packed[offset : offset + part.numel()])
            offset += part.numel()
