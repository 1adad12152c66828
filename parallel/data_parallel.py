"""Data parallel: FSDP2 (`fully_shard`) over dp_shard, HSDP when dp_replicate > 1 too.

Each transformer block is one FSDP unit, then the root. Expert weights under expert parallel are
left out (each EP rank owns different experts; their replicas over `edp` are averaged by
parallelize.sync_gradients).
"""

from __future__ import annotations

from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import Shard


def _placement(param: nn.Parameter):
    # Expert weights [N, F, D] shard along F, so each expert's row stays a view of the local
    # shard: checkpoints store one entry per expert and must write through those views.
    return Shard(1) if param.dim() == 3 else None


def apply_fsdp(model: nn.Module, dp_mesh, expert_parallel: bool) -> None:
    ignored = {p for n, p in model.named_parameters() if ".experts." in n} if expert_parallel else None
    for block in model.layers.values():
        fully_shard(block, mesh=dp_mesh, ignored_params=ignored, shard_placement_fn=_placement)
    fully_shard(model, mesh=dp_mesh, ignored_params=ignored, shard_placement_fn=_placement)


def reshard(model: nn.Module) -> None:
    """Free the unsharded parameters FSDP keeps after a forward without backward (evaluation):
    the root module does not reshard after forward, and until it does its parameters are not the
    sharded ones the optimizer and the checkpoint refer to."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
