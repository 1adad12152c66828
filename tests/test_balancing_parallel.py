"""Balance scopes, aux-loss-free bias and the HMoE router under parallel layouts (gloo, CPU):
losses, gradient norms, balance metrics and every parameter and bias buffer after 4 steps equal the
single-process run's."""

from __future__ import annotations

import pytest
from test_train_parallel import PP, _assert_same_weights, _nproc, _run

GLOBAL_BIAS = ["model.moe.balance_scope=global_batch", "model.moe.bias_update_rate=0.02",
               "model.moe.group_bias_update_rate=0.02"]
SEQUENCE = ["model.moe.balance_scope=sequence"]
FLAT = ["model.moe.router=flat", "model.moe.k_group=1", "model.moe.group_aux_coeff=0", "model.moe.top_k=4",
        "model.moe.top_p=0.5", "model.moe.router_entropy_coeff=1e-3", "model.moe.bias_update_rate=0.005",
        "model.moe.balance_scope=global_batch"]
OPTIONS = {"global-bias": GLOBAL_BIAS, "sequence": SEQUENCE, "flat-top-p": FLAT}


def _compare(lines, reference, balance_keys=True):
    assert [l["lm_loss"] for l in lines] == pytest.approx([l["lm_loss"] for l in reference], rel=1e-5)
    assert [l["loss"] for l in lines] == pytest.approx([l["loss"] for l in reference], rel=1e-5)
    assert [l["grad_norm"] for l in lines] == pytest.approx([l["grad_norm"] for l in reference], rel=1e-4)
    assert [l["intra_group_aux_loss"] for l in lines] == pytest.approx(
        [l["intra_group_aux_loss"] for l in reference], rel=1e-5)
    for name, ref in reference[-1]["moe"].items():
        got = lines[-1]["moe"][name]
        for key in ("max_over_mean_load", "expert_bias_range", "group_bias_range"):
            if key in ref:
                assert got[key] == pytest.approx(ref[key], rel=1e-6, abs=1e-9), (name, key)


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Single-process runs, one per option (computed on first use)."""
    cache = {}

    def get(option: str, pp: bool = False):
        key = (option, pp)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"ref-{option}-{pp}")
            cache[key] = (out, _run(out, 1, *(PP if pp else []), *OPTIONS[option]))
        return cache[key]

    return get


@pytest.mark.slow
@pytest.mark.multirank
@pytest.mark.parametrize(
    "option, layout",
    [
        ("global-bias", ["parallel.dp_replicate=2"]),
        ("global-bias", ["parallel.dp_shard=2", "parallel.ep=2"]),
        ("global-bias", ["parallel.tp=2"]),
        ("sequence", ["parallel.dp_shard=2", "parallel.ep=2"]),
        ("flat-top-p", ["parallel.dp_shard=2", "parallel.ep=2"]),
    ],
    ids=["global-bias-dp2", "global-bias-fsdp2-ep2", "global-bias-tp2", "sequence-fsdp2-ep2", "flat-fsdp2-ep2"],
)
def test_balancing_layout_matches_single_process(tmp_path, references, option, layout):
    ref_dir, reference = references(option)
    lines = _run(tmp_path, _nproc(layout), *OPTIONS[option], *layout)
    _compare(lines, reference)
    assert "max_over_mean_load" in lines[-1]["moe"]["layers.0.ffn"]
    if option != "sequence":
        # The bias moved (sign updates can return it to 0 on some steps, so look at every step).
        assert any(l["moe"]["layers.0.ffn"]["expert_bias_range"] != [0.0, 0.0] for l in lines)
    _assert_same_weights(tmp_path, ref_dir)  # includes the bias and global-slot buffers


@pytest.mark.slow
@pytest.mark.multirank
@pytest.mark.parametrize("layout", [["parallel.pp=2"], ["parallel.pp=2", "parallel.dp_shard=2", "parallel.ep=2"]],
                         ids=["pp2", "fsdp2-ep2-pp2"])
def test_global_bias_under_pipeline(tmp_path, references, layout):
    ref_dir, reference = references("global-bias", pp=True)
    lines = _run(tmp_path, _nproc(layout), *PP, *GLOBAL_BIAS, *layout)
    _compare(lines, reference)
    assert sorted(lines[-1]["moe"]) == sorted(reference[-1]["moe"])
    _assert_same_weights(tmp_path, ref_dir)


@pytest.mark.slow
@pytest.mark.multirank
def test_global_bias_resume_under_another_layout(tmp_path, references):
    """Save after 2 steps under fsdp2 x ep2, finish on one process: the bias and the previous step's
    global slots come back from the checkpoint, so the run equals 4 uninterrupted steps."""
    ref_dir, reference = references("global-bias")
    save = ["parallel.dp_shard=2", "parallel.ep=2"]
    _run(tmp_path, 2, *GLOBAL_BIAS, *save, "train.steps=2", "checkpoint.every=2", "train.lr_decay_steps=4")
    lines = _run(tmp_path, 1, *GLOBAL_BIAS, "checkpoint.resume=auto")
    assert [l["loss"] for l in lines] == pytest.approx([l["loss"] for l in reference], rel=1e-5)
    _assert_same_weights(tmp_path, ref_dir)


@pytest.mark.slow
def test_global_bias_with_activation_checkpointing(tmp_path, references):
    """Recomputed forwards count nothing: same losses, loads, biases and weights as without."""
    ref_dir, reference = references("global-bias")
    lines = _run(tmp_path, 1, *GLOBAL_BIAS, "parallel.activation_checkpoint=full")
    _compare(lines, reference)
    _assert_same_weights(tmp_path, ref_dir)
