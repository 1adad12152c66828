"""Ring attention for context parallel (`parallel.cp_comm=ring`, the default).

Shape legend: B batch, H query heads, Hkv key/value heads, Sl = S / cp local tokens, Sc = Sl / 2
one chunk, K qk head dim, V v head dim.

Each rank keeps its queries and passes its key/value block around the cp group: at step s it
attends to the block of rank (r - s) mod cp while the next hop is already in flight (isend/irecv,
`_start_shift`). Per-block outputs come with their log-sum-exp and merge exactly (online
softmax): out = sum_i exp(lse_i - lse) out_i with lse = logsumexp_i lse_i.

With load-balanced sharding (rank r holds chunks r and 2cp-1-r) no block off the diagonal needs a
mask, as in megatron-core's ring: the block of a rank j < r is seen by all local queries through
its first chunk only (its second chunk lies after both local chunks); the block of a rank j > r
is seen whole by the local second chunk only. Those fully masked halves are skipped; only the own
block (step 0) is causal.

`RingAttention` is one autograd.Function with its own backward, which sends the blocks around
the ring a second time; each block's dK/dV accumulator travels with it and one last hop brings
it home. Only the local q, k, v, output and log-sum-exp are saved, so a rank never holds more
than two blocks of keys and values (the all-gather flavour keeps the whole sequence's for
backward). Each block runs on CPU through the flash kernel that returns the log-sum-exp
(`_scaled_dot_product_flash_attention_for_cpu` and its backward, fed the global output and
log-sum-exp); elsewhere through plain float32 math (scores materialised per block and head,
freed after it). Wiring the CUDA flash/efficient kernels the same way is the GPU speed-up left.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _start_shift(tensors, group, step: int = 1):
    """Posts sends of `tensors` to rank (r + step) mod cp and receives of the same shapes from rank
    (r - step) mod cp, non-blocking: returns the receive buffers and the requests to wait on."""
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    to = dist.get_global_rank(group, (rank + step) % cp)
    frm = dist.get_global_rank(group, (rank - step) % cp)
    ops, outs = [], []
    for x in tensors:
        x = x.contiguous()
        outs.append(torch.empty_like(x))
        ops += [dist.P2POp(dist.isend, x, to, group), dist.P2POp(dist.irecv, outs[-1], frm, group)]
    return outs, dist.batch_isend_irecv(ops)


def _finish(outs, reqs):
    for req in reqs:
        req.wait()
    return outs


def _block_views(step: int, rank: int, cp: int, Sc: int):
    """(query rows, key rows, causal) that the block held at `step` contributes through, under the
    load-balanced sharding: the own block causally; an earlier rank's block through its first
    chunk to every query; a later rank's whole block to the second query chunk only."""
    src = (rank - step) % cp
    if step == 0:
        return slice(None), slice(None), True
    if src < rank:
        return slice(None), slice(0, Sc), False
    return slice(Sc, None), slice(None), False


def _expand_kv(x_BHkvSD: torch.Tensor, H: int) -> torch.Tensor:
    """Grouped-query: query head h reads kv head h // (H / Hkv), as SDPA's enable_gqa."""
    Hkv = x_BHkvSD.shape[1]
    return x_BHkvSD if Hkv == H else x_BHkvSD.repeat_interleave(H // Hkv, dim=1)


def _scores(q_BHSK, k_BHSK, scale: float, causal: bool) -> torch.Tensor:
    scores = torch.matmul(q_BHSK.float(), _expand_kv(k_BHSK, q_BHSK.shape[1]).float().transpose(-1, -2)) * scale
    if causal:  # q and k hold the same positions: query i sees keys <= i
        Sq, Sk = scores.shape[-2:]
        visible = torch.ones(Sq, Sk, dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~visible, float("-inf"))
    return scores


def math_block_attention(q_BHSK, k_BHSK, v_BHSV, scale: float, causal: bool):
    """Attention of q over one key/value block in plain float32 math: output [B,H,Sq,V] and its
    log-sum-exp [B,H,Sq]."""
    scores = _scores(q_BHSK, k_BHSK, scale, causal)
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.exp(scores - lse.unsqueeze(-1)), _expand_kv(v_BHSV, q_BHSK.shape[1]).float())
    return out, lse


