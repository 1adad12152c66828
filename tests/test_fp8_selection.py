"""FP8 and grouped-GEMM paths: selected and rejected by config, without a GPU."""

from __future__ import annotations

import pytest
import torch

from mohge.model.config import ConfigError
from mohge.model.moe.experts import GroupedGemmExpertGroup, LoopExpertGroup
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
    assert resolve_expert_compute("auto", torch.device("cpu")) == "loop"
    assert resolve_expert_compute("auto", torch.device("cuda")) == "grouped"
    cfg = compose_config("demo", ["model.moe.expert_compute=grouped"]).model
    model = build_model(cfg, "meta", expert_compute="grouped")
    assert isinstance(model.layers["1"].ffn.experts.groups[0], GroupedGemmExpertGroup)
    assert isinstance(build_model(cfg, "meta").layers["1"].ffn.experts.groups[0], LoopExpertGroup)
    with pytest.raises(ConfigError, match="multiple of 8 for expert_compute=grouped"):
        compose_config("demo", ["model.moe.expert_compute=grouped", "model.moe.groups.0.ffn_hidden_size=100"])
