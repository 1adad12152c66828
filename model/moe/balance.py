"""Load balancing state of an MoE layer: balance scope, aux-loss-free selection bias, step counts.

Shape legend: T tokens, E experts (all groups, numbered group by group), G groups.

- `balance_scope=global_batch` needs the routed-slot fractions of a whole global batch, which
  are only known after the step's last micro-batch. The losses therefore use the counts of the
  *previous* optimizer step's global batch (all micro-batches, all data-parallel ranks), kept in
  the layer's buffers `global_expert_slots` [E] and `global_group_slots` [G] (slots per token).
  That value is the same in every parallel layout; see docs/balancing.md for the comparison with
  megatron-core's running average.
- Aux-loss-free balancing (DeepSeek-V3): the router adds `expert_bias` [E] (and `group_bias` [G])
  to the scores it selects with, never to the combine weights; `update_bias` moves them after
  each optimizer step from the step's global counts.
Both are buffers, so they are checkpointed, and are updated from all-reduced counts, so they are
identical on every rank. No process groups here: the trainer's hook (mohge.train.balancing)
reduces the counts and hands them over.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from mohge.model.config import MoEConfig
from mohge.model.moe.dispatch import count_per_expert


def register_selection_bias(router: nn.Module, moe: MoEConfig) -> None:
    """`router.expert_bias` [E] / `router.group_bias` [G] buffers when their update rate is on, else None."""
    router.register_buffer("expert_bias", torch.zeros(moe.num_experts) if moe.bias_update_rate > 0 else None)
    router.register_buffer(
        "group_bias", torch.zeros(moe.num_groups) if moe.group_bias_update_rate > 0 else None
    )


def biased(scores: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Selection scores: `scores + bias` when a bias is on (for top-k only, never for weights)."""
    return scores if bias is None else scores + bias.to(scores.dtype)


class StepCounts:
    """Routed slots per expert and tokens per group summed over the training forwards of one step.

    Recomputed forwards (activation checkpointing) and evaluation are not counted: the layer
    only calls `record` when its routing statistics are recording and it is training.
    """

    def __init__(self, num_experts: int, num_groups: int):
        self.num_experts, self.num_groups = num_experts, num_groups
        self.reset()
        self.last_global: Optional[torch.Tensor] = None  # [E + G + 1] of the last step, all ranks

    def reset(self) -> None:
        self.counts: Optional[torch.Tensor] = None  # [E + G + 1]: experts, groups, tokens

    def record(self, expert_idx_TK: torch.Tensor, group_mask_TG: torch.Tensor, keep_TK=None) -> None:
        # A scatter-add count and a fill: no data-dependent shape, so no host sync (unlike bincount
        # or boolean indexing by keep_TK).
        packed = torch.cat([
            count_per_expert(expert_idx_TK, self.num_experts, keep_TK).double(),
            group_mask_TG.sum(0).double(),
            group_mask_TG.new_full((1,), expert_idx_TK.shape[0], dtype=torch.float64),
        ]).detach()
        self.counts = packed if self.counts is None else self.counts + packed

    def pop(self, device: torch.device) -> torch.Tensor:
        """This step's local counts (zeros when the layer saw no training forward), then reset."""
        out = self.counts if self.counts is not None else torch.zeros(
            self.num_experts + self.num_groups + 1, dtype=torch.float64, device=device
        )
        self.reset()
        return out


def attach_balance(layer: nn.Module, moe: MoEConfig) -> None:
    """Gives an MoE layer its step counters and, with balance_scope=global_batch, the buffers of the
    previous step's global slots per token."""
    layer.balance = StepCounts(moe.num_experts, moe.num_groups)
    on = moe.balance_scope == "global_batch"
    layer.register_buffer("global_expert_slots", torch.zeros(moe.num_experts) if on else None)
    layer.register_buffer("global_group_slots", torch.zeros(moe.num_groups) if on else None)


@torch.no_grad()
def init_balance_buffers(model: nn.Module) -> None:
    """Initial values after `to_empty`: zero biases; before any step the global slots are uniform
    (top_k/E per expert, k_group/G per group), which makes the global loss's f flat."""
    for module in model.modules():
        if not hasattr(module, "balance"):
            continue
        cfg: MoEConfig = module.cfg
        if module.global_expert_slots is not None:
            module.global_expert_slots.fill_(cfg.top_k / cfg.num_experts)
            module.global_group_slots.fill_(cfg.k_group / cfg.num_groups)
        for name in ("expert_bias", "group_bias"):
            bias = getattr(module.router, name, None)
            if bias is not None:
                bias.zero_()


@torch.no_grad()
def apply_global_counts(layer: nn.Module, counts: torch.Tensor) -> None:
    """Takes one step's counts summed over every rank: stores them for the metrics, refreshes the
    global-batch slots and moves the selection biases (bias += rate * sign(mean load - load))."""
    cfg: MoEConfig = layer.cfg
    E, G = cfg.num_experts, cfg.num_groups
    layer.balance.last_global = counts.detach().cpu()
    tokens = float(counts[-1])
    if tokens == 0:
        return
    expert_E, group_G = counts[:E], counts[E : E + G]
    if layer.global_expert_slots is not None:
        layer.global_expert_slots.copy_(expert_E / tokens)
        layer.global_group_slots.copy_(group_G / tokens)
    router = layer.router
    if getattr(router, "expert_bias", None) is not None:
        target_E = mean_within(expert_E, expert_bias_segments(cfg))
        router.expert_bias.add_(cfg.bias_update_rate * torch.sign(target_E - expert_E).to(router.expert_bias.dtype))
    if getattr(router, "group_bias", None) is not None:
        router.group_bias.add_(
            cfg.group_bias_update_rate * torch.sign(group_G.mean() - group_G).to(router.group_bias.dtype)
        )


def expert_bias_segments(cfg: MoEConfig) -> list[int]:
    """Which experts an expert's load is compared with: its own group under two-level routing (the
    bias balances inside groups and leaves the choice of group to the group router), all experts
    under the flat router."""
    return [0, cfg.num_experts] if cfg.router == "flat" else cfg.group_offsets()


def mean_within(load_E: torch.Tensor, offsets: list[int]) -> torch.Tensor:
    """Each expert's entry replaced by the mean load of its segment [offsets[i], offsets[i+1])."""
    return torch.cat([load_E[a:b].mean().expand(b - a) for a, b in zip(offsets[:-1], offsets[1:])])


def balance_metrics(layer: nn.Module) -> dict:
    """Balance over the last step's global batch: max/mean expert load (all experts, and inside each
    group) and the selection biases' range."""
    out: dict = {}
    counts = layer.balance.last_global
    cfg: MoEConfig = layer.cfg
    if counts is not None and float(counts[: cfg.num_experts].sum()) > 0:
        load_E = counts[: cfg.num_experts]
        out["max_over_mean_load"] = float(load_E.max() / load_E.mean())
        offsets = cfg.group_offsets()
        out["group_max_over_mean_load"] = [
            float(load_E[a:b].max() / load_E[a:b].mean().clamp_min(1e-12)) for a, b in zip(offsets[:-1], offsets[1:])
        ]
    for name in ("expert_bias", "group_bias"):
        bias = getattr(layer.router, name, None)
        if bias is not None:
            out[f"{name}_range"] = [float(bias.min()), float(bias.max())]
    return out
