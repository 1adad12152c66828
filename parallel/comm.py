"""Autograd-aware collectives, one autograd.Function per op (each tested on its own)."""

from __future__ import annotations

import torch
import torch.distributed as dist


class AllToAllSingle(torch.autograd.Function):
    """Uneven all-to-all of rows: rank r sends input rows split by `send_splits` and receives rows
    split by `recv_splits`. The backward is the same exchange with the splits swapped."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group) -> torch.Tensor:
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        return _all_to_all(x, send_splits, recv_splits, group)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_in = _all_to_all(grad_out.contiguous(), ctx.recv_splits, ctx.send_splits, ctx.group)
        return grad_in, None, None, None


def _all_to_all(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group) -> torch.Tensor:
    out = x.new_empty((sum(recv_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
    return out


def all_to_all_single(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group) -> torch.Tensor:
    return AllToAllSingle.apply(x, send_splits, recv_splits, group)


# Newer torch (2.13 here) renames all_gather_into_tensor / reduce_scatter_tensor (the old names print a
# FutureWarning on every call, once per rank); same semantics, older torch keeps the old names.
_all_gather_single = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)


class GatherSequence(torch.autograd.Function):
    """All-gather of [B, S/n, ...] sequence shards into [B, S, ...] over `group` (rank i holds the
    i-th chunk); the backward reduce-scatters: each rank's computation on the full sequence adds
    its share to the gradient of every shard (megatron's gather_from_sequence_parallel_region)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        n = dist.get_world_size(group)
        out = x.new_empty((n * x.shape[0], *x.shape[1:]))
        _all_gather_single(out, x.contiguous(), group=group)
        return out.view(n, *x.shape).movedim(0, 1).flatten(1, 2)  # [n, B, S/n, ...] -> [B, S, ...]

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        n = dist.get_world_size(ctx.group)
        B, S = grad_out.shape[:2]
        chunks = grad_out.reshape(B, n, S // n, *grad_out.shape[2:]).movedim(1, 0).contiguous()
        grad_in = grad_out.new_empty(chunks.shape[1:])
        _reduce_scatter_single(grad_in, chunks.flatten(0, 1), group=ctx.group)
        return grad_in, None


def gather_sequence(x: torch.Tensor, group) -> torch.Tensor:
    return GatherSequence.apply(x, group)
