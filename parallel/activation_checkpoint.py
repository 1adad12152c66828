"""Activation checkpointing per transformer block, applied from outside the model.

`full` recomputes the whole block in backward; `selective` recomputes only the attention
sub-layer (cheap to recompute, large activations). Forwards are patched in place rather than
wrapped, so parameter names (checkpoint keys, init seeds) do not change. A recomputed forward is
replayed from the routing statistics it first saw and what it records is dropped
(`mohge.model.moe.layer.replaying`), so nothing is counted twice and, compiled, it runs the graph
the forward ran; the MoE auxiliary losses' gradients still arrive once, through the recomputed
graph.
"""

from __future__ import annotations

from contextlib import nullcontext

from torch import nn
from torch.utils.checkpoint import checkpoint

from mohge.model.moe.layer import moe_layers, recorded_state, replaying


def _checkpointed(module: nn.Module) -> None:
    # What the checkpoint runs and recomputes: the module's own forward, or its compiled version
    # (parallel/compile.py replaces it: the checkpoint stays eager, around the compiled code).
    module.checkpointed_forward = module.forward

    replays = next(moe_layers(module), None) is not None  # selective (attention alone): nothing to replay

    def forward(*args, **kwargs):
        if replays:  # the recompute replays the routing statistics the forward saw
            state = recorded_state(module)
            kwargs["context_fn"] = lambda: (nullcontext(), replaying(state))
        # (no context_fn otherwise: dynamo cannot trace a checkpoint given one, and with
        # compile_backend=eager the attention's checkpoint sits inside the compiled block)
        return checkpoint(module.checkpointed_forward, *args, use_reentrant=False, **kwargs)

    module.forward = forward


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    if mode == "none":
        return
    for block in model.layers.values():
        _checkpointed(block if mode == "full" else block.attention)
