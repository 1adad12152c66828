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

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, softmax_scale_factor: float = 1.0,
                 qk_norm: bool = False, norm_eps: float = 1e-5):
        super().__init__()
        self.head_dim = d_model // n_heads
        self.softmax_scale = self.head_dim**-0.5 * softmax_scale_factor  # YaRN's temperature, if any
        self.wq = nn.Linear(d_model, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, d_model, bias=False)
        self.core: nn.Module = CausalSDPA()  # context parallel swaps in a whole-sequence one
        # qk-norm (Qwen3, OLMo-2 per head): RMSNorm over Dh of every q and k head, before RoPE; one
        # weight [Dh] shared by the heads. Under tensor parallel a rank holds only some heads, so the
        # TP plan swaps this identity for a gradient all-reduce of the (replicated) norm weights.
        self.q_norm = nn.RMSNorm(self.head_dim, eps=norm_eps) if qk_norm else None
        self.k_norm = nn.RMSNorm(self.head_dim, eps=norm_eps) if qk_norm else None
        self.norm_weight_boundary: nn.Module = nn.Identity()

    def _head_norm(self, norm, x_BSHDh: torch.Tensor) -> torch.Tensor:
        if norm is None:
            return x_BSHDh
        return F.rms_norm(x_BSHDh, (self.head_dim,), self.norm_weight_boundary(norm.weight), norm.eps)

    def forward(self, x_BSD: torch.Tensor, rope_SDh: torch.Tensor) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        q_BSHDh = apply_rope(self._head_norm(self.q_norm, self.wq(x_BSD).view(B, S, -1, self.head_dim)), rope_SDh)
        k_BSHDh = apply_rope(self._head_norm(self.k_norm, self.wk(x_BSD).view(B, S, -1, self.head_dim)), rope_SDh)
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
