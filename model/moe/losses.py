"""The MoHGE auxiliary losses and the autograd op that attaches them to a layer's output.

Shape legend: T tokens, G groups, E experts, K experts per token.
"""

from __future__ import annotations

from typing import Sequence

import torch

from mohge.model.moe.dispatch import count_per_expert


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def group_aux_loss(
    group_logits_TG: torch.Tensor, group_mask_TG: torch.Tensor, width_weights_G: torch.Tensor, k_group: int
) -> torch.Tensor:
    """Cost-weighted Switch loss over groups: G/(T^2 K_g) * sum_g w_g * (sum_t P[t,g]) * c_g.

    P is the softmax of the group logits (softmax here although routing uses sigmoid) and c_g the
    number of tokens that kept group g. Wide groups cost more, so only tokens that gain go there.
    Without the coefficient a_G: the layer applies it.
    """
    T, G = group_logits_TG.shape
    probs_sum_G = _at_least_fp32(group_logits_TG).softmax(-1).sum(0)
    tokens_G = group_mask_TG.sum(0).to(probs_sum_G.dtype)
    return G / (T * T * k_group) * (width_weights_G * probs_sum_G * tokens_G).sum()


def intra_group_aux_loss(
    scores_TE: torch.Tensor, expert_idx_TK: torch.Tensor, num_groups: int, k_group: int
) -> torch.Tensor:
    """Switch-style f.P over all experts: (E K_g/G)/(T^2 K) * sum_e (sum_t s[t,e]) * c_e.

    E K_g/G is the number of candidate experts per token; c_e the tokens routed to expert e.
    Without the coefficient a_I.
    """
    T, E = scores_TE.shape
    K = expert_idx_TK.shape[-1]
    tokens_E = count_per_expert(expert_idx_TK, E).to(scores_TE.dtype)  # bincount would sync
    candidates = E * k_group / num_groups
    return candidates / (T * T * K) * (scores_TE.sum(0) * tokens_E).sum()


def router_z_loss(expert_logits_TE: torch.Tensor, offsets: Sequence[int]) -> torch.Tensor:
    """Mean over tokens and groups of logsumexp(expert logits in the group)^2 (ST-MoE's z-loss)."""
    per_group = [
        torch.logsumexp(_at_least_fp32(expert_logits_TE[:, offsets[g] : offsets[g + 1]]), dim=-1).square()
        for g in range(len(offsets) - 1)
    ]
    return torch.stack(per_group, dim=-1).mean()


class AttachAuxLoss(torch.autograd.Function):
    """Returns `out` unchanged; in backward hands the scalar `aux` a gradient of 1.

    So the auxiliary loss reaches the router's gradients exactly once per forward that is
    differentiated (a recomputed forward under activation checkpointing replaces, not adds), with
    no module-level list of losses. The loop scales all gradients by 1/micro-batches afterwards,
    which scales this gradient the same way as the LM loss's.
    """

    @staticmethod
    def forward(ctx, out: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        ctx.aux_shape, ctx.aux_dtype = aux.shape, aux.dtype
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        return grad_out, torch.ones(ctx.aux_shape, dtype=ctx.aux_dtype, device=grad_out.device)


def attach_aux_loss(out: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
    if not aux.requires_grad:
        return out
    return AttachAuxLoss.apply(out, aux)
