"""Standalone MoHGE inference model: torch + safetensors only, no mohge import.

Loads the directory written by `mohge-convert to-safetensors` (config.json + model.safetensors or
shards) and computes the same logits as the training model. Copy this one file anywhere.

    from modeling import MoHGEForCausalLM
    model = MoHGEForCausalLM.from_pretrained("export/")
    logits = model(torch.tensor([[1, 2, 3]]))
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def _rope(seq_len: int, head_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    inv, mag = _scale_frequencies(inv, head_dim, theta, scaling or {})
    ang = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv)
    return torch.cat([ang.cos(), ang.sin()], dim=-1) * mag


def _yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _scale_frequencies(inv: torch.Tensor, dim: int, theta: float, sc: dict):
    """RoPE context scaling (mohge.model.rope restated): linear, or YaRN's ramp between
    extrapolated and interpolated frequencies plus its cos/sin magnitude."""
    kind = sc.get("type", "none")
    if kind == "linear":
        return inv / sc["factor"], 1.0
    if kind != "yarn":
        return inv, 1.0
    f, orig = sc["factor"], sc["original_max_seq_len"]
    corr = lambda rot: dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(theta))  # noqa: E731
    low, high = max(math.floor(corr(sc["beta_fast"])), 0), min(math.ceil(corr(sc["beta_slow"])), dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / ((high - low) or 0.001)).clamp(0, 1)
    return inv / f * ramp + inv * (1 - ramp), _yarn_mscale(f, sc["mscale"]) / _yarn_mscale(f, sc["mscale_all_dim"])


def _softmax_scale(c: dict, head_dim: int) -> float:
    """1/sqrt(head_dim), times YaRN's temperature mscale(factor, mscale_all_dim)^2 if set."""
    sc = c.get("rope_scaling") or {}
    if sc.get("type") == "yarn" and sc.get("mscale_all_dim"):
        return head_dim**-0.5 * _yarn_mscale(sc["factor"], sc["mscale_all_dim"]) ** 2
    return head_dim**-0.5


def _apply_rope(x: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    s, half = x.shape[1], x.shape[-1] // 2
    cos, sin = cache[:s, :half].view(1, s, 1, half), cache[:s, half:].view(1, s, 1, half)
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.hd = c["d_model"] // c["n_heads"]
        self.wq = nn.Linear(c["d_model"], c["n_heads"] * self.hd, bias=False)
        self.wk = nn.Linear(c["d_model"], c["n_kv_heads"] * self.hd, bias=False)
        self.wv = nn.Linear(c["d_model"], c["n_kv_heads"] * self.hd, bias=False)
        self.wo = nn.Linear(c["n_heads"] * self.hd, c["d_model"], bias=False)
        self.scale = _softmax_scale(c, self.hd)

    def forward(self, x, rope):
        b, s, _ = x.shape
        q = _apply_rope(self.wq(x).view(b, s, -1, self.hd), rope).transpose(1, 2)
        k = _apply_rope(self.wk(x).view(b, s, -1, self.hd), rope).transpose(1, 2)
        v = self.wv(x).view(b, s, -1, self.hd).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale,
                                             enable_gqa=q.shape[1] != k.shape[1])
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


