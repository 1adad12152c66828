"""Routed experts sharded over their expert-data-parallel ranks (FSDP2 on the expert mesh):
every layout gives the single-process losses, gradient norms and parameters, and checkpoints
stay layout-independent. mohge-train under torchrun on CPU (gloo)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from distributed import layout_nproc, run_train

ROOT = Path(__file__).parents[1]
# 4 layers (pipeline stages need 2 each), one sequence per micro-batch: 8 sequences a step are
# 2 micro-batches on 4 data-parallel ranks, 1 on 8.
BASE = ["--config-name", "tiny_mohge", "data=synthetic", "train.steps=4", "train.micro_batch_size=1",
        "train.global_batch_size=8", "train.eval_every=2", "logging.progress=false", "train.log_every=1",
        "model.n_layers=4", "train.lr_decay_steps=4"]


def _run(out_dir, nproc: int, *overrides) -> list[dict]:
    return run_train(out_dir, nproc, BASE, *overrides, timeout=600)


_nproc = layout_nproc


def _assert_same_weights(out_dir, reference_dir, step: int = 4) -> None:
    from mohge.launch.convert import load_consolidated
    from mohge.train.checkpoint import step_dir

    got, want = load_consolidated(step_dir(str(out_dir), step)), load_consolidated(step_dir(str(reference_dir), step))
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def _assert_matches(lines: list[dict], reference: list[dict]) -> None:
    assert [l["lm_loss"] for l in lines] == pytest.approx([l["lm_loss"] for l in reference], rel=1e-5)
    assert [l["grad_norm"] for l in lines] == pytest.approx([l["grad_norm"] for l in reference], rel=1e-4)
    val = [l["val_loss"] for l in lines if "val_loss" in l]
    assert val == pytest.approx([l["val_loss"] for l in reference if "val_loss" in l], rel=1e-5) and len(val) == 2


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ref")


@pytest.fixture(scope="module")
def reference(reference_dir):
    return _run(reference_dir, 1)


FSDP4_EP2 = ["parallel.dp_shard=4", "parallel.ep=2"]


@pytest.mark.multirank
def test_fsdp4_ep2_matches_single_process(tmp_path, reference, reference_dir):
    """dp_shard=4 x ep=2: each expert sharded over its 2 edp ranks."""
    _assert_matches(_run(tmp_path, 4, *FSDP4_EP2), reference)
    _assert_same_weights(tmp_path, reference_dir)


@pytest.mark.slow
@pytest.mark.multirank
@pytest.mark.parametrize(
    "layout",
    [
        [*FSDP4_EP2, "parallel.activation_checkpoint=full"],
        ["parallel.dp_replicate=2", "parallel.dp_shard=4", "parallel.ep=2"],
        ["parallel.dp_replicate=4", "parallel.dp_shard=2", "parallel.ep=4"],
        [*FSDP4_EP2, "parallel.tp=2"],
        [*FSDP4_EP2, "parallel.pp=2"],
    ],
    ids=["fsdp4-ep2-ac", "hsdp2x4-ep2", "dp4x2-ep4", "fsdp4-ep2-tp2", "fsdp4-ep2-pp2"],
)
def test_sharded_expert_layouts_match_single_process(tmp_path, reference, reference_dir, layout):
    """Experts HSDP (edp_replicate 2 x edp_shard 2), FSDP over replicas when ep spans dp_replicate
    (dp4x2-ep4: edp_shard = edp = 2), and composed with activation checkpointing, TP and PP."""
    _assert_matches(_run(tmp_path, _nproc(layout), *layout), reference)
    _assert_same_weights(tmp_path, reference_dir)


@pytest.mark.slow
@pytest.mark.multirank
def test_resume_fsdp4_ep2_to_ep1_to_fsdp4_ep2(tmp_path, reference, reference_dir):
    """Steps 1-2 under dp_shard=4 x ep=2, step 3 on one process, step 4 under dp_shard=4 x ep=2
    again: the losses and final parameters of the uninterrupted single-process run."""
    _run(tmp_path, 4, *FSDP4_EP2, "train.steps=2", "checkpoint.every=1")
    _run(tmp_path, 1, "train.steps=3", "checkpoint.every=1", "checkpoint.resume=auto")
    lines = _run(tmp_path, 4, *FSDP4_EP2, "checkpoint.every=1", "checkpoint.resume=auto")
    assert [l["lm_loss"] for l in lines] == pytest.approx([l["lm_loss"] for l in reference], rel=1e-5)
    _assert_same_weights(tmp_path, reference_dir)
