"""Multi-head latent attention (DeepSeek-V2 MLA, as the MoHGE authors' megatron run uses it).

Shape legend: B batch, S sequence, D model dim, H heads (local heads under tensor parallel),
C kv latent (kv_lora_rank), Cq q latent (q_lora_rank), N qk_nope_head_dim, R qk_rope_head_dim,
V v_head_dim.

Keys and values are up-projected from one compressed latent per token (wkv_a -> kv_norm -> wkv_b);
the rotary part of the key is a single R-dim vector per token shared by all heads. The query is
full rank (wq) or compressed (wq_a -> q_norm -> wq_b). Head counts are read off the up-projections
(`view(..., -1, dim)`), so a tensor-parallel plan that shards wq/wq_b/wkv_b column-wise and wo
row-wise needs no change here; the compressed projections stay replicated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mohge.model.config import MLAConfig
from mohge.model.rope import apply_rope


class CausalSDPA(nn.Module):
    """Causal attention over the local sequence: q [B,H,S,K], k [B,Hkv,S,K], v [B,Hkv,S,V].

    A module so that context parallel can swap in one that attends over the whole sequence."""

    def forward(self, q_BHSK, k_BHSK, v_BHSV, scale: float) -> torch.Tensor:
        return F.scaled_dot_product_attention(
            q_BHSK, k_BHSK, v_BHSV, is_causal=True, scale=scale, enable_gqa=q_BHSK.shape[1] != k_BHSK.shape[1]
        )


class MultiLatentAttention(nn.Module):
    """Causal MLA through scaled_dot_product_attention; `softmax_scale_factor` carries YaRN's
    attention temperature."""

    def __init__(self, d_model: int, n_heads: int, cfg: MLAConfig, norm_eps: float, softmax_scale_factor: float = 1.0):
        super().__init__()
        self.cfg = cfg
        qk_dim = cfg.qk_head_dim
        if cfg.q_lora_rank:
            self.wq_a = nn.Linear(d_model, cfg.q_lora_rank, bias=False)
            self.q_norm = nn.RMSNorm(cfg.q_lora_rank, eps=norm_eps) if cfg.qk_norm else nn.Identity()
            self.wq_b = nn.Linear(cfg.q_lora_rank, n_heads * qk_dim, bias=False)
        else:
            self.wq = nn.Linear(d_model, n_heads * qk_dim, bias=False)
        self.wkv_a = nn.Linear(d_model, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_norm = nn.RMSNorm(cfg.kv_lora_rank, eps=norm_eps) if cfg.qk_norm else nn.Identity()
        self.wkv_b = nn.Linear(cfg.kv_lora_rank, n_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.wo = nn.Linear(n_heads * cfg.v_head_dim, d_model, bias=False)
        self.softmax_scale = qk_dim**-0.5 * softmax_scale_factor
        # The rotary key feeds every head; under tensor parallel each rank's heads contribute only
        # part of its gradient, so the TP plan swaps this identity for a gradient all-reduce.
        self.shared_key_boundary: nn.Module = nn.Identity()
        self.core: nn.Module = CausalSDPA()

    def project_qkv(self, x_BSD: torch.Tensor, rope_SR: torch.Tensor):
        """q [B,S,H,N+R], k [B,S,H,N+R], v [B,S,H,V] with RoPE applied (shared by the KV-cache and
        context-parallel paths)."""
        B, S, _ = x_BSD.shape
        c = self.cfg
        q = self.wq_b(self.q_norm(self.wq_a(x_BSD))) if c.q_lora_rank else self.wq(x_BSD)
        q_nope_BSHN, q_rope_BSHR = q.view(B, S, -1, c.qk_head_dim).split([c.qk_nope_head_dim, c.qk_rope_head_dim], -1)
        latent_BSC, k_rope_BSR = self.wkv_a(x_BSD).split([c.kv_lora_rank, c.qk_rope_head_dim], -1)
        k_rope_BS1R = apply_rope(self.shared_key_boundary(k_rope_BSR).unsqueeze(2), rope_SR)
        kv = self.wkv_b(self.kv_norm(latent_BSC)).view(B, S, -1, c.qk_nope_head_dim + c.v_head_dim)
        k_nope_BSHN, v_BSHV = kv.split([c.qk_nope_head_dim, c.v_head_dim], -1)
        H = q_nope_BSHN.shape[2]
        q_BSHK = torch.cat([q_nope_BSHN, apply_rope(q_rope_BSHR, rope_SR)], -1)
        k_BSHK = torch.cat([k_nope_BSHN, k_rope_BS1R.expand(-1, -1, H, -1)], -1)
        return q_BSHK, k_BSHK, v_BSHV

    def forward(self, x_BSD: torch.Tensor, rope_SR: torch.Tensor) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        q_BSHK, k_BSHK, v_BSHV = self.project_qkv(x_BSD, rope_SR)
        out_BHSV = self.core(q_BSHK.transpose(1, 2), k_BSHK.transpose(1, 2), v_BSHV.transpose(1, 2), self.softmax_scale)
        return self.wo(out_BHSV.transpose(1, 2).reshape(B, S, -1))
