"""Standalone MoHGE inference model: torch + safetensors only, no mohge import.

Loads the directory written by `mohge-convert to-safetensors` (config.json + model.safetensors or
shards, or the transformers export of `mohge-convert to-hf`) and computes the same logits as the
training model. Copy this one file anywhere. Generation keeps a KV cache (one new token per step),
takes a batch of left-padded prompts, and decodes greedily or with temperature + top-p.

    from modeling import MoHGEForCausalLM
    model = MoHGEForCausalLM.from_pretrained("export/")
    logits = model(torch.tensor([[1, 2, 3]]))
    out = model.generate(prompts_BS, max_new_tokens=20, attention_mask=mask_BS, temperature=0.8, top_p=0.9)

Shape legend: B batch, S new tokens, Hkv key/value heads, Dh head dim, V vocabulary.
"""

from __future__ import annotations

import json
import math

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def _rope_at(positions_BS: torch.Tensor, head_dim: int, theta: float, scaling: dict | None = None):
    """cos, sin [B, S, 1, Dh/2] at integer positions; the same arithmetic as the training table
    (RoPE scaling included: YaRN's magnitude multiplies cos and sin)."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions_BS.device) / head_dim))
    inv, mag = _scale_frequencies(inv, head_dim, theta, scaling or {})
    ang = positions_BS.float().unsqueeze(-1) * inv
    return (ang.cos() * mag).unsqueeze(2), (ang.sin() * mag).unsqueeze(2)


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


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).type_as(x)


class KVCache:
    """Keys and values of every layer so far, [B, Hkv, S, Dh] each; the interface of transformers'
    DynamicCache (update, get_seq_length), so the HF export passes its own cache through."""

    def __init__(self):
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *args) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx == len(self.keys):
            self.keys.append(k)
            self.values.append(v)
        else:
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], k], dim=2)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], v], dim=2)
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.keys[layer_idx].shape[2] if len(self.keys) > layer_idx else 0


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, c, layer_idx: int = 0):
        super().__init__()
        self.hd, self.layer_idx = c["d_model"] // c["n_heads"], layer_idx
        self.wq = nn.Linear(c["d_model"], c["n_heads"] * self.hd, bias=False)
        self.wk = nn.Linear(c["d_model"], c["n_kv_heads"] * self.hd, bias=False)
        self.wv = nn.Linear(c["d_model"], c["n_kv_heads"] * self.hd, bias=False)
        self.wo = nn.Linear(c["n_heads"] * self.hd, c["d_model"], bias=False)
        self.scale = _softmax_scale(c, self.hd)
        qk_norm = c.get("qk_norm", False)  # per-head RMSNorm of q and k before RoPE
        self.q_norm = RMSNorm(self.hd, c["norm_eps"]) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.hd, c["norm_eps"]) if qk_norm else nn.Identity()

    def forward(self, x, rope, mask=None, cache=None):
        """mask: None (plain causal, no cache) or bool [B, 1, S, S_past + S], True where allowed."""
        b, s, _ = x.shape
        q = _apply_rope(self.q_norm(self.wq(x).view(b, s, -1, self.hd)), *rope).transpose(1, 2)
        k = _apply_rope(self.k_norm(self.wk(x).view(b, s, -1, self.hd)), *rope).transpose(1, 2)
        v = self.wv(x).view(b, s, -1, self.hd).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        return self.wo(_attend(q, k, v, mask, self.scale).transpose(1, 2).reshape(b, s, -1))


def _attend(q, k, v, mask, scale):
    """SDPA over [B, H, S, *]: causal without a mask (no cache), else the given bool mask."""
    gqa = q.shape[1] != k.shape[1]
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


class MLAttention(nn.Module):
    """Multi-head latent attention (mohge.model.attention restated): K/V from a normed low-rank
    latent, a rotary key shared by all heads, optional low-rank query."""

    def __init__(self, c, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
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

    def forward(self, x, rope, mask=None, cache=None):
        b, s, _ = x.shape
        m, n, r = self.m, self.m["qk_nope_head_dim"], self.m["qk_rope_head_dim"]
        q = self.wq_b(self.q_norm(self.wq_a(x))) if m["q_lora_rank"] else self.wq(x)
        q_nope, q_rope = q.view(b, s, -1, n + r).split([n, r], -1)
        latent, k_rope = self.wkv_a(x).split([m["kv_lora_rank"], r], -1)
        k_nope, v = self.wkv_b(self.kv_norm(latent)).view(b, s, -1, n + m["v_head_dim"]).split([n, m["v_head_dim"]], -1)
        q = torch.cat([q_nope, _apply_rope(q_rope, *rope)], -1).transpose(1, 2)
        k_rope = _apply_rope(k_rope.unsqueeze(2), *rope).expand(-1, -1, k_nope.shape[2], -1)
        k, v = torch.cat([k_nope, k_rope], -1).transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        out = _attend(q, k, v, mask, self.scale)
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
        # aux-loss-free balancing's selection biases (training moves them; they only pick experts)
        self.router.register_buffer("expert_bias", torch.zeros(sum(sizes)) if m.get("bias_update_rate") else None)
        self.router.register_buffer("group_bias", torch.zeros(len(sizes)) if m.get("group_bias_update_rate") else None)

    def route(self, x):
        m, off = self.m, self.offsets
        x32 = x.float()
        p = torch.sigmoid(x32 @ self.router.group_gate.weight.float().t())
        gb, eb = self.router.group_bias, self.router.expert_bias
        pick = p if gb is None else p + gb.float()
        kept = torch.zeros_like(p, dtype=torch.bool).scatter_(-1, pick.topk(m["k_group"], -1).indices, True)
        p = p * kept
        p = p / p.sum(-1, keepdim=True)
        logits = x32 @ self.router.expert_gate.weight.float().t()
        group_of = torch.repeat_interleave(torch.arange(len(off) - 1), torch.tensor(off[1:]) - torch.tensor(off[:-1]))
        q = torch.cat([logits[:, off[g]:off[g + 1]].softmax(-1) for g in range(len(off) - 1)], -1)
        s = q * p[:, group_of]
        s = s / s.sum(-1, keepdim=True).clamp_min(1e-20)
        masked = (s if eb is None else s + eb.float()).masked_fill(~kept[:, group_of], float("-inf"))
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
        mla = c.get("attention", "gqa") == "mla"
        self.attention = MLAttention(c, layer_id) if mla else Attention(c, layer_id)
        self.ffn_norm = RMSNorm(c["d_model"], c["norm_eps"])
        moe = c["ffn_type"] == "mohge" and layer_id >= c["first_k_dense"]
        self.ffn = MoHGE(c["d_model"], c["moe"]) if moe else SwiGLU(c["d_model"], c["ffn_hidden_size"])

    def forward(self, x, rope, mask=None, cache=None):
        h = x + self.attention(self.attention_norm(x), rope, mask, cache)
        return h + self.ffn(self.ffn_norm(h))


def read_config(directory) -> dict:
    """The mohge model dict of an export: config.json's "model" (mohge-convert to-safetensors) or
    "mohge" (the transformers export)."""
    raw = json.loads((Path(directory) / "config.json").read_text())
    return raw["mohge"] if "mohge" in raw else raw["model"]


def read_state(directory) -> dict:
    """Every tensor of an export, one file or shards; the HF export's "model." prefix removed."""
    from safetensors.torch import load_file

    d = Path(directory)
    index = d / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    state = {}
    for name in files:
        state.update(load_file(str(d / name)))
    return {k[len("model."):] if k.startswith("model.") else k: v for k, v in state.items()}


