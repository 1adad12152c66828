"""Ring attention for context parallel (`parallel.cp_comm=ring`, the default).

Shape legend: B batch, H query heads, Hkv key/value heads, Sl = S / cp local tokens, Sc = Sl / 2
one chunk, K qk head dim, V v head dim.

Each rank keeps its queries and passes its key/value block around the cp group: at step s it
attends to the block of rank (r - s) mod cp while that block travels one hop further
(`RingShift`, an isend/irecv pair). Per-block outputs come with their log-sum-exp and merge exactly
(online softmax): out = sum_i exp(lse_i - lse) out_i with lse = logsumexp_i lse_i.

With load-balanced sharding (rank r holds chunks r and 2cp-1-r) the causal mask needs no mask at
all off the diagonal, as in megatron-core's ring: the block of a rank j < r is seen fully by all
local queries through its first chunk only (its second chunk lies after both local chunks); the
block of a rank j > r is seen fully by the local second chunk only. Those fully masked halves are
skipped; only the own block (step 0) is causal.

Backward is autograd through the block math and through `RingShift`, whose backward sends the
key/value gradients back the way the blocks came. Each step's block attention is plain math
(scores materialised, per block [Sl, Sl]), so it saves the per-block probabilities for backward;
the all-gather flavour (`cp_comm=all_gather`) uses fused SDPA instead.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class RingShift(torch.autograd.Function):
    """Sends `x` to the next rank of the group and returns the previous rank's; backward sends the
    gradient to the previous rank and returns the next rank's (the reverse hop)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return _shift(x, group, +1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _shift(grad, ctx.group, -1), None


def _shift(x: torch.Tensor, group, step: int) -> torch.Tensor:
    """Send to rank (r + step) mod cp, receive from rank (r - step) mod cp, both non-blocking."""
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    x = x.contiguous()
    out = torch.empty_like(x)
    to = dist.get_global_rank(group, (rank + step) % cp)
    frm = dist.get_global_rank(group, (rank - step) % cp)
    ops = [dist.P2POp(dist.isend, x, to, group), dist.P2POp(dist.irecv, out, frm, group)]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return out


def block_attention(q_BHSK, k_BHSK, v_BHSV, scale: float, causal: bool):
    """Attention of q over one key/value block: output [B,H,Sq,V] (float32) and its log-sum-exp
    [B,H,Sq]. With `causal`, q and k hold the same positions (query i sees keys <= i)."""
    H, Hkv = q_BHSK.shape[1], k_BHSK.shape[1]
    if H != Hkv:  # grouped-query: query head h reads kv head h // (H / Hkv), as SDPA's enable_gqa
        k_BHSK = k_BHSK.repeat_interleave(H // Hkv, dim=1)
        v_BHSV = v_BHSV.repeat_interleave(H // Hkv, dim=1)
    scores = torch.matmul(q_BHSK.float(), k_BHSK.float().transpose(-1, -2)) * scale
    if causal:
        Sq, Sk = scores.shape[-2:]
        visible = torch.ones(Sq, Sk, dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.exp(scores - lse.unsqueeze(-1)), v_BHSV.float())
    return out, lse


def merge(out_a, lse_a, out_b, lse_b):
    """Exact softmax merge of two partial attentions over disjoint key sets."""
    lse = torch.logaddexp(lse_a, lse_b)
    out = out_a * torch.exp(lse_a - lse).unsqueeze(-1) + out_b * torch.exp(lse_b - lse).unsqueeze(-1)
    return out, lse


def ring_attention(q_BHSK, k_BHSK, v_BHSV, scale: float, group) -> torch.Tensor:
    """Causal attention of this rank's (load-balanced) queries over the whole sequence of the cp
    group, the key/value blocks travelling around the ring."""
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    Sc = q_BHSK.shape[2] // 2
    out, lse = block_attention(q_BHSK, k_BHSK, v_BHSV, scale, causal=True)
    k, v = k_BHSK, v_BHSV
    for step in range(1, cp):
        k, v = RingShift.apply(k, group), RingShift.apply(v, group)
        src = (rank - step) % cp
        if src < rank:  # all local queries see the source's first chunk, none its second
            o, l = block_attention(q_BHSK, k[:, :, :Sc], v[:, :, :Sc], scale, causal=False)
            out, lse = merge(out, lse, o, l)
        else:  # only the local second chunk sees the source, and all of it
            o, l = block_attention(q_BHSK[:, :, Sc:], k, v, scale, causal=False)
            late, late_lse = merge(out[:, :, Sc:], lse[:, :, Sc:], o, l)
            out = torch.cat([out[:, :, :Sc], late], dim=2)
            lse = torch.cat([lse[:, :, :Sc], late_lse], dim=2)
    return out.to(q_BHSK.dtype)


class RingSDPA(nn.Module):
    """Drop-in for model.attention.CausalSDPA under context parallel with `cp_comm=ring`; expects
    the load-balanced sharding of parallel/context_parallel.py."""

    def __init__(self, group):
        super().__init__()
        self.group = group

    def forward(self, q_BHSK, k_BHSK, v_BHSV, scale: float) -> torch.Tensor:
        return ring_attention(q_BHSK, k_BHSK, v_BHSV, scale, self.group)
