"""Context parallel: every sequence split over `cp` ranks, attention over the whole sequence.

Shape legend: B batch, S full sequence, Sl = S / cp local tokens, H heads, K qk head dim, V v head dim.

Load-balanced causal sharding: the sequence is cut into 2*cp chunks and rank r holds chunks r and
2*cp-1-r, so every rank owns as many early (cheap) as late (expensive) causal rows. Attention
(`parallel.cp_comm`) either passes key/value blocks around the cp group (`ring`, the default:
parallel/ring_attention.py, megatron-core's cp_comm_type=p2p) or gathers keys and values of the
whole sequence (`all_gather`: `AllGatherSequence`, all-gather forward, sum-and-slice backward) and
masks by global positions (megatron-core's cp_comm_type=all_gather); queries, MLPs/experts, norms and
activations stay split. Everything outside attention is per token, so it runs on the local tokens
unchanged, except the MoE auxiliary losses, which couple all tokens of a micro-batch: they are
computed on the routing gathered from the group (`gather_routing`). The loss is a mean over the cp group's tokens and parameter gradients are averaged over
the group like data parallel.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mohge.model.moe.layer import MoHGELayer

CP_COMMS = ("ring", "all_gather")  # parallel.cp_comm: how attention sees the other ranks' keys


def load_balanced_positions(seq_len: int, cp: int, rank: int, device=None) -> torch.Tensor:
    """Global positions [Sl] held by `rank`: chunks rank and 2*cp-1-rank of 2*cp equal chunks."""
    if seq_len % (2 * cp):
        raise ValueError(f"train.seq_len: {seq_len} must be divisible by 2 * parallel.cp = {2 * cp}")
    chunk = seq_len // (2 * cp)
    first = torch.arange(rank * chunk, (rank + 1) * chunk, device=device)
    second = torch.arange((2 * cp - 1 - rank) * chunk, (2 * cp - rank) * chunk, device=device)
    return torch.cat([first, second])


def shard_sequence(x_BS: torch.Tensor, cp: int, rank: int) -> torch.Tensor:
    """This rank's tokens (dim 1) of a full-sequence batch."""
    return x_BS[:, load_balanced_positions(x_BS.shape[1], cp, rank, x_BS.device)]


