"""qk-norm for grouped-query attention (`model.qk_norm`): a plain per-head reference written here,
the config and parameter count, tensor parallel (norm weights replicated, their gradients
all-reduced) and the standalone module."""

from __future__ import annotations

import math

import pytest
import torch
from distributed import run_ranks
from standalone import assert_standalone_matches

from mohge.model.config import ConfigError, MLAConfig, ModelConfig
from mohge.model.layers import Attention
from mohge.model.rope import rope_cache
from mohge.model.transformer import build_model


def _reference(att: Attention, x, n_heads, n_kv_heads, eps, theta):
    """Qwen3-style attention token by token, head by head, in float64: q and k heads RMS-normed
    over head_dim (own weights), then rotated, causal softmax with kv head h // (H / Hkv)."""
    x = x.double()
    B, S, D = x.shape
    Dh = D // n_heads
    wq, wk, wv, wo = (getattr(att, n).weight.double() for n in ("wq", "wk", "wv", "wo"))
    gq, gk = att.q_norm.weight.double(), att.k_norm.weight.double()
    freqs = 1.0 / theta ** (torch.arange(0, Dh, 2, dtype=torch.float64) / Dh)
    out = torch.zeros(B, S, D, dtype=torch.float64)

    def rms(v, g):
        return v / torch.sqrt(v.pow(2).mean() + eps) * g

    def rot(v, pos):
        half, ang = Dh // 2, pos * freqs
        return torch.cat([v[:half] * ang.cos() - v[half:] * ang.sin(), v[half:] * ang.cos() + v[:half] * ang.sin()])

    for b in range(B):
        for i in range(S):
            heads = []
            for h in range(n_heads):
                kv = h // (n_heads // n_kv_heads)
                q = rot(rms((wq @ x[b, i])[h * Dh:(h + 1) * Dh], gq), i)
                scores = torch.stack([
                    q @ rot(rms((wk @ x[b, j])[kv * Dh:(kv + 1) * Dh], gk), j) / math.sqrt(Dh) for j in range(i + 1)
                ])
                vals = torch.stack([(wv @ x[b, j])[kv * Dh:(kv + 1) * Dh] for j in range(i + 1)])
                heads.append(scores.softmax(0) @ vals)
            out[b, i] = wo @ torch.cat(heads)
    return out


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_qk_norm_attention_matches_plain_reference(n_kv_heads):
    D, H, eps, theta = 32, 4, 1e-6, 10000.0
    torch.manual_seed(0)
    att = Attention(D, H, n_kv_heads, qk_norm=True, norm_eps=eps)
    with torch.no_grad():  # non-trivial norm weights, different for q and k
        att.q_norm.weight.uniform_(0.5, 1.5)
        att.k_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 7, D)
    got = att(x, rope_cache(16, D // H, theta))
    torch.testing.assert_close(got.double(), _reference(att, x, H, n_kv_heads, eps, theta), rtol=1e-5, atol=1e-5)
    # and the norm does something: without it the output differs
    att.q_norm = att.k_norm = None
    assert not torch.allclose(att(x, rope_cache(16, D // H, theta)), got, atol=1e-3)


def _cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_size=48, max_seq_len=16,
                ffn_type="dense", qk_norm=True)
    return ModelConfig(**{**base, **kw})


def test_qk_norm_param_count_and_config_errors():
    cfg = _cfg()
    cfg.validate()
    model = build_model(cfg, "cpu")
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params()
    names = {n for n, _ in model.named_parameters()}
    assert {"layers.0.attention.q_norm.weight", "layers.0.attention.k_norm.weight"} <= names
    model.init_weights(0)
    assert torch.equal(model.layers["1"].attention.k_norm.weight, torch.ones(8))  # norms start at one
    with pytest.raises(ConfigError, match="model.qk_norm"):
        _cfg(attention="mla", n_kv_heads=4, mla=MLAConfig(kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4,
                                                          v_head_dim=8)).validate()


def _grads(tp_mesh=None, sequence_parallel=True):
    import torch.nn.functional as F

    from mohge.parallel.tensor_parallel import apply_tensor_parallel, loss_context

    model = build_model(_cfg(), "meta")
    if tp_mesh is not None:
        apply_tensor_parallel(model, tp_mesh, sequence_parallel)
    model.to_empty(device="cpu")
    model.init_weights(7)
    with torch.no_grad():  # norm weights away from one, so that their gradient path matters
        for name, p in model.named_parameters():
            if "q_norm" in name or "k_norm" in name:
                p.copy_(torch.linspace(0.5, 1.5, p.shape[0]))
    tokens = torch.randint(0, 64, (2, 13), generator=torch.Generator().manual_seed(3))
    with loss_context(tp_mesh is not None):
        loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
    full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t  # noqa: E731
    return float(full(loss.detach())), {n: full(p.grad).clone() for n, p in model.named_parameters()}


def _tp_rank(rank, world):
    from torch.distributed.device_mesh import init_device_mesh

    return _grads(init_device_mesh("cpu", (world,)))


@pytest.mark.slow
@pytest.mark.multirank
def test_qk_norm_tensor_parallel_matches_single_process():
    """tp=2 with sequence parallel: each rank holds one of the two kv heads, so the qk-norm weight
    gradients are partial per rank until the plan's all-reduce; loss and every gradient equal one
    process."""
    want_loss, want = _grads()
    for got_loss, got in run_ranks(2, _tp_rank):
        assert got_loss == pytest.approx(want_loss, rel=1e-6)
        for name, g in want.items():
            torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_standalone_modeling_matches_qk_norm_model(tmp_path):
    """launch/modeling.py (loaded as a loose file) computes the trainer model's logits with qk-norm."""
    cfg = _cfg(ffn_type="mohge")
    model = build_model(cfg, "cpu")
    model.init_weights(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "q_norm" in name or "k_norm" in name:
                p.uniform_(0.5, 1.5)
    assert_standalone_matches(model, cfg, tmp_path, seq_len=12)
