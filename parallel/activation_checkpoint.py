"""Activation checkpointing per transformer block, applied from outside the model.

`full` recomputes the whole block in backward; `selective` recomputes only the attention
sub-layer (cheap to recompute, large activations). Forwards are patched in place rather than
wrapped, so parameter names (checkpoint keys, init seeds) do not change. Recomputed forwards run
with routing statistics switched off, so nothing is counted twice; the MoE auxiliary losses'
gradients still arrive once, through the recomputed graph.
"""

from __future__ import annotations

from contextlib import nullcontext
from functools import partial

from torch import nn
from torch.utils.checkpoint import checkpoint

from mohge.model.moe.layer import recording_suspended


def _checkpointed(module: nn.Module) -> None:
    inner = module.forward
    contexts = partial(lambda m: (nullcontext(), recording_suspended(m)), module)

    def forward(*args, **kwargs):
        return checkpoint(inner, *args, use_reentrant=False, context_fn=contexts, **kwargs)

    module.forward = forward


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    if mode == "none":
        return
    for block in model.layers.values():
        _checkpointed(block if mode == "full" else block.attention)