class Decoder(nn.Module):
    """tokens [B, S] -> logits [B, S, V]; with `cache`, S new tokens after the cached ones."""

    def __init__(self, config: dict):
        super().__init__()
        c = self.config = config
        self.tok_embeddings = nn.Embedding(c["vocab_size"], c["d_model"])
        self.layers = nn.ModuleDict({str(i): Block(c, i) for i in range(c["n_layers"])})
        self.norm = RMSNorm(c["d_model"], c["norm_eps"])
        self.output = None if c["tie_embeddings"] else nn.Linear(c["d_model"], c["vocab_size"], bias=False)

    def forward(self, tokens, attention_mask=None, position_ids=None, cache=None):
        """attention_mask [B, S_past + S]: 1 for real tokens, 0 for (left) padding. position_ids
        [B, S]: by default real tokens are counted, so a left-padded prompt gets the positions it
        has alone."""
        b, s = tokens.shape
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, past:past + s]
            else:
                position_ids = torch.arange(past, past + s, device=tokens.device).expand(b, s)
        mask = None
        if attention_mask is not None or past > 0:
            key_pos = torch.arange(past + s, device=tokens.device).view(1, -1)
            query_pos = torch.arange(past, past + s, device=tokens.device).view(-1, 1)
            allowed = key_pos <= query_pos  # [S, S_past + S]
            if attention_mask is not None:
                real = attention_mask[:, :past + s].bool().view(b, 1, -1)
                # a pad query sees itself only: no row is empty (an empty row would give NaN)
                allowed = (allowed & real) | (key_pos == query_pos)
            mask = allowed.view(-1, 1, s, past + s).expand(b, 1, s, past + s)
        c = self.config
        rope_dim = c["mla"]["qk_rope_head_dim"] if c.get("attention", "gqa") == "mla" else c["d_model"] // c["n_heads"]
        rope = _rope_at(position_ids, rope_dim, c["rope_theta"], c.get("rope_scaling"))
        h = self.tok_embeddings(tokens)
        for layer in self.layers.values():
            h = layer(h, rope, mask, cache)
        h = self.norm(h)
        return self.output(h) if self.output is not None else F.linear(h, self.tok_embeddings.weight)


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, generator=None) -> torch.Tensor:
    """[B, V] -> [B, 1]: argmax (temperature 0), else a draw from the top-p nucleus of softmax(l / T)."""
    if temperature <= 0:
        return logits.argmax(-1, keepdim=True)
    probs = (logits.float() / temperature).softmax(-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        sorted_p[(sorted_p.cumsum(-1) - sorted_p) >= top_p] = 0.0  # the smallest set reaching top_p
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator)


