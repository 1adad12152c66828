"""torch.compile per transformer block, applied after tensor parallel and activation checkpointing
and before FSDP (the order torchtitan composes them in).

Each block is compiled in place (`Module.compile`), so parameter names, checkpoint keys and
initial values do not change. Blocks compile with fullgraph=True: a graph break (a host sync, a
data-dependent shape) is an error, not a silent slowdown. The one exception is an MoE block under
expert parallel, whose all-to-all needs its split sizes on the host: it compiles with graph
breaks at the dispatch. Under context parallel with `cp_comm=ring` every block breaks its graph
around the ring attention (dynamo cannot trace its batched p2p sends); `cp_comm=all_gather`
compiles whole.

Under tensor parallel the first block's input is the embedding's `DTensor.to_local()`, a view of
the DTensor's local tensor. AOTAutograd (torch 2.13) hands the gradient of a compiled module's
view input straight to the DTensor redistribute behind the view, skipping the view's own backward,
which fails (`'Tensor' object has no attribute '_local_tensor'`). The embedding's output is
therefore copied out of the view: one [batch, sequence / tp, d_model] copy per forward
([batch, sequence, d_model] without sequence parallel).
"""

from __future__ import annotations

import torch
from torch import nn

from mohge.model.moe.layer import MoHGELayer

BACKENDS = ("inductor", "aot_eager", "eager")


def apply_compile(model: nn.Module, backend: str = "inductor", expert_parallel: bool = False,
                  tensor_parallel: bool = False, ring_attention: bool = False) -> int:
    """Compiles every block of `model.layers` in place; returns how many."""
    if tensor_parallel and model.tok_embeddings is not None:
        model.tok_embeddings.register_forward_hook(_copy_out_of_view)
    for block in model.layers.values():
        moe = isinstance(getattr(block, "ffn", None), MoHGELayer)
        fullgraph = not ((moe and expert_parallel) or ring_attention)
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


def _copy_out_of_view(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    """Forward hook: `output` as a plain tensor of its own (see the module docstring). Under
    no_grad (validation) `to_local()` returns the local tensor itself, an AsyncCollectiveTensor
    after a sequence-parallel reduce-scatter: passed on, the first block would compile again for it."""
    return output.clone() if output._is_view() or type(output) is not torch.Tensor else output
