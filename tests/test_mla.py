"""Multi-head latent attention against a plain per-head reference written here, and its
parameter/FLOP accounting against the built model."""

from __future__ import annotations

import math

import pytest
import torch
from standalone import assert_standalone_matches

from mohge.model.attention import MultiLatentAttention
from mohge.model.config import ConfigError, MLAConfig, ModelConfig, RopeScalingConfig
from mohge.model.rope import rope_cache, softmax_scale_factor
from mohge.model.transformer import build_model


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rotate(x, pos, freqs, m):
    """Rotate-half RoPE of one vector x [R] at position pos, magnitude m, in float64."""
    half = x.shape[-1] // 2
    ang = pos * freqs
    cos, sin = torch.cos(ang) * m, torch.sin(ang) * m
    x1, x2 = x[:half], x[half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin])


def _reference(att: MultiLatentAttention, c: MLAConfig, x, n_heads, eps, theta, scaling):
    """DeepSeek-V2 MLA token by token, head by head, in float64, from the module's weights."""
    W = {k: v.detach().double() for k, v in att.state_dict().items()}
    x = x.double()
    B, S, _ = x.shape
    N, R, V = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
    from mohge.model.rope import inverse_frequencies, yarn_get_mscale

    freqs = inverse_frequencies(R, theta, scaling).double()
    m = 1.0
    if scaling is not None and scaling.type == "yarn":
        m = yarn_get_mscale(scaling.factor, scaling.mscale) / yarn_get_mscale(scaling.factor, scaling.mscale_all_dim)
    scale = softmax_scale_factor(scaling) / math.sqrt(N + R)
    out = torch.zeros(B, S, n_heads * V, dtype=torch.float64)
    for b in range(B):
        qs, ks, vs = [], [], []
        for t in range(S):
            xt = x[b, t]
            if c.q_lora_rank:
                cq = xt @ W["wq_a.weight"].T
                if c.qk_norm:
                    cq = _rms(cq, W["q_norm.weight"], eps)
                q = cq @ W["wq_b.weight"].T
            else:
                q = xt @ W["wq.weight"].T
            kv_a = xt @ W["wkv_a.weight"].T
            ckv, k_pe = kv_a[: c.kv_lora_rank], kv_a[c.kv_lora_rank:]
            if c.qk_norm:
                ckv = _rms(ckv, W["kv_norm.weight"], eps)
            kv = (ckv @ W["wkv_b.weight"].T).view(n_heads, N + V)
            k_pe = _rotate(k_pe, t, freqs, m)
            q = q.view(n_heads, N + R)
            qs.append(torch.stack([torch.cat([q[h, :N], _rotate(q[h, N:], t, freqs, m)]) for h in range(n_heads)]))
            ks.append(torch.stack([torch.cat([kv[h, :N], k_pe]) for h in range(n_heads)]))
            vs.append(kv[:, N:])
        for h in range(n_heads):
            for t in range(S):
                logits = torch.stack([qs[t][h] @ ks[u][h] for u in range(t + 1)]) * scale
                p = logits.softmax(0)
                out[b, t, h * V:(h + 1) * V] = sum(p[u] * vs[u][h] for u in range(t + 1))
    return out @ W["wo.weight"].T


@pytest.mark.parametrize("q_lora_rank,qk_norm,scaling", [
    (0, True, RopeScalingConfig(type="yarn", factor=40.0, original_max_seq_len=16, mscale=0.707, mscale_all_dim=0.707)),
    (12, True, None),
    (12, False, RopeScalingConfig(type="linear", factor=2.0)),
    (0, False, RopeScalingConfig(type="yarn", factor=8.0, original_max_seq_len=8)),
])
def test_mla_matches_plain_reference(q_lora_rank, qk_norm, scaling):
    torch.manual_seed(0)
    c = MLAConfig(q_lora_rank=q_lora_rank, kv_lora_rank=10, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5,
                  qk_norm=qk_norm)
    H, D, S, eps, theta = 3, 16, 7, 1e-6, 10000.0
    att = MultiLatentAttention(D, H, c, eps, softmax_scale_factor(scaling))
    with torch.no_grad():
        for name, p in att.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.3)
    x = torch.randn(2, S, D)
    got = att(x, rope_cache(S, c.qk_rope_head_dim, theta, scaling))
    want = _reference(att, c, x, H, eps, theta, scaling)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def _mla_model(**kw) -> ModelConfig:
    mla = MLAConfig(kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, **kw)
    return ModelConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, ffn_hidden_size=96,
                       max_seq_len=32, attention="mla", mla=mla,
                       rope_scaling=RopeScalingConfig(type="yarn", factor=40.0, original_max_seq_len=32))


@pytest.mark.parametrize("q_lora_rank,qk_norm", [(0, True), (24, True), (24, False)])
def test_mla_param_count_matches_built_model(q_lora_rank, qk_norm):
    cfg = _mla_model(q_lora_rank=q_lora_rank, qk_norm=qk_norm)
    cfg.validate()
    model = build_model(cfg, "meta")
    assert model.num_params() == cfg.num_params()
    attn = model.layers["0"].attention
    assert sum(p.numel() for p in attn.parameters()) == cfg.mla.params(cfg.d_model, cfg.n_heads)


def test_mla_flops_count_attention_core():
    cfg = _mla_model()
    gqa = ModelConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, ffn_hidden_size=96)
    # attention core: QK^T over N+R, AV over V, for every head, causal half of seq_len
    core = cfg.flops_per_token(32) - cfg.flops_per_token(0)
    assert core == pytest.approx(3 * 2 * 2 * (32 / 2) * 4 * (16 + 8 + 16))
    assert gqa.flops_per_token(32) - gqa.flops_per_token(0) == pytest.approx(3 * 2 * 2 * 2 * (32 / 2) * 64)


def test_mla_model_trains_one_step():
    cfg = _mla_model(q_lora_rank=24)
    model = build_model(cfg, "cpu")
    model.init_weights(0)
    tokens = torch.randint(0, 64, (2, 16))
    loss = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    for name, p in model.named_parameters():
        if "router" not in name and "experts" not in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert model.layers["0"].attention.q_norm.weight.detach().eq(1).all()


@pytest.mark.parametrize("kw,needle", [
    (dict(attention="gqa", mla=MLAConfig(kv_lora_rank=8)), "model.mla"),
    (dict(attention="mla", n_kv_heads=2), "model.n_kv_heads"),
    (dict(attention="mla", mla=MLAConfig(qk_rope_head_dim=3)), "model.mla.qk_rope_head_dim"),
    (dict(attention="sparse"), "model.attention"),
])
def test_bad_attention_config_names_the_field(kw, needle):
    base = dict(vocab_size=64, d_model=64, n_layers=1, n_heads=4, n_kv_heads=4, ffn_type="dense")
    with pytest.raises(ConfigError, match=needle):
        ModelConfig(**{**base, **kw}).validate()


def test_standalone_modeling_matches_mla_yarn_model(tmp_path):
    """launch/modeling.py (loaded as a loose file) computes the trainer model's logits for MLA +
    YaRN, with and without query compression."""
    for q_lora_rank in (0, 24):
        cfg = _mla_model(q_lora_rank=q_lora_rank)
        cfg.rope_scaling = RopeScalingConfig(type="yarn", factor=40.0, original_max_seq_len=16, mscale=0.707,
                                             mscale_all_dim=0.707)
        model = build_model(cfg, "cpu")
        model.init_weights(1)
        out = tmp_path / f"q{q_lora_rank}"
        out.mkdir()
        assert_standalone_matches(model, cfg, out, seq_len=20)
