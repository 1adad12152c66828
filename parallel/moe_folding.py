"""MoE parallel folding (arXiv 2504.14960): attention keeps tensor parallel (tp ranks hold
distinct sequence shards under sequence parallel) while the routed experts run with expert-tp 1
and expert parallel over the folded tp x dp ranks (ParallelDims.moe_fold).

Shape legend: B batch, S sequence, n tp ranks, Sl = S / n (this rank's shard), T = B*S tokens,
Tl = B*Sl, K experts per token, D model dim.

Per MoE layer, on every tp rank:
  gather   the rank's [B, Sl, D] shard -> [B, S, D] (GatherSequence: reduce-scatter backward)
  route    the whole sequence, as the single process does: routing, capacity drops, aux losses
           and routing statistics are the same on every tp rank
  dispatch only this rank's Tl tokens, over the folded ep group (FoldedDispatcher); the shared
           experts likewise run on this rank's Tl tokens only
  split    the output back to the rank's shard (a slice: its backward pads zeros)
So the output gradient is non-zero on this rank's tokens only, the router's and shared experts'
gradients are partial sums over tp (grads.sync_gradients sums them), and the aux-loss gradient is
scaled by 1/n on each rank so the tp sum counts it once.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from mohge.model.moe.layer import moe_layers
from mohge.parallel.comm import gather_sequence


class FoldedDispatcher:
    """Dispatches this tp rank's share of the layer's tokens through the folded all-to-all
    dispatcher, and returns [T, K, D] outputs that are zero on the other tp ranks' tokens."""

    folded = True

    def __init__(self, inner, tp_rank: int, tp_size: int):
        self.inner, self.tp_rank, self.tp_size = inner, tp_rank, tp_size
        self.batch = 1  # sequences in this forward, set by `gather_input` (the layer sees [T, D])

    def _local(self, t_TX: torch.Tensor) -> torch.Tensor:
        """Rows of this rank's sequence shard: [B*S, ...] -> [B*Sl, ...]."""
        B, n = self.batch, self.tp_size
        return t_TX.view(B, n, -1, *t_TX.shape[1:])[:, self.tp_rank].flatten(0, 1)

    def dispatch(self, x_TD: torch.Tensor, expert_idx_TK: torch.Tensor):
        return self.inner.dispatch(self._local(x_TD), self._local(expert_idx_TK))

    def full(self, t_TlX: torch.Tensor) -> torch.Tensor:
        """This rank's rows back in place among zeros: [B*Sl, ...] -> [B*S, ...]."""
        B, n = self.batch, self.tp_size
        t_BnSlX = t_TlX.new_zeros(B, n, t_TlX.shape[0] // B, *t_TlX.shape[1:])
        t_BnSlX[:, self.tp_rank] = t_TlX.view(B, -1, *t_TlX.shape[1:])
        return t_BnSlX.flatten(0, 2)

    def combine(self, y_local: torch.Tensor, handle) -> torch.Tensor:
        return self.full(self.inner.combine(y_local, handle))


def apply_moe_folding(model: nn.Module, tp_mesh) -> None:
    """Every MoE layer (already under expert parallel over the folded ep group) takes its tp
    rank's sequence shard in and gives it back out; call after tensor parallel. The gather and
    split sit at the layer's boundary as pre/post-forward hooks, where tensor parallel's
    PrepareModuleInput/Output put the unfolded layer's gather and split (so parameter names, and
    checkpoints, are the plain model's)."""
    group, rank, size = tp_mesh.get_group(), tp_mesh.get_local_rank(), tp_mesh.size()

    def gather_input(layer, args):
        (x_BSlD,) = args
        if isinstance(x_BSlD, DTensor):  # Shard(1) from the sequence-parallel ffn_norm
            x_BSlD = x_BSlD.to_local()
        layer.dispatcher.batch = x_BSlD.shape[0]
        return (gather_sequence(x_BSlD, group),)

    def split_output(layer, args, out_BSD):
        Sl = out_BSD.shape[1] // size
        return out_BSD[:, rank * Sl : (rank + 1) * Sl]  # a local tensor, as the residual stream under SP

    for _, layer in moe_layers(model):
        layer.dispatcher = dispatcher = FoldedDispatcher(layer.dispatcher, rank, size)
        layer.aux_grad_scale = 1.0 / size
        layer.register_forward_pre_hook(gather_input)
        layer.register_forward_hook(split_output)
        if layer.shared is not None:  # shared experts on this rank's rows only (the rest is split off)
            layer.shared.register_forward_pre_hook(lambda m, args, d=dispatcher: (d._local(args[0]),))
            layer.shared.register_forward_hook(lambda m, args, out, d=dispatcher: d.full(out))


def folded_partial_params(model: nn.Module) -> list[nn.Parameter]:
    """Parameters whose gradients are partial sums over tp under folding: everything of a folded
    MoE layer but its routed experts (router, shared experts)."""
    return [p for _, layer in moe_layers(model) if getattr(layer.dispatcher, "folded", False)
            for n, p in layer.named_parameters() if not n.startswith("experts.")]