class AllGatherSequence(torch.autograd.Function):
    """All-gather along `dim` (local parts concatenated in rank order); backward sums the gradient
    over the group and keeps this rank's slice (a reduce-scatter; gloo has none)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group, dim: int = 2) -> torch.Tensor:
        ctx.group, ctx.rank, ctx.local, ctx.dim = group, dist.get_rank(group), x.shape[dim], dim
        return _all_gather(x, group, dim)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad = grad_out.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad.narrow(ctx.dim, ctx.rank * ctx.local, ctx.local).contiguous(), None, None


def _all_gather(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def gather_routing(routing, group):
    """The routing of all the cp group's tokens (token dim 0 of every field): differentiable fields
    through AllGatherSequence, index/mask fields plainly (bool travels as uint8)."""
    fields = {}
    for f in dataclasses.fields(routing):
        x = getattr(routing, f.name)
        if x is None:  # optional fields (e.g. keep_TK without top-p)
            continue
        if x.requires_grad:
            fields[f.name] = AllGatherSequence.apply(x, group, 0)
        elif x.dtype == torch.bool:
            fields[f.name] = _all_gather(x.to(torch.uint8), group, 0).bool()
        else:
            fields[f.name] = _all_gather(x, group, 0)
    return dataclasses.replace(routing, **fields)


def _global_aux_losses(layer, group):
    """MoHGELayer.aux_losses over the whole sequences of the cp group: the losses are products of
    token sums (P . c / T^2), so every rank computes them on the gathered routing. Each rank then
    attaches the same global value; the gather's backward sums the cp ranks' gradients, which the
    cp gradient average turns back into exactly one copy."""
    local_aux_losses = layer.aux_losses

    def aux_losses(routing, batch_size: int = 1):
        # gathered tokens are ordered by cp rank, not by sequence: only token sums are meaningful
        # (balance_scope=sequence is refused with cp > 1, see validate_context_parallel)
        return local_aux_losses(gather_routing(routing, group), batch_size)

    return aux_losses


class ContextParallelSDPA(nn.Module):
    """Drop-in for model.attention.CausalSDPA: local queries attend over the gathered sequence,
    causally by global position."""

    def __init__(self, group, positions_Sl: torch.Tensor, all_positions_S: torch.Tensor):
        super().__init__()
        self.group = group
        # mask [Sl, S]: query at global position p sees keys at positions <= p. A plain attribute,
        # not a buffer: to_empty() after parallelize would leave a buffer uninitialised.
        self.mask_SlS = positions_Sl[:, None] >= all_positions_S[None, :]

    def forward(self, q_BHSK, k_BHSK, v_BHSV, scale: float) -> torch.Tensor:
        k_full = AllGatherSequence.apply(k_BHSK, self.group, 2)
        v_full = AllGatherSequence.apply(v_BHSV, self.group, 2)
        if self.mask_SlS.device != q_BHSK.device:
            self.mask_SlS = self.mask_SlS.to(q_BHSK.device)
        return F.scaled_dot_product_attention(
            q_BHSK, k_full, v_full, attn_mask=self.mask_SlS, scale=scale,
            enable_gqa=q_BHSK.shape[1] != k_full.shape[1],
        )


def apply_context_parallel(model: nn.Module, group, seq_len: int, comm: str = "ring") -> torch.Tensor:
    """Makes `model` (a plain mohge Transformer) run on this rank's share of every sequence of
    length `seq_len`, attention through `comm` ("ring" or "all_gather"); returns the global
    positions [Sl] of the tokens it must be fed."""
    from mohge.parallel.ring_attention import RingSDPA

    if comm not in CP_COMMS:
        raise ValueError(f"parallel.cp_comm: must be one of {CP_COMMS} (got {comm!r})")
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    positions = load_balanced_positions(seq_len, cp, rank)
    all_positions = torch.cat([load_balanced_positions(seq_len, cp, r) for r in range(cp)])
    model.positions = positions
    for block in model.layers.values():
        block.attention.core = (RingSDPA(group) if comm == "ring"
                                else ContextParallelSDPA(group, positions, all_positions))
        if isinstance(block.ffn, MoHGELayer):  # aux losses over the whole sequences
            block.ffn.aux_losses = _global_aux_losses(block.ffn, group)
    return positions


# ---- trainer wiring: cp is carved out of the data-parallel ranks, as ep is -------------------
def validate_context_parallel(run_cfg) -> None:
    """parallel.cp: divides the data-parallel degree and splits train.seq_len into 2*cp chunks
    (each of which sequence parallel can split again over tp)."""
    from mohge.model.config import ConfigError

    p, cp = run_cfg.parallel, run_cfg.parallel.cp
    if cp < 1:
        raise ConfigError(f"parallel.cp: must be >= 1 (got {cp})")
    if p.cp_comm not in CP_COMMS:
        raise ConfigError(f"parallel.cp_comm: must be one of {CP_COMMS} (got {p.cp_comm!r})")
    if cp > 1 and run_cfg.model.moe.balance_scope == "sequence":
        raise ConfigError("model.moe.balance_scope=sequence: not supported with parallel.cp > 1 yet (a sequence's "
                          "tokens live on several ranks); use micro_batch or global_batch, or parallel.cp=1")
    if cp == 1:
        if p.cp_comm != "ring":
            raise ConfigError(f"parallel.cp_comm={p.cp_comm}: only applies with parallel.cp > 1; set parallel.cp or "
                              "drop parallel.cp_comm")
        return
    dp = p.dp_replicate * p.dp_shard
    if dp % cp:
        raise ConfigError(f"parallel.cp: {cp} must divide the data-parallel degree dp_replicate x dp_shard = {dp} "
                          "(context-parallel ranks are carved out of the data-parallel ones)")
    if run_cfg.train.seq_len % (2 * cp):
        raise ConfigError(f"train.seq_len: {run_cfg.train.seq_len} must be divisible by 2 * parallel.cp = {2 * cp} "
                          "(load-balanced causal sharding)")
    local = run_cfg.train.seq_len // cp
    if p.tp > 1 and p.sequence_parallel and local % p.tp:
        raise ConfigError(f"train.seq_len: each cp rank holds {local} tokens per sequence, which sequence parallel "
                          f"must split over parallel.tp={p.tp}; change seq_len or parallel.sequence_parallel=false")


def build_cp_group(dims, rank: int, cp: int):
    """This rank's cp group: `cp` consecutive data-parallel indices (same pp and tp coordinates).
    Every rank creates every group, in the same order, as new_group requires."""
    mine = None
    for pp_i in range(dims.pp):
        for tp_i in range(dims.tp):
            for block in range(dims.dp // cp):
                ranks = [pp_i * dims.tp * dims.dp + (block * cp + j) * dims.tp + tp_i for j in range(cp)]
                group = dist.new_group(ranks)
                if rank in ranks:
                    mine = group
    return mine


class ContextParallelData:
    """Wraps a data source: every batch it hands out holds only this rank's `positions`."""

    def __init__(self, source, positions: torch.Tensor):
        self.source, self.positions = source, positions

    def next_train_batch(self):
        tokens, labels = self.source.next_train_batch()
        return tokens[:, self.positions], labels[:, self.positions]

    def valid_batches(self, num_batches: int):
        for tokens, labels in self.source.valid_batches(num_batches):
            yield tokens[:, self.positions], labels[:, self.positions]

    def state_dict(self):
        return self.source.state_dict()

    def load_state_dict(self, state) -> None:
        self.source.load_state_dict(state)
