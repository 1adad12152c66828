"""mohge-train under torchrun on CPU (gloo): parallel layouts give the single-process losses."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed import layout_nproc, run_train

ROOT = Path(__file__).parents[1]

BASE = ["--config-name", "tiny_mohge", "data=synthetic", "train.steps=4", "train.micro_batch_size=2",
        "train.global_batch_size=4", "train.eval_every=2", "logging.progress=false", "train.log_every=1"]


def _run(out_dir, nproc: int, *overrides) -> list[dict]:
    return run_train(out_dir, nproc, BASE, *overrides, timeout=240)


_nproc = layout_nproc


def slow_after_first(cases: list) -> list:
    """The first case in the default suite, the others in the slow CI step (`make test-slow`)."""
    as_param = lambda c: pytest.param(*(c if isinstance(c, tuple) else (c,)), marks=pytest.mark.slow)  # noqa: E731
    return [cases[0], *map(as_param, cases[1:])]


def _final_weights(out_dir) -> dict:
    """Every model tensor of the run's final checkpoint at full size (experts joined)."""
    from mohge.launch.convert import load_consolidated
    from mohge.train.checkpoint import step_dir

    return load_consolidated(step_dir(str(out_dir), 4))


def _assert_same_weights(out_dir, reference_dir, atol: float = 1e-5) -> None:
    """After 4 optimizer steps every parameter equals the single-process run's."""
    got, want = _final_weights(out_dir), _final_weights(reference_dir)
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-4, atol=atol, msg=lambda m: f"{name}: {m}")


def _val_losses(lines: list[dict]) -> list[float]:
    """Validation losses (steps 2 and 4): the same held-out set is read in every layout."""
    val = [l["val_loss"] for l in lines if "val_loss" in l]
    assert len(val) == 2
    return val


def _assert_same_metrics(lines: list[dict], reference: list[dict]) -> None:
    """The logged metrics equal the single process at every step: the total loss and every aux
    term (finite), and per MoE layer the group fractions and expert loads over the same tokens."""
    assert len(lines) == len(reference)
    for got, want in zip(lines, reference):
        for key in ("loss", "lm_loss", "group_aux_loss", "intra_group_aux_loss", "z_loss"):
            assert math.isfinite(got[key]), (got["step"], key, got[key])
            assert got[key] == pytest.approx(want[key], rel=1e-5), (got["step"], key)
        assert sorted(got["moe"]) == sorted(want["moe"])  # every stage's layers reported
        for name, layer in want["moe"].items():
            for key in ("group_fraction", "expert_load"):
                assert got["moe"][name][key] == pytest.approx(layer[key], abs=1e-6), (got["step"], name, key)


def _assert_matches_reference(tmp_path, lines: list[dict], reference: list[dict], reference_dir) -> None:
    """Losses, grad norms, validation losses, final parameters and logged metrics of a parallel
    run equal the single process's."""
    assert [l["lm_loss"] for l in lines] == pytest.approx([l["lm_loss"] for l in reference], rel=1e-5)
    assert [l["grad_norm"] for l in lines] == pytest.approx([l["grad_norm"] for l in reference], rel=1e-4)
    assert _val_losses(lines) == pytest.approx(_val_losses(reference), rel=1e-5)
    _assert_same_weights(tmp_path, reference_dir)
    _assert_same_metrics(lines, reference)


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ref")


@pytest.fixture(scope="module")
def reference(reference_dir):
    return _run(reference_dir, 1)


@pytest.mark.multirank
@pytest.mark.parametrize(
    "layout",
    [
        ["parallel.dp_replicate=2"],
        ["parallel.dp_shard=2"],
        ["parallel.dp_shard=2", "parallel.ep=2"],
        ["parallel.dp_shard=2", "parallel.ep=2", "model.moe.allocation=group_coupled"],
        ["parallel.tp=2"],
        ["parallel.tp=2", "parallel.sequence_parallel=false"],
        ["parallel.dp_replicate=2", "parallel.tp=2", "parallel.ep=2"],
        ["parallel.dp_shard=2", "parallel.tp=2", "parallel.ep=2"],
    ],
    ids=["dp2", "fsdp2", "fsdp2-ep2", "ep2-coupled", "tp2-sp", "tp2", "dp2-tp2-ep2", "fsdp2-tp2-ep2"],
)
def test_layout_matches_single_process(tmp_path, reference, reference_dir, layout):
    lines = _run(tmp_path, _nproc(layout), *layout)
    _assert_matches_reference(tmp_path, lines, reference, reference_dir)
    layer = lines[0]["moe"]["layers.0.ffn"]
    ref_layer = reference[0]["moe"]["layers.0.ffn"]
    assert layer["expert_load"] == pytest.approx(ref_layer["expert_load"])  # counts summed over dp
    if "parallel.ep=2" in layout:
        assert len(layer["ep_rank_tokens"]) == 2 and layer["ep_flop_imbalance"] >= 1.0


