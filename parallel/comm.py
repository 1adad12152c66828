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
