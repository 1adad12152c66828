"""The MoHGE auxiliary losses and the autograd op that attaches them to a layer's output.

Shape legend: T tokens, G groups, E experts, K experts per token.
"""

from __future__ import annotations

from typing import Sequence

import torch


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def switch_term(
    probs_TX: torch.Tensor,
    slots_TX: torch.Tensor,
    weight_X: torch.Tensor | None = None,
    scope: str = "micro_batch",
    batch_size: int = 1,
    global_slots_X: torch.Tensor | None = None,
) -> torch.Tensor:
    """sum_x w_x * mean_t P[t,x] * f_x, the common core of every Switch-style balance loss.

    f_x = routed slots of x per token: over this forward's tokens ("micro_batch"), per sequence
    then averaged over the `batch_size` sequences ("sequence", DeepSeek-V3's sequence-wise loss),
    or the detached `global_slots_X` counted over a whole global batch ("global_batch"; the
    probability mean stays local, as in megatron-core's global aux loss).
    """
    probs_TX = _at_least_fp32(probs_TX)
    X = probs_TX.shape[-1]
    weight_X = torch.ones(X, dtype=probs_TX.dtype, device=probs_TX.device) if weight_X is None else weight_X
    slots_TX = slots_TX.to(probs_TX.dtype)
    if scope == "sequence":
        p_BX = probs_TX.view(batch_size, -1, X).mean(1)
        f_BX = slots_TX.view(batch_size, -1, X).mean(1)
        return (weight_X * p_BX * f_BX).sum(-1).mean()
    if scope == "global_batch":
        f_X = global_slots_X.detach().to(probs_TX.dtype)
    else:
        f_X = slots_TX.mean(0)
    return (weight_X * probs_TX.mean(0) * f_X).sum()


def slots_per_expert(expert_idx_TK: torch.Tensor, num_experts: int, keep_TK: torch.Tensor | None = None) -> torch.Tensor:
    """[T, E] float: how many of token t's routed slots went to expert e (0 or 1 here)."""
    ones_TK = torch.ones(expert_idx_TK.shape, device=expert_idx_TK.device)
    if keep_TK is not None:
        ones_TK = ones_TK * keep_TK
    return torch.zeros(expert_idx_TK.shape[0], num_experts, device=expert_idx_TK.device).scatter_add_(
        -1, expert_idx_TK, ones_TK
    )


def group_aux_loss(
    group_logits_TG: torch.Tensor,
    group_mask_TG: torch.Tensor,
    width_weights_G: torch.Tensor,
    k_group: int,
    scope: str = "micro_batch",
    batch_size: int = 1,
    global_slots_G: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cost-weighted Switch loss over groups: G/(T^2 K_g) * sum_g w_g * (sum_t P[t,g]) * c_g.

    P is the softmax of the group logits (softmax here although routing uses sigmoid) and c_g the
    number of tokens that kept group g (c_g/T taken over the balance scope, see `switch_term`).
    Wide groups cost more, so only tokens that gain go there. Without the coefficient a_G.
    """
    G = group_logits_TG.shape[-1]
    probs_TG = _at_least_fp32(group_logits_TG).softmax(-1)
    term = switch_term(probs_TG, group_mask_TG, width_weights_G.to(probs_TG.dtype), scope, batch_size, global_slots_G)
    return G / k_group * term


def intra_group_aux_loss(
    scores_TE: torch.Tensor,
    expert_idx_TK: torch.Tensor,
    num_groups: int,
    k_group: int,
    scope: str = "micro_batch",
    batch_size: int = 1,
    global_slots_E: torch.Tensor | None = None,
) -> torch.Tensor:
    """Switch-style f.P over all experts: (E K_g/G)/(T^2 K) * sum_e (sum_t P[t,e]) * c_e.

    E K_g/G is the number of candidate experts per token; c_e the tokens routed to expert e
    (c_e/T taken over the balance scope). P is what the router hands over as `aux_scores_TE`.
    Without the coefficient a_I.
    """
    E = scores_TE.shape[-1]
    K = expert_idx_TK.shape[-1]
    slots_TE = slots_per_expert(expert_idx_TK, E)
    candidates = E * k_group / num_groups
    return candidates / K * switch_term(scores_TE, slots_TE, None, scope, batch_size, global_slots_E)


def router_z_loss(expert_logits_TE: torch.Tensor, offsets: Sequence[int]) -> torch.Tensor:
    """Mean over tokens and groups of logsumexp(expert logits in the group)^2 (ST-MoE's z-loss).

    No loop over groups: groups of one size are a view [T, G, N]; groups of several sizes are
    padded to the largest with -inf, which adds nothing to a logsumexp, by one pad_sequence of
    views (no index tensor made from host data: on CUDA that copy waits for the device)."""
    logits_TE = _at_least_fp32(expert_logits_TE)
    T, sizes = logits_TE.shape[0], [end - start for start, end in zip(offsets[:-1], offsets[1:])]
    if len(set(sizes)) == 1:
        return logits_TE.reshape(T, len(sizes), sizes[0]).logsumexp(-1).square().mean()
    members = [logits_TE[:, start:end].t() for start, end in zip(offsets[:-1], offsets[1:])]  # views [n, T]
    logits_GNT = torch.nn.utils.rnn.pad_sequence(members, batch_first=True, padding_value=float("-inf"))
    return logits_GNT.logsumexp(1).square().mean()


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
