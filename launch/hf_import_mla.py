"""DeepSeek-V2-style transformers checkpoints (multi-head latent attention) -> mohge (`import-hf`).

The attention maps exactly onto `model.attention=mla`: q_proj (or q_a_proj -> q_a_layernorm ->
q_b_proj), kv_a_proj_with_mqa -> kv_a_layernorm -> kv_b_proj, o_proj; the latent norms become
`mla.qk_norm=true`. DeepSeek stores the rotary dims interleaved (pairs (2i, 2i+1) rotate together,
as complex numbers) while mohge rotates halves (i, i + R/2, megatron's default), so the rope rows
of the query projection and of kv_a_proj_with_mqa are permuted (evens first, then odds): q.k is
unchanged because both sides get the same permutation. Plain and YaRN RoPE map (with YaRN's
softmax temperature through mscale_all_dim). Dense layers map to SwiGLU FFNs; MoE layers are
refused (DeepSeek-V2 scales un-renormalised top-k softmax weights by routed_scaling_factor, which
mohge's combine does not compute), so only models with first_k_dense_replace >= num_hidden_layers
import.
"""

from __future__ import annotations

from dataclasses import asdict

import torch

from mohge.model.config import MLAConfig, ModelConfig, RopeScalingConfig
from mohge.train.checkpoint import CheckpointError

MLA_TYPES = ("deepseek_v2",)
LATENT_NORM_EPS = 1e-6  # DeepseekV2RMSNorm's default, which its latent norms use whatever rms_norm_eps says


def _refuse(field: str, value, why: str) -> None:
    raise CheckpointError(f"config.json {field}={value!r}: {why}; mohge cannot import this model exactly")


def _rope(hf: dict) -> tuple[float, RopeScalingConfig]:
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind in ("default", None):
        return theta, RopeScalingConfig()
    if kind != "yarn":
        _refuse("rope_parameters.rope_type", kind, "only plain RoPE and YaRN map")
    if rope.get("attention_factor") is not None:
        _refuse("rope_parameters.attention_factor", rope["attention_factor"], "mohge derives it from mscale")
    factor = rope.get("factor") or hf["max_position_embeddings"] / rope["original_max_position_embeddings"]
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
    if not (mscale and mscale_all_dim):  # transformers then uses mscale(factor, 1) alone
        mscale, mscale_all_dim = 1.0, 0.0
    return theta, RopeScalingConfig(type="yarn", factor=float(factor),
                                    original_max_seq_len=int(rope["original_max_position_embeddings"]),
                                    beta_fast=float(rope.get("beta_fast") or 32), beta_slow=float(rope.get("beta_slow") or 1),
                                    mscale=float(mscale), mscale_all_dim=float(mscale_all_dim))


def mla_model_config(hf: dict) -> dict:
    """The mohge model dict of a DeepSeek-V2-style config.json, or CheckpointError naming the field."""
    if hf.get("hidden_act", "silu") != "silu":
        _refuse("hidden_act", hf["hidden_act"], "FFNs are SwiGLU (silu)")
    for field in ("attention_bias", "mlp_bias"):
        if hf.get(field):
            _refuse(field, hf[field], "mohge projections have no bias")
    n_layers = hf["num_hidden_layers"]
    if hf.get("first_k_dense_replace", 0) < n_layers:
        _refuse("first_k_dense_replace", hf.get("first_k_dense_replace", 0),
                f"layers from there on are DeepSeek-V2 MoE (top-k softmax weights x routed_scaling_factor, not "
                f"renormalised); only all-dense models (first_k_dense_replace >= {n_layers}) import")
    if hf.get("rms_norm_eps", 1e-6) != LATENT_NORM_EPS:
        _refuse("rms_norm_eps", hf["rms_norm_eps"], f"the HF latent norms use eps {LATENT_NORM_EPS} while mohge "
                "uses one model.norm_eps for every norm")
    theta, scaling = _rope(hf)
    heads = hf["num_attention_heads"]
    mla = MLAConfig(q_lora_rank=hf.get("q_lora_rank") or 0, kv_lora_rank=hf["kv_lora_rank"],
                    qk_nope_head_dim=hf["qk_nope_head_dim"], qk_rope_head_dim=hf["qk_rope_head_dim"],
                    v_head_dim=hf["v_head_dim"], qk_norm=True)
    cfg = ModelConfig(vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=n_layers, n_heads=heads,
                      n_kv_heads=heads, ffn_hidden_size=hf["intermediate_size"], max_seq_len=hf["max_position_embeddings"],
                      rope_theta=theta, norm_eps=LATENT_NORM_EPS, tie_embeddings=bool(hf.get("tie_word_embeddings")),
                      init_std=hf.get("initializer_range", 0.02), ffn_type="dense", attention="mla", mla=mla,
                      rope_scaling=scaling)
    cfg.validate()
    return asdict(cfg)


def rope_rows_to_half(w: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """Rows [..., R, in] from interleaved rotary layout (pairs 2i, 2i+1) to rotate-half (i, i + R/2)."""
    perm = torch.cat([torch.arange(0, rope_dim, 2), torch.arange(1, rope_dim, 2)])
    return w[..., perm, :]


def map_mla_layer(take, src: str, dst: str, model: dict) -> dict[str, torch.Tensor]:
    """One DeepSeek-V2 decoder layer's tensors under mohge names."""
    m, heads, d = model["mla"], model["n_heads"], model["d_model"]
    nope, rope = m["qk_nope_head_dim"], m["qk_rope_head_dim"]
    out = {dst + "attention_norm.weight": take(src + "input_layernorm.weight"),
           dst + "ffn_norm.weight": take(src + "post_attention_layernorm.weight")}

    def query(w):  # [H * (N + R), in]: permute each head's rope rows
        w = w.view(heads, nope + rope, -1)
        return torch.cat([w[:, :nope], rope_rows_to_half(w[:, nope:], rope)], 1).reshape(heads * (nope + rope), -1)

    a = src + "self_attn."
    if m["q_lora_rank"]:
        out[dst + "attention.wq_a.weight"] = take(a + "q_a_proj.weight")
        out[dst + "attention.q_norm.weight"] = take(a + "q_a_layernorm.weight")
        out[dst + "attention.wq_b.weight"] = query(take(a + "q_b_proj.weight"))
    else:
        out[dst + "attention.wq.weight"] = query(take(a + "q_proj.weight"))
    kv_a = take(a + "kv_a_proj_with_mqa.weight")
    c = m["kv_lora_rank"]
    out[dst + "attention.wkv_a.weight"] = torch.cat([kv_a[:c], rope_rows_to_half(kv_a[c:], rope)])
    out[dst + "attention.kv_norm.weight"] = take(a + "kv_a_layernorm.weight")
    out[dst + "attention.wkv_b.weight"] = take(a + "kv_b_proj.weight")
    out[dst + "attention.wo.weight"] = take(a + "o_proj.weight")
    for hf_name, name in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
        out[dst + f"ffn.{name}.weight"] = take(src + f"mlp.{hf_name}.weight")
    assert out[dst + "attention.wkv_a.weight"].shape == (c + rope, d)
    return out
