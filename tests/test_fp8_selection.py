"""FP8 and grouped-GEMM paths: selected and rejected by config, without a GPU."""

from __future__ import annotations

import pytest
import torch

from mohge.model.config import ConfigError
from mohge.model.moe.experts import GroupedExperts, LoopExperts
from mohge.model.transformer import build_model
from mohge.train.fp8 import apply_fp8, fp8_eligible
from mohge.train.hydra_config import compose_config
from mohge.train.trainer import Trainer, resolve_expert_compute


def test_fp8_eligible_modules():
    model = build_model(compose_config("demo").model, "meta")
    chosen = {name for name, m in model.named_modules() if fp8_eligible(name, m)}
    assert "layers.1.attention.wq" in chosen and "layers.0.ffn.w1" in chosen  # dense projections
    assert "layers.1.ffn.shared.w2" in chosen
    assert not any("router" in n for n in chosen)  # routers stay fp32
    assert not any(".experts." in n for n in chosen)  # routed experts keep grouped bf16 GEMMs


def test_fp8_rejected_on_cpu_and_te_named(tmp_path):
    cfg = compose_config("tiny_mohge", ["data=synthetic", "train.fp8=torchao", f"out_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"train.fp8=torchao: FP8 needs a CUDA GPU .* use train.fp8=none"):
        Trainer(cfg)
    with pytest.raises(ConfigError, match="train.fp8=te"):
        compose_config("tiny_mohge", ["train.fp8=te"])
    model = build_model(compose_config("tiny_mohge").model, "meta")
    assert apply_fp8(model, "none", torch.device("cpu")) == 0


def test_expert_compute_selection():
    assert resolve_expert_compute("auto", torch.device("cpu")) == "ragged"
    assert resolve_expert_compute("auto", torch.device("cuda")) == "grouped"
    assert resolve_expert_compute("loop", torch.device("cuda")) == "loop"
    odd = compose_config("demo", ["model.moe.groups.0.ffn_hidden_size=100"]).model  # grouped_mm refuses it
    assert resolve_expert_compute("auto", torch.device("cuda"), odd.moe, odd.d_model) == "ragged"
    demo = compose_config("demo").model
    assert resolve_expert_compute("auto", torch.device("cuda"), demo.moe, demo.d_model) == "grouped"
    cfg = compose_config("demo", ["model.moe.expert_compute=grouped"]).model
    model = build_model(cfg, "meta", expert_compute="grouped")
    assert isinstance(model.layers["1"].ffn.experts, GroupedExperts)
    assert isinstance(build_model(cfg, "meta").layers["1"].ffn.experts, LoopExperts)
    with pytest.raises(ConfigError, match="multiple of 8 for expert_compute=grouped.*use expert_compute=ragged"):
        compose_config("demo", ["model.moe.expert_compute=grouped", "model.moe.groups.0.ffn_hidden_size=100"])
    # the fix the message names is accepted: ragged takes any width
    compose_config("demo", ["model.moe.expert_compute=ragged", "model.moe.groups.0.ffn_hidden_size=100"])


@pytest.fixture
def torchao_moe_training(monkeypatch):
    """Makes `import torchao.prototype.moe_training` succeed without torchao (not installed on
    CPU); the float8 kernel itself only runs on a GPU."""
    import sys
    import types

    for name in ("torchao", "torchao.prototype", "torchao.prototype.moe_training"):
        if name not in sys.modules:
            monkeypatch.setitem(sys.modules, name, types.ModuleType(name))


def test_fp8_experts_selection(torchao_moe_training):
    from mohge.train.fp8 import FP8_ALIGN, apply_fp8_experts, float8_grouped_mm

    cfg = compose_config("demo", ["model.moe.expert_compute=grouped"]).model
    model = build_model(cfg, "meta", expert_compute="grouped")
    groups = [m for m in model.modules() if isinstance(m, GroupedExperts)]
    assert apply_fp8_experts(model) == len(groups) > 0
    assert all(g.gemm is float8_grouped_mm and g.align == FP8_ALIGN for g in groups)
    with pytest.raises(ConfigError, match="train.fp8_experts: needs model.moe.expert_compute=grouped"):
        apply_fp8_experts(build_model(cfg, "meta", expert_compute="loop"))
    odd = compose_config("demo", ["model.moe.expert_compute=grouped", "model.moe.groups.0.ffn_hidden_size=136"]).model
    with pytest.raises(ConfigError, match="ffn_hidden_size 136 .* multiples of 16"):
        apply_fp8_experts(build_model(odd, "meta", expert_compute="grouped"))


def test_fp8_experts_rejected_without_torchao_backend(monkeypatch):
    import sys

    from mohge.train.fp8 import apply_fp8_experts

    with pytest.raises(ConfigError, match="train.fp8_experts=true: needs train.fp8=torchao"):
        compose_config("tiny_mohge", ["train.fp8_experts=true"])
    monkeypatch.setitem(sys.modules, "torchao.prototype.moe_training", None)  # import fails
    with pytest.raises(ConfigError, match="train.fp8_experts: torchao's moe_training is not importable"):
        apply_fp8_experts(build_model(compose_config("tiny_mohge").model, "meta", expert_compute="grouped"))
