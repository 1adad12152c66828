"""Expert parallel: each EP rank keeps its experts (by the allocator's placement) and dispatches
tokens with all-to-all. Applied to a model on meta, before weights are materialised."""

from __future__ import annotations

import torch
from torch import nn

from mohge.model.config import MoEConfig
from mohge.model.moe.layer import moe_layers
from mohge.parallel.allocation import Placement, allocate
from mohge.parallel.dispatch import AllToAllDispatcher


def shard_experts(layer, placement: Placement, ep_rank: int) -> None:
    """Keeps only `ep_rank`'s experts of every group; records which rows of the full tensors they are."""
    offsets = layer.cfg.group_offsets()
    local = placement.local_experts(ep_rank)
    for g, group in enumerate(layer.experts.groups):
        rows = [e - offsets[g] for e in local if offsets[g] <= e < offsets[g + 1]]
        group.full_num_experts = group.w1.shape[0]
        group.expert_rows = rows
        for name in ("w1", "w3", "w2"):
            full = getattr(group, name)
            setattr(group, name, nn.Parameter(full.new_empty((len(rows), *full.shape[1:]))))


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
