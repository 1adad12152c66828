"""Config composition, validation errors and the derived parameter counts."""

from __future__ import annotations

import pytest

from mohge.model.config import ConfigError
from mohge.model.transformer import build_model
from mohge.train.hydra_config import compose_config

PRESETS = ["demo", "tiny_mohge", "tiny_moe", "mohge_3b", "moe_3b"]


@pytest.mark.parametrize("preset", PRESETS)
def test_model_param_count_matches_config(preset):
    cfg = compose_config(preset)
    model = build_model(cfg.model, "meta")
    assert model.num_params() == cfg.model.num_params()
    # Routed experts are stored unpadded: their parameters are exactly the real ones.
    routed = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert routed == cfg.model.num_routed_expert_params()


def test_mohge_3b_has_18_75_percent_fewer_routed_expert_params():
    mohge = compose_config("mohge_3b").model
    moe = compose_config("moe_3b").model
    ratio = mohge.num_routed_expert_params() / moe.num_routed_expert_params()
    assert ratio == pytest.approx(1 - 0.1875)
    # Same trunk: totals differ by the routed experts and the 7 extra group-gate rows per layer.
    routed_diff = moe.num_routed_expert_params() - mohge.num_routed_expert_params()
    router_diff = mohge.n_layers * mohge.d_model * (mohge.moe.num_groups - moe.moe.num_groups)
    assert moe.num_params() - mohge.num_params() == routed_diff - router_diff
    # Uniform routing over groups: mean MoHGE width 832 vs 1024, so fewer active params too.
    assert mohge.active_params_per_token() < moe.active_params_per_token()


def test_active_params_follow_group_traffic():
    cfg = compose_config("tiny_mohge").model
    narrow = cfg.active_params_per_token([1.0, 0.0, 0.0])
    wide = cfg.active_params_per_token([0.0, 0.0, 1.0])
    # top_k=3 experts per token, width 16 vs 48, three d_model x F matrices each, per MoE layer.
    assert wide - narrow == cfg.num_moe_layers * 3 * cfg.d_model * 3 * (48 - 16)
    assert cfg.flops_per_token(32, [0.0, 0.0, 1.0]) > cfg.flops_per_token(32, [1.0, 0.0, 0.0])


@pytest.mark.parametrize(
    "override, field",
    [
        ("model.moe.k_group=4", "model.moe.k_group"),
        ("model.moe.top_k=9", "model.moe.top_k"),
        ("model.n_heads=5", "model.d_model"),
        ("model.n_kv_heads=3", "model.n_kv_heads"),
        ("model.moe.topk_mode=sideways", "model.moe.topk_mode"),
        ("train.seq_len=1000", "train.seq_len"),
        ("train.global_batch_size=6", "train.global_batch_size"),
        ("model.moe.allocation=random", "model.moe.allocation"),
        ("model.moe.group_aux_start_fraction=1.5", "model.moe.group_aux_start_fraction"),
        ("train.fp8=te", "train.fp8"),
        ("parallel.tp=3 parallel.dp_shard=1", "model.n_heads"),
        ("model.moe.expert_compute=grouped model.moe.groups.0.ffn_hidden_size=12", "model.moe.groups[0].ffn_hidden_size"),
        ("train.compile=true parallel.activation_checkpoint=selective", "train.compile"),
        ("parallel.pp=2 parallel.dp_shard=1 parallel.pp_virtual_stages=2", "parallel.pp_virtual_stages"),
    ],
)
def test_config_errors_name_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        compose_config("tiny_mohge", override.split())
    assert str(err.value).startswith(field)


def test_per_group_needs_multiple_of_k_group():
    with pytest.raises(ConfigError, match="multiple of k_group"):
        compose_config("tiny_mohge", ["model.moe.topk_mode=per_group", "model.moe.top_k=3"])
    cfg = compose_config("tiny_mohge", ["model.moe.topk_mode=per_group", "model.moe.top_k=4"])
    assert cfg.model.moe.top_k == 4


def test_unknown_key_is_a_config_error():
    with pytest.raises(ConfigError, match="model.moe.bogus"):
        compose_config("tiny_mohge", ["model.moe.bogus=1"])
