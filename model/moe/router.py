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
from mohge.model.moe.dispatch import count_per_expert


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


def _select_global(s_TE: torch.Tensor, top_k: int, members_GN: torch.Tensor) -> torch.Tensor:
    """Top-K of s over all experts; experts of dropped groups hold -inf so they are never taken."""
    return s_TE.topk(top_k, dim=-1).indices


def _select_per_group(s_TE: torch.Tensor, top_k: int, members_GN: torch.Tensor, k_group: int) -> torch.Tensor:
    """top_k/k_group experts inside each kept group: per-group candidates, then keep the kept groups'.

    members_GN[g] lists group g's expert ids, padded with E (a -inf column): one topk over
    [T, G, N] instead of a loop over groups.
    """
    T = s_TE.shape[0]
    per_group = top_k // k_group
    s_ext = torch.cat([s_TE, s_TE.new_full((T, 1), float("-inf"))], dim=-1)
    cand_val_TGC, pos_TGC = s_ext[:, members_GN].topk(per_group, dim=-1)
    cand_idx_TC = members_GN.expand(T, -1, -1).gather(-1, pos_TGC).reshape(T, -1)
    # Dropped groups' candidates are -inf, so the top-K of the candidates are exactly the kept ones.
    pick_TK = cand_val_TGC.reshape(T, -1).topk(top_k, dim=-1).indices
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
        self.group_sizes = [g.num_experts for g in moe.groups]
        # Index tables for loop-free per-group math (rebuilt by reset_buffers after to_empty).
        self.register_buffer("group_of_E", torch.empty(moe.num_experts, dtype=torch.long), persistent=False)
        self.register_buffer("members_GN", torch.empty(moe.num_groups, max(self.group_sizes), dtype=torch.long),
                             persistent=False)
        self.reset_buffers()
        if moe.topk_mode == "global":
            self._select: Callable = _select_global
        else:
            self._select = lambda s, k, members: _select_per_group(s, k, members, self.k_group)
        register_selection_bias(self, moe)  # aux-loss-free balancing: steers selection only

    def reset_buffers(self) -> None:
        """Fills the index tables (buffers, so they follow the module's device)."""
        if self.group_of_E.is_meta:
            return
        E, device = sum(self.group_sizes), self.group_of_E.device
        group_of = [g for g, n in enumerate(self.group_sizes) for _ in range(n)]
        members = [[self.offsets[g] + i if i < n else E for i in range(self.members_GN.shape[1])]
                   for g, n in enumerate(self.group_sizes)]
        self.group_of_E = torch.tensor(group_of, dtype=torch.long, device=device)
        self.members_GN = torch.tensor(members, dtype=torch.long, device=device)

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

        # Softmax inside each group without a loop over groups: shift by the group's max, divide
        # by the group's sum (scatter over the expert -> group table).
        T, gid_E = expert_logits_TE.shape[0], self.group_of_E
        gid_TE = gid_E.expand(T, -1)
        max_TG = expert_logits_TE.new_full((T, num_groups), float("-inf"))
        max_TG = max_TG.scatter_reduce(1, gid_TE, expert_logits_TE.detach(), "amax")
        exp_TE = (expert_logits_TE - max_TG[:, gid_E]).exp()
        q_TE = exp_TE / exp_TE.new_zeros(T, num_groups).scatter_add(1, gid_TE, exp_TE)[:, gid_E]
        s_TE = q_TE * p_kept_TG[:, gid_E]
        s_TE = s_TE / s_TE.sum(-1, keepdim=True).clamp_min(1e-20)
        kept_TE = kept_TG[:, gid_E]

        expert_idx_TK = self._select(biased(s_TE, self.expert_bias).masked_fill(~kept_TE, float("-inf")),
                                     self.top_k, self.members_GN)
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
    counts_E = count_per_expert(flat_S, num_experts)
    starts_E = counts_E.cumsum(0) - counts_E
    position_S = torch.empty_like(flat_S)
    position_S[order_S] = torch.arange(flat_S.numel(), device=flat_S.device) - starts_E[flat_S[order_S]]
    return (position_S < capacity).view(T, K)
