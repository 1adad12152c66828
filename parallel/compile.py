"""torch.compile per transformer block, applied after tensor parallel and activation checkpointing
and before FSDP (the order torchtitan composes them in).

Each block is compiled in place (`Module.compile`), so parameter names, checkpoint keys and
initial values do not change. Blocks compile with fullgraph=True: a graph break (a host sync, a
data-dependent shape) is an error, not a silent slowdown. The one exception is an MoE block under
expert parallel, whose all-to-all needs its split sizes on the host: it compiles with graph
breaks at the dispatch.
"""

from __future__ import annotations

import torch
from torch import nn

from mohge.model.moe.layer import MoHGELayer

BACKENDS = ("inductor", "aot_eager", "eager")


def apply_compile(model: nn.Module, backend: str = "inductor", expert_parallel: bool = False) -> int:
    """Compiles every block of `model.layers` in place; returns how many."""
    for block in model.layers.values():
        moe = isinstance(getattr(block, "ffn", None), MoHGELayer)
        fullgraph = not (moe and expert_parallel)
        if hasattr(block, "checkpointed_forward"):  # full activation checkpointing
            # Compile what the checkpoint runs, not the checkpoint: dynamo refuses the routing
            # statistics' state changes inside a checkpointed region, and around compiled code the
            # eager checkpoint recomputes it as it would eager code (replaying the statistics the
            # forward saw, so the recompute takes the forward's graph).
            block.checkpointed_forward = torch.compile(block.checkpointed_forward, backend=backend,
                                                       fullgraph=fullgraph)
        else:
            block.compile(backend=backend, fullgraph=fullgraph)
    return len(model.layers)
