"""Gradients after backward: averaged over data-parallel ranks, their global norm, and clipping.

The trainer calls, once per optimizer step: `sync_gradients` (which first divides by the
micro-batch count) -> `global_grad_norm` -> `clip_gradients`. Every layout then holds the gradient
of the same global batch, and the norm counts each parameter element exactly once.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def is_expert_param(name: str) -> bool:
    return ".experts." in name


def is_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "device_mesh")


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a (DTensor) gradient, as the tensor that stores it."""
    return t.to_local() if is_dtensor(t) else t


def _all_reduce_flat(grads: list[torch.Tensor], group, divide: int = 1) -> None:
    """Sums `grads` over `group` in one flat all-reduce (in place), then divides by `divide`."""
    if not grads:
        return
    flat = torch.cat([g.flatten() for g in grads])
    if group is not None:
        dist.all_reduce(flat, group=group)
    if divide != 1:
        flat.div_(divide)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


@torch.no_grad()
def sync_gradients(model: nn.Module, ctx, micro_batches: int = 1) -> None:
    """Averages gradients over data-parallel ranks so each equals the single-process gradient of
    the whole global batch: dense grads summed over dp, expert grads over the expert replicas
    (edp; the all-to-all already summed the ep ranks' tokens), both divided by dp. Gradients FSDP
    manages arrive averaged already and are left alone. Under MoE folding the non-expert
    parameters of MoE layers are first summed over tp (parallel/moe_folding.py). Each micro-batch
    backpropagated its own mean loss, so gradients are first divided by `micro_batches`."""
    for param in model.parameters():
        if param.grad is None:  # e.g. experts that received no token: every rank must send alike
            param.grad = torch.zeros_like(param)
        elif micro_batches != 1:
            param.grad.div_(micro_batches)
    if not ctx.distributed:
        return
    dims = ctx.dims
    if dims.moe_fold:  # router / shared experts saw only this tp rank's tokens: sum over tp
        from mohge.parallel.moe_folding import folded_partial_params

        _all_reduce_flat([local(p.grad) for p in folded_partial_params(model)], ctx.group("tp"))
    if dims.dp == 1 and dims.edp == 1:
        return
    # FSDP (dp_shard) averages every gradient it manages over data-parallel ranks itself; without
    # it, tensor-parallel (DTensor) gradients are reduced here through their local shards.
    fsdp = dims.dp_shard > 1
    plain = [(n, local(p.grad)) for n, p in model.named_parameters()
             if p.grad is not None and not (fsdp and is_dtensor(p.grad))]
    if dims.dp > 1:
        _all_reduce_flat([g for n, g in plain if not is_expert_param(n)], ctx.group("dp"), dims.dp)
    _all_reduce_flat([g for n, g in plain if is_expert_param(n)], ctx.group("edp") if dims.edp > 1 else None,
                     dims.dp)


@torch.no_grad()
def global_grad_norm(model: nn.Module, ctx) -> torch.Tensor:
    """L2 norm over all parameters of the model, each counted once (expert shards summed over ep)."""
    device = next(model.parameters()).device
    dense_sq = torch.zeros((), dtype=torch.float64, device=device)
    expert_sq = torch.zeros((), dtype=torch.float64, device=device)
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        sq = param.grad.detach().double().square().sum()
        if is_dtensor(sq):  # sharded or partial: the DTensor reduction counts each element once
            sq = sq.full_tensor()
        if is_expert_param(name):
            expert_sq += sq
        else:
            dense_sq += sq
    if ctx.distributed and ctx.dims.ep > 1:
        dist.all_reduce(expert_sq, group=ctx.group("ep"))
    total = dense_sq + expert_sq
    if ctx.distributed and ctx.dims.pp > 1:  # each stage holds different parameters
        dist.all_reduce(total, group=ctx.group("pp"))
    return total.sqrt()


@torch.no_grad()
def clip_gradients(model: nn.Module, grad_norm: torch.Tensor, max_norm: float) -> None:
    """Scales every gradient by min(1, max_norm / norm) (no-op for max_norm = 0); the norm is
    global, so every rank applies the same factor."""
    if max_norm <= 0:
        return
    clip = min(1.0, max_norm / (float(grad_norm) + 1e-6))
    if clip < 1.0:
        for param in model.parameters():
            if param.grad is not None:
                param.grad.mul_(clip)
