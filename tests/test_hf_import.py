"""mohge-convert import-hf: tiny random Mixtral / Qwen3-MoE / Llama models built with transformers."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="HF import needs `pip install 'mohge[hf]'`")

from mohge.launch.convert import main as convert_main  # noqa: E402
from mohge.launch.modeling import MoHGEForCausalLM  # noqa: E402
from mohge.train.checkpoint import find_latest, read_meta  # noqa: E402

SMALL = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64, rms_norm_eps=1e-6)


def _hf(kind: str, **extra):
    torch.manual_seed(0)
    if kind == "mixtral":
        cfg = transformers.MixtralConfig(**SMALL, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2,
                                         **extra)
        return transformers.MixtralForCausalLM(cfg)
    if kind == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(**SMALL, intermediate_size=48, moe_intermediate_size=16, num_experts=6,
                                          num_experts_per_tok=3, norm_topk_prob=True, head_dim=8, **extra)
        return _random_qk_norms(transformers.Qwen3MoeForCausalLM(cfg))
    if kind == "qwen3":
        cfg = transformers.Qwen3Config(**SMALL, intermediate_size=40, head_dim=8, **extra)
        return _random_qk_norms(transformers.Qwen3ForCausalLM(cfg))
    if kind == "deepseek_v2":  # all layers dense: MLA (+ YaRN) is what maps
        small = {**SMALL, "num_key_value_heads": 4}
        extra = {"q_lora_rank": None, "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                          "original_max_position_embeddings": 16, "mscale": 0.707,
                                                          "mscale_all_dim": 0.707}, **extra}
        cfg = transformers.DeepseekV2Config(**small, intermediate_size=40, first_k_dense_replace=2, kv_lora_rank=12,
                                            qk_nope_head_dim=8, qk_rope_head_dim=6, v_head_dim=10, **extra)
        return _random_qk_norms(transformers.DeepseekV2ForCausalLM(cfg))
    cfg = transformers.LlamaConfig(**SMALL, intermediate_size=40, **extra)
    return transformers.LlamaForCausalLM(cfg)


def _random_qk_norms(model):
    """q/k norm weights away from their initial ones, so that a dropped or swapped norm shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight", "layernorm.weight")):
                p.uniform_(0.5, 1.5)
    return model


def _training_model(run_dir) -> torch.nn.Module:
    """The trainer's Transformer with the imported weights (through the public loader)."""
    from mohge.launch.load import load_for_eval

    return load_for_eval(str(run_dir))[0]


def _save(model, path):
    model.save_pretrained(str(path))
    return path


@pytest.mark.parametrize("kind", ["mixtral", "llama", "qwen3_moe", "qwen3"])
def test_imported_model_has_the_hf_logits(kind, tmp_path):
    hf = _hf(kind).eval()
    _save(hf, tmp_path / "hf")
    assert convert_main(["import-hf", "--input", str(tmp_path / "hf"), "--output", str(tmp_path / "run")]) == 0
    tokens = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens).logits
        got = _training_model(tmp_path / "run")(tokens)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (tmp_path / "run" / "model.yaml").is_file()
    meta = read_meta(find_latest(str(tmp_path / "run")))["model"]
    assert meta["ffn_type"] == ("dense" if kind in ("llama", "qwen3") else "mohge")
    assert meta["qk_norm"] == kind.startswith("qwen3")  # Qwen3's per-head q/k norms: model.qk_norm


def test_upcycled_dense_model_starts_with_the_dense_logits(tmp_path):
    hf = _hf("llama").eval()
    _save(hf, tmp_path / "hf")
    assert convert_main(["import-hf", "--input", str(tmp_path / "hf"), "--output", str(tmp_path / "run"),
                         "--upcycle-experts", "4", "--upcycle-top-k", "2"]) == 0
    model = _training_model(tmp_path / "run")
    experts = model.layers["0"].ffn.experts
    w1_first, w1_last = experts.expert_weights(0)[0], experts.expert_weights(3)[0]
    assert experts.num_experts == 4 and w1_first.shape == (40, 32) and torch.equal(w1_first, w1_last)
    tokens = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("extra", [{}, {"q_lora_rank": 10, "rope_parameters": {"rope_type": "default",
                                                                                 "rope_theta": 5000.0}}],
                         ids=["yarn-full-q", "plain-rope-q-lora"])
def test_deepseek_v2_mla_model_has_the_hf_logits(tmp_path, capsys, extra):
    """A DeepSeek-V2 model (MLA, dense FFNs) imports as model.attention=mla with the HF logits: the
    interleaved rotary rows are permuted to mohge's rotate-half layout, YaRN and its softmax
    temperature carry over; MoE layers are refused by name."""
    hf = _hf("deepseek_v2", **extra).eval()
    _save(hf, tmp_path / "hf")
    assert convert_main(["import-hf", "--input", str(tmp_path / "hf"), "--output", str(tmp_path / "run")]) == 0
    meta = read_meta(find_latest(str(tmp_path / "run")))["model"]
    assert meta["attention"] == "mla" and meta["mla"]["q_lora_rank"] == extra.get("q_lora_rank", 0)
    tokens = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(_training_model(tmp_path / "run")(tokens), hf(tokens).logits, rtol=1e-5, atol=1e-5)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["first_k_dense_replace"] = 1
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    assert convert_main(["import-hf", "--input", str(tmp_path / "hf"), "--output", str(tmp_path / "moe")]) == 2
    assert "first_k_dense_replace=1" in capsys.readouterr().err


def test_qwen3_moe_with_a_norm_missing_is_refused_by_name(tmp_path, capsys):
    """A Qwen3-MoE folder lacking one layer's k norm: the missing tensor is named."""
    from safetensors.torch import load_file, save_file

    _save(_hf("qwen3_moe"), tmp_path / "hf")
    state = load_file(str(tmp_path / "hf" / "model.safetensors"))
    del state["model.layers.1.self_attn.k_norm.weight"]
    save_file(state, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    assert convert_main(["import-hf", "--input", str(tmp_path / "hf"), "--output", str(tmp_path / "run")]) == 2
    assert "model.layers.1.self_attn.k_norm.weight: missing" in capsys.readouterr().err


@pytest.mark.parametrize("field,value,message", [
    ("hidden_act", "gelu", "hidden_act='gelu'"),
    ("attention_bias", True, "attention_bias=True"),
    ("rope_parameters", {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}, "rope_type='yarn'"),
    ("model_type", "gpt2", "model_type='gpt2'"),
])
def test_unmappable_config_fields_are_refused(tmp_path, capsys, field, value, message):
    _save(_hf("mixtral"), tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config[field] = value
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    assert convert_main(["import-hf", "--input", str(tmp_path / "hf"), "--output", str(tmp_path / "run")]) == 2
    assert message in capsys.readouterr().err


def test_imported_checkpoint_runs_in_the_standalone_module(tmp_path):
    """Import -> export through to-safetensors keeps the HF model's greedy continuation."""
    hf = _hf("mixtral").eval()
    _save(hf, tmp_path / "hf")
    convert_main(["import-hf", "--input", str(tmp_path / "hf"), "--output", str(tmp_path / "run")])
    convert_main(["to-safetensors", "--checkpoint", str(tmp_path / "run"), "--output", str(tmp_path / "st")])
    model = MoHGEForCausalLM.from_pretrained(str(tmp_path / "st"))
    prompt = torch.tensor([[3, 50, 7, 91, 12]])
    ours = model.generate(prompt, 8)
    theirs = hf.generate(prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(ours, theirs)
