"""Tensor parallel (+ sequence parallel) through DTensor plans, applied to a plain model.

Attention: wq/wk/wv column-parallel (heads split over tp), wo row-parallel. Multi-head latent
attention (MLA): the head-wise up-projections wq (or wq_b) and wkv_b column-parallel, wo
row-parallel; the compressed projections (wq_a, wkv_a) and latent norms stay replicated plain
tensors, as megatron-core keeps them. Each column-parallel projection all-reduces the gradient of
its (replicated) input; the rotary key, shared by all heads, gets that all-reduce from
`AllReduceBackward`, so the replicated weights see identical, complete gradients on every tp rank;
so do the per-head qk-norm weights of grouped-query attention (`model.qk_norm`). Dense FFN: w1/w3
column-parallel, w2 row-parallel. Embedding vocab-parallel (row-wise), output head column-parallel
with its logits left sharded over the vocabulary: `loss_context()` computes the cross-entropy
without gathering them. With sequence parallel, norms and the residual stream are split along the
sequence between the tensor-parallel regions.

MoHGE layers run with expert-TP = 1: their input is gathered to the full (replicated) sequence,
every tp rank computes the same routing and experts, and the output is split back. Router and
expert weights stay plain tensors with identical gradients on every tp rank. (With
parallel.moe_fold the tp ranks' experts differ instead: parallel/moe_folding.py.)
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)

from mohge.model.attention import MultiLatentAttention
from mohge.model.moe.layer import MoHGELayer


class AllReduceBackward(torch.autograd.Function):
    """Identity forward, gradient all-reduce over `group` backward (megatron's
    copy_to_tensor_model_parallel_region): for a replicated activation consumed by sharded heads."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad = grad_out.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class GradAllReduce(nn.Module):
    """Module form of AllReduceBackward, swapped into MultiLatentAttention.shared_key_boundary."""

    def __init__(self, group):
        super().__init__()
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return AllReduceBackward.apply(x, self.group)


def _mla_plan(attention: MultiLatentAttention, tp_mesh, seq) -> dict:
    """Heads sharded (q / kv up-projections column-wise, wo row-wise), latents replicated."""
    attention.shared_key_boundary = GradAllReduce(tp_mesh.get_group())
    q_proj = "attention.wq_b" if attention.cfg.q_lora_rank else "attention.wq"
    return {
        # local (replicated) input: the replicated projections run as plain modules on it
        "attention": PrepareModuleInput(input_layouts=(seq, None), desired_input_layouts=(Replicate(), None),
                                        use_local_output=True),
        q_proj: ColwiseParallel(),
        "attention.wkv_b": ColwiseParallel(),
        "attention.wo": RowwiseParallel(output_layouts=seq),
    }


def apply_tensor_parallel(model: nn.Module, tp_mesh, sequence_parallel: bool, moe_fold: bool = False) -> None:
    """Shards `model` in place over `tp_mesh` (before weights are materialised). With `moe_fold`
    the MoE layers' boundaries are left to parallel/moe_folding.py."""
    seq = Shard(1) if sequence_parallel else Replicate()
    top = {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=seq),
        "output": ColwiseParallel(input_layouts=seq, output_layouts=Shard(-1), use_local_output=False),
    }
    if sequence_parallel:
        top["norm"] = SequenceParallel()
    parallelize_module(model, tp_mesh, top)
    for block in model.layers.values():
        plan = {
            "attention": PrepareModuleInput(input_layouts=(seq, None), desired_input_layouts=(Replicate(), None)),
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=seq),
        }
        if isinstance(block.attention, MultiLatentAttention):
            plan = _mla_plan(block.attention, tp_mesh, seq)
        elif block.attention.q_norm is not None:  # qk-norm weights see only this rank's heads
            block.attention.norm_weight_boundary = GradAllReduce(tp_mesh.get_group())
        if sequence_parallel:
            plan["attention_norm"] = SequenceParallel()
            plan["ffn_norm"] = SequenceParallel()
        if isinstance(block.ffn, MoHGELayer):
            if sequence_parallel and not moe_fold:  # gather the sequence for the experts, split it back after
                plan["ffn"] = PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(Replicate(),),
                                                 use_local_output=True)
                parallelize_module(block.ffn, tp_mesh, PrepareModuleOutput(
                    output_layouts=(Replicate(),), desired_output_layouts=(seq,)))
        else:
            plan.update({
                "ffn": PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(Replicate(),)),
                "ffn.w1": ColwiseParallel(),
                "ffn.w3": ColwiseParallel(),
                "ffn.w2": RowwiseParallel(output_layouts=seq),
            })
        parallelize_module(block, tp_mesh, plan)


def loss_context(tensor_parallel: bool):
    """Cross-entropy over vocabulary-sharded logits, without gathering them (forward and backward
    must both run inside)."""
    return loss_parallel() if tensor_parallel else nullcontext()