def math_block_attention_backward(q_BHSK, k_BHSK, v_BHSV, dout_BHSV, out_BHSV, lse_BHS, scale: float, causal: bool):
    """Gradients (float32) of one block's share of the attention, given the rows' global output
    and log-sum-exp: P = exp(S - lse), delta = rowsum(dO * O), dV = P^T dO,
    dS = P (dO V^T - delta), dQ = dS K scale, dK = dS^T Q scale (kv-head gradients summed over
    their query heads)."""
    H, Hkv = q_BHSK.shape[1], k_BHSK.shape[1]
    p = torch.exp(_scores(q_BHSK, k_BHSK, scale, causal) - lse_BHS.unsqueeze(-1))
    dout = dout_BHSV.float()
    delta = (dout * out_BHSV).sum(-1, keepdim=True)
    dv = torch.matmul(p.transpose(-1, -2), dout)
    ds = p * (torch.matmul(dout, _expand_kv(v_BHSV, H).float().transpose(-1, -2)) - delta)
    dq = torch.matmul(ds, _expand_kv(k_BHSK, H).float()) * scale
    dk = torch.matmul(ds.transpose(-1, -2), q_BHSK.float()) * scale
    if H != Hkv:
        B, _, S, _ = dk.shape
        dk, dv = dk.view(B, Hkv, H // Hkv, S, -1).sum(2), dv.view(B, Hkv, H // Hkv, S, -1).sum(2)
    return dq, dk, dv


def _pad(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x if x.shape[-1] == dim else F.pad(x, (0, dim - x.shape[-1]))


def _fused(x: torch.Tensor) -> bool:
    """The CPU flash kernel (returns the log-sum-exp; its backward takes the global output and
    log-sum-exp, as a ring needs). Other devices use the math path."""
    return x.device.type == "cpu" and FUSED_CPU


FUSED_CPU = True  # tests switch it off to check the math path against the kernel


def block_attention(q_BHSK, k_BHSK, v_BHSV, scale: float, causal: bool):
    """Output [B,H,Sq,V] (float32) and log-sum-exp [B,H,Sq] of q over one key/value block. With
    `causal`, q and k hold the same positions (query i sees keys <= i). The CPU kernel wants one
    head size, so MLA's qk and v dims are zero-padded to the larger (scores and outputs unchanged)."""
    if not _fused(q_BHSK):
        return math_block_attention(q_BHSK, k_BHSK, v_BHSV, scale, causal)
    K, V = q_BHSK.shape[-1], v_BHSV.shape[-1]
    D = max(K, V)
    q, k, v = (_pad(x.float().contiguous(), D) for x in (q_BHSK, k_BHSK, v_BHSV))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    return out[..., :V], lse


def block_attention_backward(q_BHSK, k_BHSK, v_BHSV, dout_BHSV, out_BHSV, lse_BHS, scale: float, causal: bool):
    """dq [B,H,Sq,K], dk [B,Hkv,Sk,K], dv [B,Hkv,Sk,V] (float32) of one block's share, from the rows'
    global output and log-sum-exp."""
    if not _fused(q_BHSK):
        return math_block_attention_backward(q_BHSK, k_BHSK, v_BHSV, dout_BHSV, out_BHSV, lse_BHS, scale, causal)
    K, V = q_BHSK.shape[-1], v_BHSV.shape[-1]
    D = max(K, V)
    q, k, v, dout, out = (_pad(x.float().contiguous(), D) for x in (q_BHSK, k_BHSK, v_BHSV, dout_BHSV, out_BHSV))
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse_BHS.contiguous(), 0.0, causal, scale=scale)
    return dq[..., :K], dk[..., :K], dv[..., :V]


def merge(out_a, lse_a, out_b, lse_b):
    """Exact softmax merge of two partial attentions over disjoint key sets."""
    lse = torch.logaddexp(lse_a, lse_b)
    out = out_a * torch.exp(lse_a - lse).unsqueeze(-1) + out_b * torch.exp(lse_b - lse).unsqueeze(-1)
    return out, lse


class RingAttention(torch.autograd.Function):
    """Causal attention of this rank's load-balanced queries over the cp group's whole sequence.

    Forward: the key/value blocks go once around the ring (the next hop posted before the current
    block is computed), partial outputs merge by log-sum-exp. Backward: the blocks go around again
    and each block's dK/dV accumulator travels with it, one last hop bringing it home; only the
    local q, k, v, output and log-sum-exp are saved."""

    @staticmethod
    def forward(ctx, q_BHSK, k_BHSK, v_BHSV, scale: float, group):
        # the block math is float32 by design: an enclosing bf16 autocast must not downcast it
        with torch.autocast(q_BHSK.device.type, enabled=False):
            out, lse = _ring_forward(q_BHSK, k_BHSK, v_BHSV, scale, group)
        ctx.save_for_backward(q_BHSK, k_BHSK, v_BHSV, out, lse)
        ctx.scale, ctx.group = scale, group
        return out.to(q_BHSK.dtype)

    @staticmethod
    def backward(ctx, dout_BHSV):
        with torch.autocast(dout_BHSV.device.type, enabled=False):
            return _ring_backward(ctx, dout_BHSV)


def _ring_forward(q_BHSK, k_BHSK, v_BHSV, scale: float, group):
    """Output [B,H,Sl,V] and log-sum-exp [B,H,Sl] (float32) over all blocks of the ring."""
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    Sc = q_BHSK.shape[2] // 2
    k, v = k_BHSK, v_BHSV
    out = lse = None
    for step in range(cp):
        pending = _start_shift((k, v), group) if step + 1 < cp else None
        rows, keys, causal = _block_views(step, rank, cp, Sc)
        o, l = block_attention(q_BHSK[:, :, rows], k[:, :, keys], v[:, :, keys], scale, causal)
        if out is None:
            out, lse = o, l
        else:
            out[:, :, rows], lse[:, :, rows] = merge(out[:, :, rows], lse[:, :, rows], o, l)
        if pending is not None:
            k, v = _finish(*pending)
    return out, lse


def _ring_backward(ctx, dout_BHSV):
    """dq, dk, dv of the local inputs: the blocks go around again, dK/dV travel with them."""
    q, k, v, out, lse = ctx.saved_tensors
    group, scale = ctx.group, ctx.scale
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    Sc = q.shape[2] // 2
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    for step in range(cp):
        pending = _start_shift((k, v), group) if step + 1 < cp else None
        rows, keys, causal = _block_views(step, rank, cp, Sc)
        gq, gk, gv = block_attention_backward(q[:, :, rows], k[:, :, keys], v[:, :, keys], dout_BHSV[:, :, rows],
                                              out[:, :, rows], lse[:, :, rows], scale, causal)
        dq[:, :, rows] += gq
        dk[:, :, keys] += gk
        dv[:, :, keys] += gv
        dk, dv = _finish(*_start_shift((dk, dv), group))  # the gradients follow their block
        if pending is not None:
            k, v = _finish(*pending)
    # after cp hops every block's dK/dV accumulator is back on the rank that owns the block
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


@torch.compiler.disable  # dynamo cannot trace batched p2p ops: a compiled block breaks its graph here
def ring_attention(q_BHSK, k_BHSK, v_BHSV, scale: float, group) -> torch.Tensor:
    """Causal attention of this rank's (load-balanced) queries over the whole sequence of the cp
    group, the key/value blocks travelling around the ring."""
    return RingAttention.apply(q_BHSK, k_BHSK, v_BHSV, scale, group)


class RingSDPA(nn.Module):
    """Drop-in for model.attention.CausalSDPA under context parallel with `cp_comm=ring`; expects
    the load-balanced sharding of parallel/context_parallel.py."""

    def __init__(self, group):
        super().__init__()
        self.group = group

    def forward(self, q_BHSK, k_BHSK, v_BHSV, scale: float) -> torch.Tensor:
        return ring_attention(q_BHSK, k_BHSK, v_BHSV, scale, self.group)
