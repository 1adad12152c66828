"""Turns a plain Transformer into a distributed one (gradient sync: parallel/grads.py).

Order (fixed): pipeline split -> expert parallel -> tensor parallel (-> MoE folding) -> activation
checkpointing -> compile -> data parallel. Each step lives in its own module; this file only sequences them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from mohge.parallel.dims import ParallelDims
from mohge.parallel.grads import is_dtensor


@dataclass
class ParallelContext:
    """What the training loop needs to know about its place in the job."""

    dims: ParallelDims
    rank: int = 0
    device: torch.device = torch.device("cpu")
    dense_mesh: Optional[object] = None  # DeviceMesh (pp, dp_replicate, dp_shard, tp)
    expert_mesh: Optional[object] = None  # DeviceMesh (pp, edp_replicate, edp_shard, ep, etp)

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

        apply_tensor_parallel(model, ctx.dense_mesh["tp"], cfg.parallel.sequence_parallel, dims.moe_fold)
    if dims.moe_fold:  # ep over tp x dp: each tp rank dispatches its own sequence shard
        from mohge.parallel.moe_folding import apply_moe_folding

        apply_moe_folding(model, ctx.dense_mesh["tp"])
    if cfg.train.fp8 != "none":
        from mohge.train.fp8 import apply_fp8

        apply_fp8(model, cfg.train.fp8, ctx.device, tensor_parallel=dims.tp > 1, experts=cfg.train.fp8_experts)
    from mohge.parallel.activation_checkpoint import apply_activation_checkpointing

    apply_activation_checkpointing(model, cfg.parallel.activation_checkpoint)
    if cfg.train.compile:
        from mohge.parallel.compile import apply_compile

        apply_compile(model, cfg.train.compile_backend, expert_parallel=dims.ep > 1, tensor_parallel=dims.tp > 1,
                      ring_attention=cfg.parallel.cp > 1 and cfg.parallel.cp_comm == "ring")
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


def scalar(value: torch.Tensor) -> float:
    """A loss as a float, also when tensor parallel made it a (replicated) DTensor."""
    value = value.detach()
    return float(value.full_tensor() if is_dtensor(value) else value)
