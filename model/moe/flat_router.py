"""HMoE routing (arXiv 2408.10681): one softmax router over all experts of all widths.

Shape legend: T tokens, D model dim, G groups (widths), E experts (numbered group by group),
K experts per token (top_k; under top-p the most a token may take).

P = softmax(W x) over all E experts. Top-k takes the k largest; top-p (HMoE's dynamic routing)
takes experts in decreasing P until their summed probability reaches `top_p`, at most `top_k`
and at least one. Combine weights are the selected P renormalised. The load loss is HMoE's
parameter penalty: a Switch loss whose per-expert load term is weighted by the expert's size, so
routing to large experts costs more. Same allocator, dispatcher and expert kernels as MoHGE: the
groups just become the set of widths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mohge.model.config import MoEConfig
from mohge.model.moe.balance import biased, register_selection_bias
from mohge.model.moe.losses import router_z_loss, slots_per_expert, switch_term
from mohge.model.moe.router import Routing


def top_p_keep(sorted_probs_TK: torch.Tensor, top_p: float) -> torch.Tensor:
    """bool [T, K]: slot j is used when the probability of the slots before it is still < top_p
    (so the first slot is always used, and the set is the smallest reaching top_p)."""
    before_TK = sorted_probs_TK.cumsum(-1) - sorted_probs_TK
    return before_TK < top_p


class FlatRouter(nn.Module):
    """Scores tokens against all experts with one gate and returns a `Routing`."""

    def __init__(self, d_model: int, moe: MoEConfig):
        super().__init__()
        self.cfg = moe
        self.top_k, self.top_p = moe.top_k, moe.top_p
        self.gate = nn.Linear(d_model, moe.num_experts, bias=False)
        self._cache: dict = {}
        register_selection_bias(self, moe)  # expert_bias only (validated: no group selection)

    def _constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Group id [E] and size weight m_e / mean m [E] of every expert, on `device` (cached)."""
        if device not in self._cache:
            group_of_E = torch.tensor(self.cfg.expert_group_ids(), device=device)
            widths_E = torch.tensor(self.cfg.group_widths, dtype=torch.float32, device=device)[group_of_E]
            self._cache[device] = (group_of_E, widths_E / widths_E.mean())
        return self._cache[device]

    def forward(self, x_TD: torch.Tensor) -> Routing:
        dtype = torch.promote_types(self.gate.weight.dtype, torch.float32)
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            logits_TE = F.linear(x_TD.to(dtype), self.gate.weight.to(dtype))
            probs_TE = logits_TE.softmax(-1)
            expert_idx_TK = biased(probs_TE, self.expert_bias).topk(self.top_k, dim=-1).indices  # sorted
            chosen_TK = probs_TE.gather(-1, expert_idx_TK)
            keep_TK = None
            if self.top_p is not None:
                keep_TK = top_p_keep(chosen_TK, self.top_p)
                chosen_TK = chosen_TK * keep_TK
            weights_TK = chosen_TK / chosen_TK.sum(-1, keepdim=True).clamp_min(1e-20)
            G = self.cfg.num_groups
            used_TK = torch.ones(expert_idx_TK.shape, device=x_TD.device) if keep_TK is None else keep_TK.float()
            group_of_E, _ = self._constants(x_TD.device)
            group_slots_TG = torch.zeros(x_TD.shape[0], G, device=x_TD.device)
            group_mask_TG = group_slots_TG.scatter_add_(-1, group_of_E[expert_idx_TK], used_TK) > 0
            return Routing(
                expert_idx_TK=expert_idx_TK,
                weights_TK=weights_TK,
                group_logits_TG=logits_TE.new_zeros(x_TD.shape[0], G),  # no group gate
                group_mask_TG=group_mask_TG,
                expert_logits_TE=logits_TE,
                aux_scores_TE=probs_TE,
                keep_TK=keep_TK,
            )

    def aux_losses(self, routing: Routing, layer: nn.Module, batch_size: int = 1) -> dict[str, torch.Tensor]:
        """HMoE's losses under the layer's names: `intra_group_aux_loss` holds the parameter-penalty
        loss E/K * sum_e (m_e / mean m) * f_e * P_e (weighted by intra_aux_coeff), `router_entropy`
        the mean entropy of P (top-p; weighted by router_entropy_coeff); no group-wise loss."""
        cfg = self.cfg
        probs_TE = routing.aux_scores_TE
        slots_TE = slots_per_expert(routing.expert_idx_TK, cfg.num_experts, routing.keep_TK)
        _, size_weight_E = self._constants(probs_TE.device)
        penalty = cfg.num_experts / cfg.top_k * switch_term(
            probs_TE, slots_TE, size_weight_E.to(probs_TE.dtype), cfg.balance_scope, batch_size,
            layer.global_expert_slots,
        )
        losses = {
            "group_aux_loss": probs_TE.new_zeros(()),
            "intra_group_aux_loss": penalty,
            "z_loss": router_z_loss(routing.expert_logits_TE, [0, cfg.num_experts]),
        }
        if cfg.top_p is not None:
            losses["router_entropy"] = -(probs_TE * probs_TE.clamp_min(1e-20).log()).sum(-1).mean()
        return losses
