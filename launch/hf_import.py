"""Open transformers checkpoints -> a mohge starting point (`mohge-convert import-hf`).

Maps Mixtral- and Qwen-MoE-style models (SwiGLU experts, softmax top-k router with renormalised
weights, RMSNorm, RoPE, GQA; Qwen3's per-head q/k norms as model.qk_norm) to a one-group MoHGE,
DeepSeek-V2-style dense models with multi-head latent attention to model.attention=mla
(launch/hf_import_mla.py), and Llama/Mistral/Qwen3-style dense models to
ffn_type=dense, or with --upcycle-experts N to N copies of the dense FFN behind a new router
(the output is the dense output at first, since the combine weights sum to one). Every tensor
name is mapped explicitly; a config field or tensor that has no exact mohge counterpart (biases,
sliding windows, RoPE scaling, shared-expert gates, unnormalised top-k weights, ...)
is refused by name. The result is a weights-only DCP checkpoint plus RUN_DIR/model.yaml, the
model config a run must use to resume it.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from mohge.launch.convert import write_dcp
from mohge.model.config import ExpertGroupConfig, ModelConfig, MoEConfig
from mohge.train.checkpoint import CheckpointError

MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe")
DENSE_TYPES = ("llama", "mistral", "qwen3")
QK_NORM_TYPES = ("qwen3", "qwen3_moe")  # per-head q/k RMSNorm before RoPE: mohge's model.qk_norm
QK_NORM = {"self_attn.q_norm.weight": "attention.q_norm.weight", "self_attn.k_norm.weight": "attention.k_norm.weight"}
# per layer: HF name (after "model.layers.{i}.") -> mohge name (after "layers.{i}.")
ATTENTION = {"input_layernorm.weight": "attention_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
             "self_attn.q_proj.weight": "attention.wq.weight", "self_attn.k_proj.weight": "attention.wk.weight",
             "self_attn.v_proj.weight": "attention.wv.weight", "self_attn.o_proj.weight": "attention.wo.weight"}
DENSE_FFN = {"mlp.gate_proj.weight": "ffn.w1.weight", "mlp.up_proj.weight": "ffn.w3.weight",
             "mlp.down_proj.weight": "ffn.w2.weight"}
# MoE: router and per-expert names of each family, expert weights as (w1, w3, w2)
MOE_NAMES = {"mixtral": ("block_sparse_moe.gate.weight", "block_sparse_moe.experts.{e}.{r}.weight",
                         {"w1": "w1", "w3": "w3", "w2": "w2"}),
             "qwen": ("mlp.gate.weight", "mlp.experts.{e}.{r}.weight",
                      {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"})}


def _refuse(field: str, value, why: str) -> None:
    raise CheckpointError(f"config.json {field}={value!r}: {why}; mohge cannot import this model exactly")


def _rope_theta(hf: dict) -> float:
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", None):
        _refuse("rope_parameters.rope_type", kind, "only plain RoPE maps (no scaling)")
    return float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))


def model_config(hf: dict, upcycle_experts: int = 0, upcycle_top_k: int = 2) -> dict:
    """The mohge model dict equivalent to an HF config.json, or CheckpointError naming the field."""
    from mohge.launch.hf_import_mla import MLA_TYPES, mla_model_config

    kind = hf.get("model_type")
    if kind in MLA_TYPES:
        if upcycle_experts:
            raise CheckpointError(f"--upcycle-experts: not supported for {kind} (MLA) models yet")
        return mla_model_config(hf)
    if kind not in MOE_TYPES + DENSE_TYPES:
        _refuse("model_type", kind, f"supported: {', '.join(MOE_TYPES + DENSE_TYPES + MLA_TYPES)}")
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("hidden_act", "silu") != "silu":
        _refuse("hidden_act", hf["hidden_act"], "experts and FFNs are SwiGLU (silu)")
    if hf.get("head_dim") not in (None, d // heads):
        _refuse("head_dim", hf["head_dim"], f"mohge uses hidden_size / num_attention_heads = {d // heads}")
    for field in ("attention_bias", "mlp_bias"):
        if hf.get(field):
            _refuse(field, hf[field], "mohge projections have no bias")
    if hf.get("sliding_window") is not None and hf.get("use_sliding_window", True):
        _refuse("sliding_window", hf["sliding_window"], "mohge attention is full causal")
    cfg = ModelConfig(vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["num_hidden_layers"], n_heads=heads,
                      n_kv_heads=hf.get("num_key_value_heads") or heads, ffn_hidden_size=hf["intermediate_size"],
                      max_seq_len=hf["max_position_embeddings"], rope_theta=_rope_theta(hf),
                      norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=bool(hf.get("tie_word_embeddings")),
                      init_std=hf.get("initializer_range", 0.02), ffn_type="dense", qk_norm=kind in QK_NORM_TYPES)
    if kind in MOE_TYPES:
        if upcycle_experts:
            raise CheckpointError(f"--upcycle-experts: {kind} is already a mixture of experts; upcycling takes a dense model")
        if kind == "mixtral":
            experts, width = hf["num_local_experts"], hf["intermediate_size"]
        else:
            experts, width = hf.get("num_local_experts", hf.get("num_experts")), hf["moe_intermediate_size"]
            if not hf.get("norm_topk_prob", False):
                _refuse("norm_topk_prob", hf.get("norm_topk_prob"), "mohge renormalises the top-k weights")
            if hf.get("decoder_sparse_step", 1) != 1 or hf.get("mlp_only_layers"):
                _refuse("decoder_sparse_step/mlp_only_layers", (hf.get("decoder_sparse_step"), hf.get("mlp_only_layers")),
                        "every layer must be MoE")
            if hf.get("shared_expert_intermediate_size"):
                _refuse("shared_expert_intermediate_size", hf["shared_expert_intermediate_size"],
                        "the shared expert has a sigmoid gate mohge does not have")
        cfg.ffn_type = "mohge"
        cfg.moe = MoEConfig(groups=[ExpertGroupConfig(experts, width)], k_group=1, top_k=hf["num_experts_per_tok"],
                            group_aux_start_fraction=0.0)
    elif upcycle_experts:
        if not 1 <= upcycle_top_k <= upcycle_experts:
            raise CheckpointError(f"--upcycle-top-k {upcycle_top_k}: must be in 1..{upcycle_experts}")
        cfg.ffn_type = "mohge"
        cfg.moe = MoEConfig(groups=[ExpertGroupConfig(upcycle_experts, hf["intermediate_size"])], k_group=1,
                            top_k=upcycle_top_k, group_aux_start_fraction=0.0)
    cfg.validate()
    return asdict(cfg)


def map_state(hf: dict, state: dict[str, torch.Tensor], model: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """HF tensors -> mohge names (experts stacked [N, F, D] / [N, D, F]); leftovers are refused."""
    left = dict(state)
    out: dict[str, torch.Tensor] = {}

    def take(name: str) -> torch.Tensor:
        if name not in left:
            raise CheckpointError(f"{name}: missing from the checkpoint")
        return left.pop(name).float()

    out["tok_embeddings.weight"] = take("model.embed_tokens.weight")
    out["norm.weight"] = take("model.norm.weight")
    if model["tie_embeddings"]:
        left.pop("lm_head.weight", None)
    else:
        out["output.weight"] = take("lm_head.weight")
    kind = hf["model_type"]
    gen = torch.Generator().manual_seed(seed)
    for i in range(model["n_layers"]):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        if model.get("attention") == "mla":
            from mohge.launch.hf_import_mla import map_mla_layer

            out.update(map_mla_layer(take, src, dst, model))
            continue
        for a, b in {**ATTENTION, **(QK_NORM if model.get("qk_norm") else {})}.items():
            out[dst + b] = take(src + a)
        if kind in MOE_TYPES:
            gate_name, pattern, roles = MOE_NAMES["mixtral" if kind == "mixtral" else "qwen"]
            out[dst + "ffn.router.expert_gate.weight"] = take(src + gate_name)
            n = model["moe"]["groups"][0]["num_experts"]
            for hf_role, role in roles.items():
                rows = [take(src + pattern.format(e=e, r=hf_role)) for e in range(n)]
                out[dst + f"ffn.experts.groups.0.{role}"] = torch.stack(rows)
            out[dst + "ffn.router.group_gate.weight"] = torch.zeros(1, model["d_model"])
        else:
            dense = {b: take(src + a) for a, b in DENSE_FFN.items()}
            if model["ffn_type"] == "dense":
                out.update({dst + k: v for k, v in dense.items()})
            else:  # upcycled: every expert starts as the dense FFN, the router at random
                n = model["moe"]["groups"][0]["num_experts"]
                for role in ("w1", "w3", "w2"):
                    out[dst + f"ffn.experts.groups.0.{role}"] = dense[f"ffn.{role}.weight"].expand(n, -1, -1).clone()
                std = model["moe"]["router_init_std"]
                out[dst + "ffn.router.expert_gate.weight"] = torch.randn(n, model["d_model"], generator=gen) * std
                out[dst + "ffn.router.group_gate.weight"] = torch.zeros(1, model["d_model"])
    left = {k: v for k, v in left.items() if not k.endswith("rotary_emb.inv_freq")}
    if left:
        name = sorted(left)[0]
        raise CheckpointError(f"{name}: no mohge counterpart ({len(left)} such tensors); this architecture "
                              "variant cannot be imported exactly")
    return out


def read_hf(directory: str) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    d = Path(directory)
    if not (d / "config.json").is_file():
        raise CheckpointError(f"{d / 'config.json'}: missing; give a transformers model folder (save_pretrained)")
    hf = json.loads((d / "config.json").read_text())
    index = d / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    state = {}
    for name in files:
        if not (d / name).is_file():
            raise CheckpointError(f"{d / name}: missing (only safetensors weights are read)")
        state.update(load_file(str(d / name)))
    return hf, state


def import_hf(input_dir: str, output: str, upcycle_experts: int = 0, upcycle_top_k: int = 2,
              seed: int = 0) -> tuple[Path, dict]:
    """Writes a weights-only checkpoint under run dir `output` and OUTPUT/model.yaml."""
    hf, state = read_hf(input_dir)
    model = model_config(hf, upcycle_experts, upcycle_top_k)
    mapped = map_state(hf, state, model, seed)
    target = write_dcp(model, mapped, output)
    from omegaconf import OmegaConf

    (Path(output) / "model.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(model)))
    return target, model