def test_bad_layout_fails_before_any_work(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mohge.train.cli", *BASE, f"out_dir={tmp_path}", "parallel.ep=2"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert "parallel.ep: 2 must divide the data-parallel degree" in proc.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.multirank
@pytest.mark.parametrize(
    "save_layout, resume_layout",
    slow_after_first([
        (["parallel.dp_shard=2", "parallel.ep=2"], []),
        (["parallel.dp_shard=2", "parallel.ep=2"], ["parallel.dp_shard=2", "parallel.ep=2",
                                                    "model.moe.allocation=group_coupled"]),
        ([], ["parallel.dp_shard=2", "parallel.ep=2"]),
        (["parallel.dp_replicate=2"], ["parallel.dp_shard=2"]),
        (["parallel.dp_shard=2"], []),
        (["parallel.tp=2"], ["parallel.dp_shard=2", "parallel.ep=2"]),
        (["parallel.tp=2"], ["parallel.pp=2"]),
        (["parallel.dp_shard=2", "parallel.ep=2", "checkpoint.async_save=true"], []),
        (["parallel.dp_shard=2", "parallel.tp=2"], ["parallel.pp=2"]),
    ]),
    ids=["ep2->1", "ep2->ep2-coupled", "1->ep2", "dp2->fsdp2", "fsdp2->1", "tp2->fsdp2-ep2", "tp2->pp2",
         "fsdp2-ep2-async->1", "fsdp2-tp2->pp2"],
)
def test_resume_under_another_layout(tmp_path, reference, reference_dir, save_layout, resume_layout):
    """Save after 2 of 4 steps under one layout, finish under another: same losses as 4 steps."""
    _run(tmp_path, _nproc(save_layout), *save_layout, "train.steps=2",
         "checkpoint.every=2", "train.lr_decay_steps=4")
    lines = _run(tmp_path, _nproc(resume_layout), *resume_layout, "checkpoint.resume=auto")
    resumed = [l["lm_loss"] for l in lines]
    assert len(resumed) == 4
    assert resumed == pytest.approx([l["lm_loss"] for l in reference], rel=1e-5)
    _assert_same_weights(tmp_path, reference_dir)


PP = ["model.n_layers=4", "train.micro_batch_size=1"]


@pytest.fixture(scope="module")
def pp_reference_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ppref")


@pytest.fixture(scope="module")
def pp_reference(pp_reference_dir):
    return _run(pp_reference_dir, 1, *PP)


@pytest.mark.multirank
@pytest.mark.parametrize(
    "layout",
    slow_after_first([
        ["parallel.pp=2"],
        ["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_virtual_stages=2"],
        ["parallel.pp=2", "parallel.tp=2"],
        ["parallel.pp=2", "parallel.tp=2", "parallel.dp_replicate=2", "parallel.ep=2"],
        ["parallel.dp_replicate=4", "parallel.ep=2"],
        ["parallel.dp_replicate=2", "parallel.dp_shard=2", "parallel.ep=2"],
        ["parallel.pp=2", "parallel.dp_shard=2", "parallel.ep=2"],
        ["parallel.pp=2", "parallel.tp=2", "parallel.dp_shard=2", "parallel.ep=2"],
    ]),
    ids=["pp2-1f1b", "pp2-interleaved", "tp2-pp2", "tp2-ep2-pp2", "dp4-ep2", "hsdp-ep2", "fsdp2-ep2-pp2",
         "fsdp2-tp2-ep2-pp2"],
)
def test_pipeline_layouts_match_single_process(tmp_path, pp_reference, pp_reference_dir, layout):
    """Layouts needing one sequence per micro-batch (pipelines; 4 data-parallel ranks). With
    pipelining, aux losses attached on every stage reach the gradients exactly as without it;
    with dp4 x ep2 each expert has two replicas whose gradients are averaged; with FSDP each
    stage's view is the root unit and gradients are reduced once per step."""
    lines = _run(tmp_path, _nproc(layout), *PP, *layout)
    assert [l["lm_loss"] for l in lines] == pytest.approx([l["lm_loss"] for l in pp_reference], rel=1e-5)
    assert [l["grad_norm"] for l in lines] == pytest.approx([l["grad_norm"] for l in pp_reference], rel=1e-4)
    _assert_same_metrics(lines, pp_reference)
    assert _val_losses(lines) == pytest.approx(_val_losses(pp_reference), rel=1e-5)
    _assert_same_weights(tmp_path, pp_reference_dir)


@pytest.mark.slow
@pytest.mark.multirank
def test_resume_ep2_tp2_as_ep4(tmp_path, pp_reference, pp_reference_dir):
    """Save under dp2 x tp2 x ep2 (4 processes), finish under dp4 x ep4: same losses."""
    _run(tmp_path, 4, *PP, "parallel.dp_replicate=2", "parallel.tp=2", "parallel.ep=2", "train.steps=2",
         "checkpoint.every=2", "train.lr_decay_steps=4")
    lines = _run(tmp_path, 4, *PP, "parallel.dp_replicate=4", "parallel.ep=4", "checkpoint.resume=auto")
    assert [l["lm_loss"] for l in lines] == pytest.approx([l["lm_loss"] for l in pp_reference], rel=1e-5)
    _assert_same_weights(tmp_path, pp_reference_dir)


@pytest.mark.multirank
@pytest.mark.parametrize(
    "layout",
    slow_after_first([
        ["parallel.tp=2", "parallel.ep=2", "parallel.moe_fold=true"],
        ["parallel.dp_shard=2", "parallel.tp=2", "parallel.ep=4", "parallel.moe_fold=true"],
        ["parallel.dp_replicate=2", "parallel.tp=2", "parallel.ep=4", "parallel.moe_fold=true"],
        ["parallel.dp_shard=2", "parallel.tp=2", "parallel.ep=2", "parallel.moe_fold=true"],
    ]),
    ids=["tp2-ep2-fold", "fsdp2-tp2-ep4-fold", "dp2-tp2-ep4-fold", "fsdp2-tp2-ep2-fold"],
)
def test_moe_folding_matches_single_process(tmp_path, reference, reference_dir, layout):
    """MoE parallel folding: attention tp2 (sequence parallel) while the experts use ep over the
    tp x dp ranks, so ep may exceed dp (ep4 on dp2). Losses, grad norms, parameters and the logged
    MoE metrics equal the single process; with fsdp2-tp2-ep2 (ep over the tp ranks) each expert's
    two holders are a dp pair that FSDP-shards it."""
    lines = _run(tmp_path, _nproc(layout), *layout)
    _assert_matches_reference(tmp_path, lines, reference, reference_dir)
    ep = int(next(o for o in layout if o.startswith("parallel.ep=")).split("=")[1])
    assert len(lines[0]["moe"]["layers.0.ffn"]["ep_rank_tokens"]) == ep


@pytest.mark.slow
@pytest.mark.multirank
@pytest.mark.parametrize("layout", [
    ["parallel.pp=2", "parallel.tp=2", "parallel.ep=2", "parallel.moe_fold=true"],
    ["parallel.pp=2", "parallel.tp=2", "parallel.ep=2", "parallel.moe_fold=true", "parallel.activation_checkpoint=full"],
], ids=["tp2-ep2-fold-pp2", "tp2-ep2-fold-pp2-ac"])
def test_moe_folding_pipeline_matches_single_process(tmp_path, pp_reference, pp_reference_dir, layout):
    """Folding inside each pipeline stage (and with recomputed forwards under activation
    checkpointing): the single-process losses, grad norms, metrics and parameters."""
    lines = _run(tmp_path, _nproc(layout), *PP, *layout)
    assert [l["lm_loss"] for l in lines] == pytest.approx([l["lm_loss"] for l in pp_reference], rel=1e-5)
    assert [l["grad_norm"] for l in lines] == pytest.approx([l["grad_norm"] for l in pp_reference], rel=1e-4)
    _assert_same_metrics(lines, pp_reference)
    _assert_same_weights(tmp_path, pp_reference_dir)


@pytest.mark.slow
@pytest.mark.multirank
def test_resume_folded_as_unfolded(tmp_path, reference, reference_dir):
    """Save under tp2 x ep2 folded (2 processes), finish under fsdp2 x ep2: same losses and weights."""
    _run(tmp_path, 2, "parallel.tp=2", "parallel.ep=2", "parallel.moe_fold=true", "train.steps=2",
         "checkpoint.every=2", "train.lr_decay_steps=4")
    lines = _run(tmp_path, 2, "parallel.dp_shard=2", "parallel.ep=2", "checkpoint.resume=auto")
    assert [l["lm_loss"] for l in lines] == pytest.approx([l["lm_loss"] for l in reference], rel=1e-5)
    _assert_same_weights(tmp_path, reference_dir)
