"""Data parallel: FSDP2 (`fully_shard`) over dp_shard, HSDP when dp_replicate > 1 too.

Each transformer block is one FSDP unit, then the root (under pipeline parallel: each stage's
view, see apply_fsdp). Under expert parallel the routed experts of each MoE layer are a unit of
their own on the expert mesh: sharded over the edp_shard ranks that hold the same experts
(replicated over edp_replicate, see ParallelDims.edp_shard). Where edp_shard is 1 they are left
out of FSDP and their replicas' gradients are averaged by grads.sync_gradients.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import Shard


def fsdp_shard_dim(name: str, ndim: int) -> int:
    """FSDP shard dimension of any parameter: routed experts (also when FSDP shards them with the
    dense weights, ep = 1) as `expert_shard_dim`, everything else along dim 0."""
    return expert_shard_dim(name, ndim) if ".experts." in name else 0


def expert_shard_dim(name: str, ndim: int) -> int:
    """Dimension a routed-expert tensor shards along: the model dimension D. It is the input dim
    of the up projections (`groups.<g>.w1`, `w3` [n, F, D]) and the output dim of the down
    projection (`w2` [n, D, F]): never the expert dim, which may hold 0 or an odd number of rows
    under expert parallel (D shards evenly whatever the counts), and every expert's checkpoint
    view (one row) of the local shard stays a view."""
    if ndim == 1:
        return 0
    return ndim - 2 if name.rsplit(".", 1)[-1].startswith("w2") else ndim - 1


def _placements(module: nn.Module):
    """shard_placement_fn for FSDP units of `module`: each parameter by its name."""
    dims = {p: fsdp_shard_dim(n, p.dim()) for n, p in module.named_parameters()}
    return lambda p: Shard(dims[p]) if p in dims else None


def routed_expert_modules(block: nn.Module) -> list[nn.Module]:
    """The modules holding a block's routed experts (`...ffn.experts`)."""
    ffn = getattr(block, "ffn", None)
    experts = getattr(ffn, "experts", None)
    return [experts] if isinstance(experts, nn.Module) else []


def shard_experts_fsdp(model: nn.Module, expert_mesh, divide_factor: int, sum_reduction: bool) -> None:
    """Each MoE layer's routed experts as an FSDP unit over `expert_mesh`. Their gradients must be
    the sum over every data-parallel rank's tokens / dp (the all-to-all already summed the ep
    ranks'), not the mean over the expert mesh: `divide_factor` = dp. Backends without
    pre-multiplied sums (gloo) reduce with a plain sum and divide after (`sum_reduction`)."""
    for block in model.layers.values():
        for experts in routed_expert_modules(block):
            fully_shard(experts, mesh=expert_mesh, shard_placement_fn=_placements(block))
            experts.set_gradient_divide_factor(float(divide_factor))
            if sum_reduction:
                experts.set_force_sum_reduction_for_comms(True)


def apply_fsdp(model: nn.Module, dp_mesh, expert_parallel: bool, stages: list[nn.Module] | None = None,
               expert_mesh=None, expert_divide_factor: int = 1, sum_reduction: bool = False) -> None:
    """Shards `model` in place: routed experts (with `expert_mesh`), each block, then the root.
    Under pipeline parallel the schedule never calls the model's own forward but per-stage views
    of its modules (`stages`): each view is then the root unit of its stage, which also lets the
    pipeline schedule hold gradient reduction until a step's last micro-batch."""
    ignored = None
    if expert_parallel and expert_mesh is not None:
        shard_experts_fsdp(model, expert_mesh, expert_divide_factor, sum_reduction)
    elif expert_parallel:
        ignored = {p for n, p in model.named_parameters() if ".experts." in n}
    placement = _placements(model)
    for block in model.layers.values():
        fully_shard(block, mesh=dp_mesh, ignored_params=ignored, shard_placement_fn=placement)
    for root in stages or [model]:
        fully_shard(root, mesh=dp_mesh, ignored_params=ignored, shard_placement_fn=placement)


def reshard(model: nn.Module) -> None:
    """Free the unsharded parameters FSDP keeps after a forward without backward (evaluation):
    root units do not reshard after forward, and until they do their parameters are not the
    sharded ones the optimizer and the checkpoint refer to."""
    for root in [model, *getattr(model, "pipeline_stages", [])]:
        for module in root.modules():
            if isinstance(module, FSDPModule):
                module.reshard()
