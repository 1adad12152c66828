"""Two-level MoHGE routing: pick the top groups of a token, then its top experts inside them.

Shape legend: T tokens, D model dim, G groups, E experts (all groups, numbered group by group),
K experts per token (top_k).

Group scores p = sigmoid(W_g x); the top k_group groups are kept and their scores renormalised.
Expert scores q = softmax of W_e x inside each group; s = q * p on kept groups (0 elsewhere).
The token's K experts are the top-K of s across the kept groups ("global") or a fixed K/k_group
inside each kept group ("per_group"). Everything runs in fp32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from mohge.model.config import MoEConfig
from mohge.model.moe.balance import biased, register_selection_bias


@dataclass
class Routing:
    """The router's decision for T tokens and the tensors the auxiliary losses need."""

    expert_idx_TK: torch.Tensor  # int64 global expert ids
    weights_TK: torch.Tensor  # fp32 combine weights
    group_logits_TG: torch.Tensor  # W_g x (the group-wise loss takes their softmax)
    group_mask_TG: torch.Tensor  # bool, the kept groups
    expert_logits_TE: torch.Tensor  # W_e x (z-loss)
    aux_scores_TE: torch.Tensor  # the per-expert probabilities the intra-group loss sees
    keep_TK: Optional[torch.Tensor] = None  # bool, slots actually routed (top-p); None: all


def _select_global(s_TE: torch.Tensor, top_k: int, offsets: list[int]) -> torch.Tensor:
    """Top-K of s over all experts; experts of dropped groups hold -inf so they are never taken."""
    return s_TE.topk(top_k, dim=-1).indices


def _select_per_group(s_TE: torch.Tensor, top_k: int, offsets: list[int], k_group: int) -> torch.Tensor:
    """top_k/k_group experts inside each kept group: per-group candidates, then keep the kept groups'."""
    per_group = top_k // k_group
    cand_idx, cand_val = [], []
    for g in range(len(offsets) - 1):
        val, idx = s_TE[:, offsets[g] : offsets[g + 1]].topk(per_group, dim=-1)
        cand_val.append(val)
        cand_idx.append(idx + offsets[g])
    cand_val_TC, cand_idx_TC = torch.cat(cand_val, dim=-1), torch.cat(cand_idx, dim=-1)
    # Dropped groups' candidates are -inf, so the top-K of the candidates are exactly the kept ones.
    pick_TK = cand_val_TC.topk(top_k, dim=-1).indices
    return cand_idx_TC.gather(-1, pick_TK)


class GroupRouter(nn.Module):
    """Scores tokens against groups and experts and returns a `Routing`."""

    def __init__(self, d_model: int, moe: MoEConfig):
        super().__init__()
        self.top_k, self.k_group = moe.top_k, moe.k_group
        self.offsets = moe.group_offsets()
        self.combine = moe.combine
        self.group_gate = nn.Linear(d_model, moe.num_groups, bias=False)
        self.expert_gate = nn.Linear(d_model, moe.num_experts, bias=False)
        if moe.topk_mode == "global":
            self._select: Callable = _select_global
        else:
            self._select = lambda s, k, off: _select_per_group(s, k, off, self.k_group)
        register_selection_bias(self, moe)  # aux-loss-free balancing: steers selection only

    def forward(self, x_TD: torch.Tensor) -> Routing:
        # fp32 at least, whatever autocast or a low-precision copy of the weights would do.
        dtype = torch.promote_types(self.group_gate.weight.dtype, torch.float32)
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            x_TD = x_TD.to(dtype)
            group_logits_TG = F.linear(x_TD, self.group_gate.weight.to(dtype))
            expert_logits_TE = F.linear(x_TD, self.expert_gate.weight.to(dtype))
            return self._route(group_logits_TG, expert_logits_TE)

    def _route(self, group_logits_TG: torch.Tensor, expert_logits_TE: torch.Tensor) -> Routing:
        num_groups = group_logits_TG.shape[-1]
        p_TG = torch.sigmoid(group_logits_TG)
        kept_TG = torch.zeros_like(p_TG, dtype=torch.bool)
        kept_TG.scatter_(-1, biased(p_TG, self.group_bias).topk(self.k_group, dim=-1).indices, True)
        p_kept_TG = p_TG * kept_TG
        p_kept_TG = p_kept_TG / p_kept_TG.sum(-1, keepdim=True)

        q_TE = torch.cat(
            [expert_logits_TE[:, self.offsets[g] : self.offsets[g + 1]].softmax(-1) for g in range(num_groups)],
            dim=-1,
        )
        sizes = [self.offsets[g + 1] - self.offsets[g] for g in range(num_groups)]
        s_TE = q_TE * p_kept_TG.repeat_interleave(torch.tensor(sizes, device=q_TE.device), dim=-1)
        s_TE = s_TE / s_TE.sum(-1, keepdim=True).clamp_min(1e-20)
        kept_TE = kept_TG.repeat_interleave(torch.tensor(sizes, device=q_TE.device), dim=-1)

        expert_idx_TK = self._select(biased(s_TE, self.expert_bias).masked_fill(~kept_TE, float("-inf")),
                                     self.top_k, self.offsets)
        chosen_TK = s_TE.gather(-1, expert_idx_TK)
        if self.combine == "authors":
            # The authors hand s to Megatron's top-k as logits: their weights are a softmax over the
            # k selected probabilities, and their load-balance loss sees the sparse routing
            # probabilities it returns (those weights at the selected experts, 0 elsewhere).
            weights_TK = chosen_TK.softmax(-1)
            aux_scores_TE = torch.zeros_like(s_TE).scatter(-1, expert_idx_TK, weights_TK)
        else:
            weights_TK = chosen_TK / chosen_TK.sum(-1, keepdim=True).clamp_min(1e-20)
            aux_scores_TE = s_TE
        return Routing(
            expert_idx_TK=expert_idx_TK,
            weights_TK=weights_TK,
            group_logits_TG=group_logits_TG,
            group_mask_TG=kept_TG,
            expert_logits_TE=expert_logits_TE,
            aux_scores_TE=aux_scores_TE,
        )


def capacity_keep(expert_idx_TK: torch.Tensor, num_experts: int, capacity_factor: float) -> torch.Tensor:
    """Which (token, slot) pairs fit their expert's capacity ceil(cf * T*K / E) -> bool [T, K].

    Slots are served in token order (then slot order), as in Switch Transformer: when an expert
    is full, later tokens' slots for it are dropped and those tokens keep only their residual
    path and their other experts.
    """
    T, K = expert_idx_TK.shape
    capacity = math.ceil(capacity_factor * T * K / num_experts)
    flat_S = expert_idx_TK.flatten()
    order_S = torch.argsort(flat_S, stable=True)
    counts_E = torch.bincount(flat_S, minlength=num_experts)
    starts_E = counts_E.cumsum(0) - counts_E
    position_S = torch.empty_like(flat_S)
    position_S[order_S] = torch.arange(flat_S.numel(), device=flat_S.device) - starts_E[flat_S[order_S]]
    return (position_S < capacity).view(T, K)
