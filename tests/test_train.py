"""The training loop end to end on one process (synthetic data: no files needed)."""

from __future__ import annotations

import json

import pytest

from mohge.train.hydra_config import compose_config
from mohge.train.trainer import train

REQUIRED = {"step", "loss", "lm_loss", "group_aux_loss", "intra_group_aux_loss", "z_loss", "lr", "grad_norm",
            "tokens_per_s", "moe"}


def _cfg(tmp_path, *overrides):
    return compose_config(
        "tiny_mohge", ["data=synthetic", f"out_dir={tmp_path}", "logging.progress=false", *overrides]
    )


def test_loss_falls_and_metrics_are_written(tmp_path):
    result = train(_cfg(tmp_path, "train.steps=40", "train.eval_every=20"))
    assert sum(result.losses[-5:]) / 5 < sum(result.losses[:5]) / 5 - 0.3
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 40 and REQUIRED <= set(lines[0])
    layer = lines[-1]["moe"]["layers.0.ffn"]
    assert sum(layer["group_fraction"]) == pytest.approx(1.0)
    assert len(layer["expert_load"]) == 12
    assert [step for step, _ in result.val_losses] == [20, 40]
    assert "val_loss" in lines[19] and "val_loss" not in lines[18]


def test_same_seed_same_losses_and_grad_accumulation_equivalence(tmp_path):
    a = train(_cfg(tmp_path / "a", "train.steps=3"))
    b = train(_cfg(tmp_path / "b", "train.steps=3"))
    assert a.losses == b.losses
    # 4 sequences as one micro-batch == 2 micro-batches of 2: the same gradient, the same losses.
    c = train(_cfg(tmp_path / "c", "train.steps=3", "train.micro_batch_size=2"))
    assert c.losses == pytest.approx(a.losses, rel=1e-5)


def test_group_aux_switches_on_at_configured_fraction(tmp_path):
    train(_cfg(tmp_path, "train.steps=4", "model.moe.group_aux_start_fraction=0.5"))
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["group_aux_active"] for line in lines] == [False, False, True, True]


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_changes_nothing_but_memory(tmp_path, mode):
    """Same losses and grad norms; routing stats and aux losses are not counted twice."""
    base = train(_cfg(tmp_path / "none", "train.steps=3"))
    ac = train(_cfg(tmp_path / mode, "train.steps=3", f"parallel.activation_checkpoint={mode}"))
    assert ac.losses == pytest.approx(base.losses, rel=1e-6)
    a = [json.loads(l) for l in (tmp_path / "none" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(l) for l in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()]
    for x, y in zip(a, b):
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-5)
        assert y["moe"]["layers.0.ffn"]["expert_load"] == x["moe"]["layers.0.ffn"]["expert_load"]
        assert y["intra_group_aux_loss"] == pytest.approx(x["intra_group_aux_loss"], rel=1e-6)
