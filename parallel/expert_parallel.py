"""Expert parallel: each EP rank keeps its experts (by the allocator's placement) and dispatches
tokens with all-to-all. Applied to a model on meta, before weights are materialised."""

from __future__ import annotations

from torch import nn

from mohge.model.config import MoEConfig
from mohge.model.moe.layer import moe_layers
from mohge.parallel.allocation import Placement, allocate
from mohge.parallel.dispatch import AllToAllDispatcher


def shard_experts(layer, placement: Placement, ep_rank: int) -> None:
    """Keeps only `ep_rank`'s experts (rows of the layer's expert stacks, see experts.py)."""
    layer.experts.keep_local(placement.local_experts(ep_rank))


def apply_expert_parallel(model: nn.Module, ctx, moe: MoEConfig) -> Placement:
    """Shards every MoHGE layer's experts over the EP group and swaps in the all-to-all dispatcher."""
    dims = ctx.dims
    placement = allocate(moe, dims.ep)
    ep_rank = ctx.coords["ep"]
    for _, layer in moe_layers(model):
        shard_experts(layer, placement, ep_rank)
        layer.placement = placement
        layer.dispatcher = AllToAllDispatcher(
            list(placement.rank_of), list(placement.slot_of), ep_rank, dims.ep, ctx.group("ep")
        )
    return placement
