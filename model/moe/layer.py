"""The MoHGE feed-forward layer: Router -> Dispatcher -> RoutedExperts -> combine (+ shared experts).

Shape legend: B batch, S sequence, T = B*S tokens, D model dim, G groups, E experts, K top_k.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from mohge.model.config import MoEConfig
from mohge.model.layers import FeedForward
from mohge.model.moe.dispatch import LocalDispatcher, count_per_expert
from mohge.model.moe.experts import build_experts
from mohge.model.moe.losses import attach_aux_loss, group_aux_loss, intra_group_aux_loss, router_z_loss
from mohge.model.moe.balance import attach_balance
from mohge.model.moe.router import GroupRouter, Routing, capacity_keep


class RoutingStats:
    """Per-layer routing statistics summed over the forwards since the last `pop()`.

    A forward that activation checkpointing recomputes is replayed from the statistics it first
    saw and what it records is dropped, so nothing is counted twice (see `replaying`).
    """

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.recording = True
        self.reset()

    def reset(self) -> None:
        # Sums stay on the device as tensors; `pop()` is the only host sync. Token and forward
        # counts are tensors too: a Python int on the module would be a torch.compile guard
        # that changes every forward (a recompile per micro-batch).
        self.sums: dict[str, torch.Tensor] = {}

    def _add(self, name: str, value: torch.Tensor) -> None:
        value = value.detach().double()
        self.sums[name] = self.sums[name] + value if name in self.sums else value

    def record(self, routing: Routing, losses: dict[str, torch.Tensor], keep_TK: torch.Tensor | None = None) -> None:
        if not self.recording:
            return
        served = routing.expert_idx_TK.flatten()
        weight = None
        if keep_TK is not None:  # counted by weight, not by boolean indexing: no host sync
            weight = keep_TK.flatten()
            self._add("dropped_slots", (~keep_TK).sum())
        self._add("tokens_per_expert", count_per_expert(served, self.num_experts, weight))
        self._add("group_tokens", routing.group_mask_TG.sum(0))
        for name, value in losses.items():
            self._add(name, value)
        self._add("_tokens", served.new_full((), routing.expert_idx_TK.shape[0]))
        self._add("_forwards", served.new_ones(()))

    def pop(self) -> dict:
        """Totals since the last pop (loss values averaged per forward, counts summed), then reset.

        Keys: tokens, forwards, tokens_per_expert [E] (slots served), group_tokens [G], one per
        loss, and dropped_slots with a capacity factor.
        """
        tokens, forwards = (int(self.sums.pop(k, torch.zeros(()))) for k in ("_tokens", "_forwards"))
        n = max(forwards, 1)
        out: dict = {"tokens": tokens, "forwards": forwards}
        for name, value in self.sums.items():
            value = value.cpu()
            if value.dim():
                out[name] = value
            else:  # losses are averaged per forward, counts summed
                out[name] = float(value) if name == "dropped_slots" else float(value) / n
        self.reset()
        return out


class MoHGELayer(nn.Module):
    """Routes each token to k experts of several sizes and mixes their outputs.

    The group-wise, intra-group and z auxiliary losses are attached to the output through
    autograd; `group_aux_active` is switched on by the trainer at `group_aux_start_fraction`.
    """

    def __init__(self, d_model: int, moe: MoEConfig, expert_compute: str = "loop"):
        super().__init__()
        self.cfg = moe
        self.router = make_router(d_model, moe)
        self.experts = build_experts(d_model, moe.groups, expert_compute)
        self.shared = (
            FeedForward(d_model, moe.shared_ffn_hidden_size * moe.num_shared_experts)
            if moe.num_shared_experts
            else None
        )
        self.dispatcher = LocalDispatcher(moe.num_experts)
        self.group_aux_active = moe.group_aux_start_fraction == 0.0
        self.stats = RoutingStats(moe.num_experts)
        self.aux_grad_scale = 1.0  # 1/tp under MoE parallel folding (parallel/moe_folding.py)
        attach_balance(self, moe)  # step counts, global-batch slots (mohge.model.moe.balance)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        routing = self.router(x_TD)
        keep_TK, weights_TK = routing.keep_TK, routing.weights_TK  # top-p routing leaves some slots unused
        if self.cfg.capacity_factor is not None:
            # Dropped slots are still computed (static shapes, no sync) but weighted 0.
            keep_TK = capacity_keep(routing.expert_idx_TK, self.cfg.num_experts, self.cfg.capacity_factor)
        if keep_TK is not None:
            weights_TK = weights_TK * keep_TK

        x_disp, tokens_per_expert, handle = self.dispatcher.dispatch(x_TD, routing.expert_idx_TK)
        y_disp = self.experts(x_disp, tokens_per_expert)
        y_TKD = self.dispatcher.combine(y_disp, handle)
        out_TD = (y_TKD * weights_TK.unsqueeze(-1).to(y_TKD.dtype)).sum(dim=1)
        if self.shared is not None:
            out_TD = out_TD + self.shared(x_TD)

        losses = self.aux_losses(routing, B)
        self.stats.record(routing, losses, keep_TK)
        # Training forwards only: not recomputes, eval, or the pipeline's shape inference (no_grad).
        if self.training and self.stats.recording and torch.is_grad_enabled() and not x_BSD.is_meta:
            self.balance.record(routing.expert_idx_TK, routing.group_mask_TG, routing.keep_TK)
        if self.training:
            out_TD = attach_aux_loss(out_TD, self.aux_grad_scale * self.weighted_aux_loss(losses))
        return out_TD.view(B, S, D)

    def aux_losses(self, routing: Routing, batch_size: int = 1) -> dict[str, torch.Tensor]:
        """Unweighted auxiliary losses of this forward (`batch_size` sequences, for the sequence scope)."""
        cfg = self.cfg
        if hasattr(self.router, "aux_losses"):  # a router with its own losses (router=flat: HMoE)
            return self.router.aux_losses(routing, self, batch_size)
        scope = dict(scope=cfg.balance_scope, batch_size=batch_size)
        return {
            "group_aux_loss": group_aux_loss(
                routing.group_logits_TG,
                routing.group_mask_TG,
                torch.tensor(cfg.width_weights(), device=routing.group_logits_TG.device),
                cfg.k_group,
                global_slots_G=self.global_group_slots,
                **scope,
            ),
            "intra_group_aux_loss": intra_group_aux_loss(
                routing.aux_scores_TE, routing.expert_idx_TK, cfg.num_groups, cfg.k_group,
                global_slots_E=self.global_expert_slots, **scope,
            ),
            "z_loss": router_z_loss(routing.expert_logits_TE, cfg.group_offsets()),
        }

    def weighted_aux_loss(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        cfg = self.cfg
        group_coeff = cfg.group_aux_coeff if self.group_aux_active else 0.0
        return (
            group_coeff * losses["group_aux_loss"]
            + cfg.intra_aux_coeff * losses["intra_group_aux_loss"]
            + cfg.z_loss_coeff * losses["z_loss"]
            + (cfg.router_entropy_coeff * losses["router_entropy"] if "router_entropy" in losses else 0.0)
        )


def make_router(d_model: int, moe: MoEConfig) -> nn.Module:
    """`model.moe.router`: "group" (MoHGE two-level routing) or "flat" (HMoE, mohge.model.moe.flat_router)."""
    if moe.router == "flat":
        from mohge.model.moe.flat_router import FlatRouter

        return FlatRouter(d_model, moe)
    return GroupRouter(d_model, moe)


def moe_layers(model: nn.Module) -> Iterator[tuple[str, MoHGELayer]]:
    for name, module in model.named_modules():
        if isinstance(module, MoHGELayer):
            yield name, module


@contextmanager
def recording_suspended(model: nn.Module):
    """Stops routing statistics from being recorded (used for recomputed forwards)."""
    layers = [layer for _, layer in moe_layers(model)]
    previous = [layer.stats.recording for layer in layers]
    for layer in layers:
        layer.stats.recording = False
    try:
        yield
    finally:
        for layer, was in zip(layers, previous):
            layer.stats.recording = was


def _snapshot(layers) -> list:
    return [(layer, dict(layer.stats.sums), layer.balance.counts) for layer in layers]


def recorded_state(model: nn.Module) -> list:
    """What the MoE layers of `model` have recorded so far (routing statistics, step counts): the
    tensors are never changed in place, so references are a snapshot."""
    return _snapshot(layer for _, layer in moe_layers(model))


@contextmanager
def replaying(state: list):
    """Runs a forward again as it first ran (activation checkpointing's recompute): the layers see
    the statistics they had when `state` was taken, so they run the same code (a compiled forward
    takes the same graph and saves the same tensors), and what the replay records is dropped."""
    now = _snapshot(layer for layer, _, _ in state)
    for layer, sums, counts in state:
        layer.stats.sums, layer.balance.counts = dict(sums), counts
    try:
        yield
    finally:
        for layer, sums, counts in now:
            layer.stats.sums, layer.balance.counts = sums, counts


def set_group_aux_active(model: nn.Module, active: bool) -> None:
    for _, layer in moe_layers(model):
        layer.group_aux_active = active