class MLAttention(nn.Module):
    """Multi-head latent attention (mohge.model.attention restated): K/V from a normed low-rank
    latent, a rotary key shared by all heads, optional low-rank query."""

    def __init__(self, c):
        super().__init__()
        m, d, h = c["mla"], c["d_model"], c["n_heads"]
        self.m, qk = m, m["qk_nope_head_dim"] + m["qk_rope_head_dim"]
        norm = lambda n: RMSNorm(n, c["norm_eps"]) if m["qk_norm"] else nn.Identity()  # noqa: E731
        if m["q_lora_rank"]:
            self.wq_a, self.q_norm = nn.Linear(d, m["q_lora_rank"], bias=False), norm(m["q_lora_rank"])
            self.wq_b = nn.Linear(m["q_lora_rank"], h * qk, bias=False)
        else:
            self.wq = nn.Linear(d, h * qk, bias=False)
        self.wkv_a = nn.Linear(d, m["kv_lora_rank"] + m["qk_rope_head_dim"], bias=False)
        self.kv_norm = norm(m["kv_lora_rank"])
        self.wkv_b = nn.Linear(m["kv_lora_rank"], h * (m["qk_nope_head_dim"] + m["v_head_dim"]), bias=False)
        self.wo = nn.Linear(h * m["v_head_dim"], d, bias=False)
        self.scale = _softmax_scale(c, qk)

    def forward(self, x, rope):
        b, s, _ = x.shape
        m, n, r = self.m, self.m["qk_nope_head_dim"], self.m["qk_rope_head_dim"]
        q = self.wq_b(self.q_norm(self.wq_a(x))) if m["q_lora_rank"] else self.wq(x)
        q_nope, q_rope = q.view(b, s, -1, n + r).split([n, r], -1)
        latent, k_rope = self.wkv_a(x).split([m["kv_lora_rank"], r], -1)
        k_nope, v = self.wkv_b(self.kv_norm(latent)).view(b, s, -1, n + m["v_head_dim"]).split([n, m["v_head_dim"]], -1)
        q = torch.cat([q_nope, _apply_rope(q_rope, rope)], -1).transpose(1, 2)
        k_rope = _apply_rope(k_rope.unsqueeze(2), rope).expand(-1, -1, k_nope.shape[2], -1)
        k = torch.cat([k_nope, k_rope], -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), is_causal=True, scale=self.scale)
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


class SwiGLU(nn.Module):
    def __init__(self, d: int, f: int):
        super().__init__()
        self.w1, self.w3, self.w2 = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False), nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class ExpertGroup(nn.Module):
    def __init__(self, n: int, d: int, f: int):
        super().__init__()
        self.w1, self.w3 = nn.Parameter(torch.empty(n, f, d)), nn.Parameter(torch.empty(n, f, d))
        self.w2 = nn.Parameter(torch.empty(n, d, f))


class MoHGE(nn.Module):
    """Two-level routing (sigmoid groups, in-group softmax experts), top-k, weighted expert sum."""

    def __init__(self, d: int, m: dict):
        super().__init__()
        self.m = m
        sizes = [g["num_experts"] for g in m["groups"]]
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        self.router = nn.Module()
        self.router.group_gate = nn.Linear(d, len(sizes), bias=False)
        self.router.expert_gate = nn.Linear(d, sum(sizes), bias=False)
        self.experts = nn.Module()
        self.experts.groups = nn.ModuleList(ExpertGroup(g["num_experts"], d, g["ffn_hidden_size"]) for g in m["groups"])
        n_shared = m.get("num_shared_experts", 0)
        self.shared = SwiGLU(d, m["shared_ffn_hidden_size"] * n_shared) if n_shared else None

    def route(self, x):
        m, off = self.m, self.offsets
        x32 = x.float()
        p = torch.sigmoid(x32 @ self.router.group_gate.weight.float().t())
        kept = torch.zeros_like(p, dtype=torch.bool).scatter_(-1, p.topk(m["k_group"], -1).indices, True)
        p = p * kept
        p = p / p.sum(-1, keepdim=True)
        logits = x32 @ self.router.expert_gate.weight.float().t()
        group_of = torch.repeat_interleave(torch.arange(len(off) - 1), torch.tensor(off[1:]) - torch.tensor(off[:-1]))
        q = torch.cat([logits[:, off[g]:off[g + 1]].softmax(-1) for g in range(len(off) - 1)], -1)
        s = q * p[:, group_of]
        s = s / s.sum(-1, keepdim=True).clamp_min(1e-20)
        masked = s.masked_fill(~kept[:, group_of], float("-inf"))
        if m.get("topk_mode", "global") == "global":
            idx = masked.topk(m["top_k"], -1).indices
        else:
            per = m["top_k"] // m["k_group"]
            vals, ids = [], []
            for g in range(len(off) - 1):
                v, i = masked[:, off[g]:off[g + 1]].topk(per, -1)
                vals.append(v)
                ids.append(i + off[g])
            vals, ids = torch.cat(vals, -1), torch.cat(ids, -1)
            idx = ids.gather(-1, vals.topk(m["top_k"], -1).indices)
        chosen = s.gather(-1, idx)
        w = chosen.softmax(-1) if m.get("combine") == "authors" else chosen / chosen.sum(-1, keepdim=True).clamp_min(1e-20)
        return idx, w

    def forward(self, x):
        b, s, d = x.shape
        x2 = x.reshape(-1, d)
        idx, w = self.route(x2)
        out = torch.zeros_like(x2)
        for g, group in enumerate(self.experts.groups):
            for i in range(group.w1.shape[0]):
                t, slot = (idx == self.offsets[g] + i).nonzero(as_tuple=True)
                if t.numel():
                    h = F.silu(x2[t] @ group.w1[i].t()) * (x2[t] @ group.w3[i].t())
                    out.index_add_(0, t, (h @ group.w2[i].t()) * w[t, slot].unsqueeze(-1).to(x.dtype))
        if self.shared is not None:
            out = out + self.shared(x2)
        return out.view(b, s, d)