class MoHGEForCausalLM(Decoder):
    @classmethod
    def from_pretrained(cls, directory: str, dtype: torch.dtype = torch.float32) -> "MoHGEForCausalLM":
        model = cls(read_config(directory))
        missing, unexpected = model.load_state_dict(read_state(directory), strict=False)
        if missing or unexpected:
            raise ValueError(f"{directory}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        return model.to(dtype).eval()

    @torch.no_grad()
    def forward(self, tokens, attention_mask=None, position_ids=None, cache=None):
        return super().forward(tokens, attention_mask, position_ids, cache)

    @torch.no_grad()
    def generate(self, tokens: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 attention_mask=None, eos_token_id=None, pad_token_id: int = 0, use_cache: bool = True,
                 generator=None) -> torch.Tensor:
        """Continues a batch of prompts [B, S] (left-padded, with attention_mask, when of unequal
        length): greedy at temperature 0, else temperature + top-p sampling. With the KV cache each
        step runs only the new token; use_cache=False recomputes the prefix (the reference).
        Rows that emitted eos_token_id continue with pad_token_id."""
        if tokens.shape[1] + max_new_tokens > self.config["max_seq_len"]:
            raise ValueError(f"prompt {tokens.shape[1]} + max_new_tokens {max_new_tokens} tokens exceed "
                             f"max_seq_len {self.config['max_seq_len']}; shorten the prompt or generate less")
        mask = torch.ones_like(tokens) if attention_mask is None else attention_mask.to(tokens.device).long()
        cache = KVCache() if use_cache else None
        done = torch.zeros(tokens.shape[0], 1, dtype=torch.bool, device=tokens.device)
        logits = self(tokens, mask, cache=cache)[:, -1]
        for step in range(max_new_tokens):
            nxt = sample(logits, temperature, top_p, generator).masked_fill(done, pad_token_id)
            if eos_token_id is not None:
                done = done | (nxt == eos_token_id)
            tokens, mask = torch.cat([tokens, nxt], dim=1), torch.cat([mask, torch.ones_like(nxt)], dim=1)
            if step + 1 < max_new_tokens:
                logits = (self(nxt, mask, cache=cache) if use_cache else self(tokens, mask))[:, -1]
        return tokens
