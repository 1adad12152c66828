"""MoE metric reduction: per-layer routing statistics gathered over data-parallel and pipeline ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from mohge.model.moe.layer import moe_layers
from mohge.parallel.parallelize import ParallelContext
from mohge.model.moe.balance import balance_metrics


def collect_moe_metrics(model: nn.Module, ctx: ParallelContext) -> dict:
    """Per MoE layer: group token fractions, expert loads and aux losses since the last call.

    With expert parallel, also the tokens and expert FLOPs each EP rank received and their
    imbalance ratio (max / mean). Counts are summed over data-parallel ranks.
    """
    per_layer, totals = {}, {"group_aux_loss": 0.0, "intra_group_aux_loss": 0.0, "z_loss": 0.0}
    for name, layer in moe_layers(model):
        stats = layer.stats.pop()
        if not stats["forwards"]:
            continue
        # Counts are summed and loss values averaged over data-parallel ranks, in one reduction.
        losses = [stats[k] for k in totals]
        packed = torch.cat([stats["tokens_per_expert"], torch.tensor([stats.get("dropped_slots", 0.0), *losses]).double()])
        if ctx.distributed and ctx.dims.dp > 1:
            packed = packed.to(next(model.parameters()).device)
            dist.all_reduce(packed, group=ctx.group("dp"))
            packed = packed.cpu()
            packed[-len(losses):] /= ctx.dims.dp
        n = len(losses) + 1
        tokens_per_expert, dropped = packed[:-n], float(packed[-n])
        stats.update({k: float(v) for k, v in zip(totals, packed[-len(losses):])})
        offsets = layer.cfg.group_offsets()
        slots = float(tokens_per_expert.sum()) or 1.0
        group_slots = [float(tokens_per_expert[offsets[g] : offsets[g + 1]].sum()) for g in range(len(offsets) - 1)]
        entry = {
            "group_fraction": [s / slots for s in group_slots],
            "expert_load": [float(c) / slots for c in tokens_per_expert],
            **{k: stats[k] for k in totals},
        }
        entry.update(balance_metrics(layer))  # the last step's global batch; bias ranges
        if layer.cfg.capacity_factor is not None:
            entry["dropped_fraction"] = dropped / (dropped + slots)
        placement = getattr(layer, "placement", None)
        if placement is not None:
            from mohge.parallel.allocation import flop_imbalance

            d_model = next(layer.router.parameters()).shape[-1]
            entry["ep_rank_tokens"] = [
                float(sum(tokens_per_expert[e] for e in placement.local_experts(r))) for r in range(placement.ep_size)
            ]
            entry["ep_flop_imbalance"] = flop_imbalance(placement, tokens_per_expert.tolist(), d_model)
        per_layer[name] = entry
    if ctx.distributed and ctx.dims.pp > 1:  # every stage reports its own layers
        gathered: list = [None] * ctx.dims.pp
        dist.all_gather_object(gathered, per_layer, group=ctx.group("pp"))
        per_layer = {name: entry for part in gathered for name, entry in sorted(part.items())}
    for k in totals:
        totals[k] = sum(e[k] for e in per_layer.values()) / max(len(per_layer), 1)
    return {"moe": per_layer, **totals}


def weighted_aux_total(moe_cfg, metrics: dict, group_aux_active: bool) -> float:
    """The auxiliary terms' contribution to the objective, from the per-layer mean values."""
    group_coeff = moe_cfg.group_aux_coeff if group_aux_active else 0.0
    return sum(
        group_coeff * entry["group_aux_loss"]
        + moe_cfg.intra_aux_coeff * entry["intra_group_aux_loss"]
        + moe_cfg.z_loss_coeff * entry["z_loss"]
        for entry in metrics["moe"].values()
    )
