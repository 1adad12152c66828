"""Turns a plain Transformer into a distributed one, and syncs its gradients.

Order (fixed): pipeline split -> expert parallel -> tensor parallel -> activation checkpointing ->
compile -> data parallel. Each step lives in its own module; this file only sequences them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from mohge.parallel.dims import ParallelDims


@dataclass
class ParallelContext:
    """What the training loop needs to know about its place in the job."""

    dims: ParallelDims
    rank: int = 0
    device: torch.device = torch.device("cpu")
    dense_mesh: Optional[object] = None  # DeviceMesh (pp, dp_replicate, dp_shard, tp)
    expert_mesh: Optional[object] = None  # DeviceMesh (pp, edp_replicate, edp_shard, ep, tp)

    @property
    def distributed(self) -> bool:
        return self.dims.world_size > 1

    @property
    def coords(self) -> dict[str, int]:
        return self.dims.coords(self.rank)

    @property
    def dp_rank(self) -> int:
        return self.coords["dp"]

    @property
    def is_log_rank(self) -> bool:
        return self.rank == 0

    def group(self, name: str):
        """Process group of one named dimension ('dp' flattens dp_replicate x dp_shard)."""
        if not self.distributed:
            return None
        if name == "world":
            return dist.group.WORLD
        if name == "edp":
            return self.expert_mesh["edp_replicate", "edp_shard"]._flatten("edp").get_group()
        if name in ("ep", "edp_replicate", "edp_shard"):
            return self.expert_mesh.get_group(name)
        if name == "dp":
            return self.dense_mesh["dp_replicate", "dp_shard"]._flatten("dp").get_group()
        return self.dense_mesh.get_group(name)


def is_expert_param(name: str) -> bool:
    return ".experts." in name


def parallelize_model(model: nn.Module, ctx: ParallelContext, cfg) -> nn.Module:
    """Applies every parallel dimension of `cfg.parallel` to a model built on meta."""
    dims = ctx.dims
    if dims.pp > 1:  # prune first: the other dimensions then see only this rank's modules
        from mohge.parallel.pipeline import split_model

        p = cfg.parallel
        stage_specs = split_model(model, ctx.coords["pp"], dims.pp, p.pp_virtual_stages, p.pp_layer_split)
    if dims.ep > 1:
        from mohge.parallel.expert_parallel import apply_expert_parallel

        apply_expert_parallel(model, ctx, cfg.model.moe)
    if dims.tp > 1:
        from mohge.parallel.tensor_parallel import apply_tensor_parallel

        apply_tensor_parallel(model, ctx.dense_mesh["tp"], cfg.parallel.sequence_parallel)
    if cfg.train.fp8 != "none":
        from mohge.train.fp8 import apply_fp8

        apply_fp8(model, cfg.train.fp8, ctx.device, tensor_parallel=dims.tp > 1, experts=cfg.train.fp8_experts)
    from mohge.parallel.activation_checkpoint import apply_activation_checkpointing

    apply_activation_checkpointing(model, cfg.parallel.activation_checkpoint)
    if cfg.train.compile:
        from mohge.parallel.compile import apply_compile

        apply_compile(model, cfg.train.compile_backend, expert_parallel=dims.ep > 1)
    if dims.pp > 1:
        from mohge.parallel.pipeline import build_stages

        model.pipeline_stages = build_stages(model, stage_specs)
    if dims.dp_shard > 1:
        from mohge.parallel.data_parallel import apply_fsdp

        apply_fsdp(model, fsdp_mesh(ctx), expert_parallel=dims.ep > 1, stages=getattr(model, "pipeline_stages", None),
                   expert_mesh=expert_fsdp_mesh(ctx), expert_divide_factor=dims.dp,
                   sum_reduction=ctx.distributed and dist.get_backend() != "nccl")
    return model


def fsdp_mesh(ctx: ParallelContext):
    """dp_shard (FSDP), or (dp_replicate, dp_shard) for HSDP."""
    if ctx.dims.dp_replicate > 1:
        return ctx.dense_mesh["dp_replicate", "dp_shard"]
    return ctx.dense_mesh["dp_shard"]


def expert_fsdp_mesh(ctx: ParallelContext):
    """Mesh the routed experts are sharded over under expert parallel: edp_shard, or
    (edp_replicate, edp_shard) for HSDP; None where they stay whole (edp_shard == 1)."""
    dims = ctx.dims
    if dims.ep == 1 or dims.edp_shard == 1:
        return None
    if dims.edp_replicate > 1:
        return ctx.expert_mesh["edp_replicate", "edp_shard"]
    return ctx.expert_mesh["edp_shard"]


def is_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "device_mesh")


def scalar(value: torch.Tensor) -> float:
    """A loss as a float, also when tensor parallel made it a (replicated) DTensor."""
    value = value.detach()
    return float(value.full_tensor() if is_dtensor(value) else value)


@torch.no_grad()
def sync_gradients(model: nn.Module, ctx: ParallelContext) -> None:
    """Averages gradients over data-parallel ranks so each equals the single-process gradient of
    the whole global batch: dense grads summed over dp, expert grads over the expert replicas
    (edp; the all-to-all already summed the ep ranks' tokens), both divided by dp. Gradients FSDP
    manages arrive averaged already and are left alone."""
    for param in model.parameters():
        if param.grad is None:  # e.g. experts that received no token: every rank must send alike
            param.grad = torch.zeros_like(param)
    if not ctx.distributed or ctx.dims.dp == 1:
        return
    # FSDP (dp_shard) averages every gradient it manages over data-parallel ranks itself; without
    # it, tensor-parallel (DTensor) gradients are reduced here through their local shards.
    fsdp = ctx.dims.dp_shard > 1
    plain = [(n, p.grad.to_local() if is_dtensor(p.grad) else p.grad) for n, p in model.named_parameters()
             if p.grad is not None and not (fsdp and is_dtensor(p.grad))]
    dense = [g for n, g in plain if not is_expert_param(n)]
    expert = [g for n, g in plain if is_expert_param(n)]
    for grads, group in ((dense, ctx.group("dp")), (expert, ctx.group("edp") if ctx.dims.edp > 1 else None)):
        if not grads:
            continue
        flat = torch.cat([g.flatten() for g in grads])
        if group is not None:
            dist.all_reduce(flat, group=group)
        flat.div_(ctx.dims.dp)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


@torch.no_grad()
def global_grad_norm(model: nn.Module, ctx: ParallelContext) -> torch.Tensor:
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
