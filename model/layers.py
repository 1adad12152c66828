"""Dense building blocks: grouped-query attention and the SwiGLU feed-forward (RoPE: model/rope.py).

Shape legend: B batch, S sequence, D model dim, H query heads, Hkv key/value heads, Dh head dim,
F ffn width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mohge.model.attention import CausalSDPA
from mohge.model.rope import apply_rope, rope_cache  # noqa: F401  (rope_cache: old import path)


class Attention(nn.Module):
    """Causal grouped-query self-attention through scaled_dot_product_attention.

    Head counts are read off the projection outputs (`view(..., -1, Dh)`), so a tensor-parallel
    plan that shards wq/wk/wv column-wise needs no change here.
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, softmax_scale_factor: float = 1.0):
        super().__init__()
        self.head_dim = d_model // n_heads
        self.softmax_scale = self.head_dim**-0.5 * softmax_scale_factor  # YaRN's temperature, if any
        self.wq = nn.Linear(d_model, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, d_model, bias=False)
        self.core: nn.Module = CausalSDPA()  # context parallel swaps in a whole-sequence one

    def forward(self, x_BSD: torch.Tensor, rope_SDh: torch.Tensor) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        q_BSHDh = apply_rope(self.wq(x_BSD).view(B, S, -1, self.head_dim), rope_SDh)
        k_BSHDh = apply_rope(self.wk(x_BSD).view(B, S, -1, self.head_dim), rope_SDh)
        v_BSHDh = self.wv(x_BSD).view(B, S, -1, self.head_dim)
        out_BHSDh = self.core(q_BSHDh.transpose(1, 2), k_BSHDh.transpose(1, 2), v_BSHDh.transpose(1, 2),
                              self.softmax_scale)
        return self.wo(out_BHSDh.transpose(1, 2).reshape(B, S, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, hidden, bias=False)
        self.w3 = nn.Linear(d_model, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
