"""Data parallel: FSDP2 (`fully_shard`) over dp_shard, HSDP when dp_replicate > 1 too.

Each transformer block is one FSDP unit, then the root (under pipeline parallel: each stage's
view, see apply_fsdp). Expert weights under expert parallel are
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


def apply_fsdp(model: nn.Module, dp_mesh, expert_parallel: bool, stages: list[nn.Module] | None = None) -> None:
    """Shards `model` in place: each block is a unit, then the root. Under pipeline parallel the
    schedule never calls the model's own forward but per-stage views of its modules (`stages`):
    each view is then the root unit of its stage, which also lets the pipeline schedule hold
    gradient reduction until a step's last micro-batch."""
    ignored = {p for n, p in model.named_parameters() if ".experts." in n} if expert_parallel else None
    for block in model.layers.values():
        fully_shard(block, mesh=dp_mesh, ignored_params=ignored, shard_placement_fn=_placement)
    for root in stages or [model]:
        fully_shard(root, mesh=dp_mesh, ignored_params=ignored, shard_placement_fn=_placement)


def reshard(model: nn.Module) -> None:
    """Free the unsharded parameters FSDP keeps after a forward without backward (evaluation):
    root units do not reshard after forward, and until they do their parameters are not the
    sharded ones the optimizer and the checkpoint refer to."""
    for root in [model, *getattr(model, "pipeline_stages", [])]:
        for module in root.modules():
            if isinstance(module, FSDPModule):
                module.reshard()