class Block(nn.Module):
    def __init__(self, c, layer_id):
        super().__init__()
        self.attention_norm = RMSNorm(c["d_model"], c["norm_eps"])
        self.attention = MLAttention(c) if c.get("attention", "gqa") == "mla" else Attention(c)
        self.ffn_norm = RMSNorm(c["d_model"], c["norm_eps"])
        moe = c["ffn_type"] == "mohge" and layer_id >= c["first_k_dense"]
        self.ffn = MoHGE(c["d_model"], c["moe"]) if moe else SwiGLU(c["d_model"], c["ffn_hidden_size"])

    def forward(self, x, rope):
        h = x + self.attention(self.attention_norm(x), rope)
        return h + self.ffn(self.ffn_norm(h))


class MoHGEForCausalLM(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        c = self.config = config
        self.tok_embeddings = nn.Embedding(c["vocab_size"], c["d_model"])
        self.layers = nn.ModuleDict({str(i): Block(c, i) for i in range(c["n_layers"])})
        self.norm = RMSNorm(c["d_model"], c["norm_eps"])
        self.output = None if c["tie_embeddings"] else nn.Linear(c["d_model"], c["vocab_size"], bias=False)
        rope_dim = c["mla"]["qk_rope_head_dim"] if c.get("attention", "gqa") == "mla" else c["d_model"] // c["n_heads"]
        self.register_buffer("rope", _rope(c["max_seq_len"], rope_dim, c["rope_theta"], c.get("rope_scaling")),
                             persistent=False)

    @classmethod
    def from_pretrained(cls, directory: str, dtype: torch.dtype = torch.float32) -> "MoHGEForCausalLM":
        from safetensors.torch import load_file

        d = Path(directory)
        config = json.loads((d / "config.json").read_text())["model"]
        index = d / "model.safetensors.index.json"
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
        state = {}
        for name in files:
            state.update(load_file(str(d / name)))
        model = cls(config)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{directory}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        return model.to(dtype).eval()

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        for layer in self.layers.values():
            h = layer(h, self.rope)
        h = self.norm(h)
        return self.output(h) if self.output is not None else F.linear(h, self.tok_embeddings.weight)

    @torch.no_grad()
    def generate(self, tokens: torch.Tensor, max_new_tokens: int, temperature: float = 0.0) -> torch.Tensor:
        """Greedy (temperature 0) or sampled continuation; recomputes the prefix each step."""
        for _ in range(max_new_tokens):
            logits = self(tokens[:, -self.config["max_seq_len"]:])[:, -1].float()
            if temperature > 0:
                nxt = torch.multinomial((logits / temperature).softmax(-1), 1)
            else:
                nxt = logits.argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, nxt], dim=1)
        return tokens


