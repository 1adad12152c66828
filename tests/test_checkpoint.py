"""Checkpoints: exact resume, atomic saves, mismatches, preemption and bad steps."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from mohge.train.checkpoint import CheckpointError, find_latest, resolve_resume
from mohge.train.hydra_config import compose_config
from mohge.train.preemption import REQUEUE_EXIT_CODE
from mohge.train.trainer import Trainer, train
from nan_trainer import NanAt

COMMON = ["data=synthetic", "logging.progress=false", "train.eval_every=0", "train.log_every=1"]


def _cfg(out_dir, *overrides):
    return compose_config("tiny_mohge", [*COMMON, f"out_dir={out_dir}", *overrides])


def test_exact_resume_is_bitwise(tmp_path):
    """3 steps + save + resume + 3 steps == 6 uninterrupted steps, bit for bit on CPU."""
    full = Trainer(_cfg(tmp_path / "full", "train.steps=6"))
    full_losses = [full.train_step()[0] for _ in range(6)]

    first = Trainer(_cfg(tmp_path / "split", "train.steps=6"))
    losses = [first.train_step()[0] for _ in range(3)]
    first.save()
    resumed = Trainer(_cfg(tmp_path / "split", "train.steps=6", "checkpoint.resume=auto"))
    assert resumed.step == 3 and resumed.data.consumed_samples == 3 * 4
    losses += [resumed.train_step()[0] for _ in range(3)]
    assert losses == full_losses
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(full.optimizer.state.values(), resumed.optimizer.state.values()):
        assert torch.equal(a["exp_avg_sq"], b["exp_avg_sq"]) and float(a["step"]) == float(b["step"])


def test_auto_resume_without_checkpoint_starts_fresh(tmp_path):
    assert resolve_resume("auto", str(tmp_path)) is None
    trainer = Trainer(_cfg(tmp_path, "train.steps=2", "checkpoint.resume=auto"))
    assert trainer.step == 0


def test_keep_last_k_and_latest_pointer(tmp_path):
    train(_cfg(tmp_path, "train.steps=5", "checkpoint.every=1", "checkpoint.keep=2"))
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000004", "step_00000005"]
    assert (root / "latest").read_text() == "step_00000005"
    meta = json.loads((root / "step_00000005" / "meta.json").read_text())
    assert meta["step"] == 5 and meta["data"]["consumed_samples"] == 20


def test_partial_checkpoint_is_ignored_and_refused(tmp_path):
    train(_cfg(tmp_path, "train.steps=2", "checkpoint.every=1"))
    root = tmp_path / "checkpoints"
    partial = root / "step_00000003.partial"
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"half written")
    assert find_latest(str(tmp_path)).name == "step_00000002"
    with pytest.raises(CheckpointError, match="incomplete"):
        resolve_resume(str(partial), str(tmp_path))
    # A complete-looking dir without meta.json (crash before the rename) is refused too.
    broken = root / "step_00000009"
    broken.mkdir()
    (broken / ".metadata").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="incomplete"):
        resolve_resume(str(broken), str(tmp_path))


def test_mismatched_architecture_names_the_field(tmp_path):
    train(_cfg(tmp_path, "train.steps=1"))
    with pytest.raises(CheckpointError, match=r"model.vocab_size: checkpoint 256 vs config 512"):
        Trainer(_cfg(tmp_path, "train.steps=2", "checkpoint.resume=auto", "model.vocab_size=512"))
    with pytest.raises(CheckpointError, match=r"model.moe.groups"):
        Trainer(_cfg(tmp_path, "train.steps=2", "checkpoint.resume=auto", "model.moe.groups.0.ffn_hidden_size=24"))


def test_checkpoint_from_before_new_model_fields_resumes(tmp_path):
    """A checkpoint whose saved config predates a model field (MLA, RoPE scaling, balance scope,
    router) had that field's default: it resumes at the default and is refused naming the field
    when the config now sets it otherwise."""
    train(_cfg(tmp_path, "train.steps=1"))
    meta_path = tmp_path / "checkpoints" / "step_00000001" / "meta.json"
    meta = json.loads(meta_path.read_text())
    for key in ("attention", "mla", "rope_scaling"):
        del meta["model"][key]
    for key in ("balance_scope", "router", "bias_update_rate"):
        del meta["model"]["moe"][key]
    meta_path.write_text(json.dumps(meta))
    assert Trainer(_cfg(tmp_path, "train.steps=2", "checkpoint.resume=auto")).step == 1
    with pytest.raises(CheckpointError, match=r"model.moe.balance_scope: checkpoint micro_batch vs config sequence"):
        Trainer(_cfg(tmp_path, "train.steps=2", "checkpoint.resume=auto", "model.moe.balance_scope=sequence"))


def test_nan_step_is_skipped_and_too_many_stop_the_run(tmp_path):
    NanAt.bad_steps = {1}
    trainer = NanAt(_cfg(tmp_path / "a", "train.steps=4"))
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train_step()
    trainer.train_step()  # step index 1: NaN gradient -> skipped, weights unchanged by it
    assert trainer.result.skipped_steps == 1
    result = trainer.run()
    assert result.skipped_steps == 1 and all(math.isfinite(x) for x in result.losses)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))

    NanAt.bad_steps = {2, 3, 4}
    failing = NanAt(_cfg(tmp_path / "b", "train.steps=6", "checkpoint.every=1", "train.max_bad_steps=3"))
    with pytest.raises(RuntimeError, match="3 consecutive steps"):
        failing.run()
    assert find_latest(str(tmp_path / "b")).name == "step_00000004"  # last checkpoint intact and loadable
    Trainer(_cfg(tmp_path / "b", "train.steps=6", "checkpoint.resume=auto"))


def _spawn(out_dir, *overrides):
    cmd = [sys.executable, "-m", "mohge.train.cli", "--config-name", "tiny_mohge", *COMMON, f"out_dir={out_dir}",
           "train.steps=100000", "train.warmup_steps=0", *overrides]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _wait_for(predicate, timeout=60.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return False


def test_kill_during_save_leaves_previous_checkpoint(tmp_path):
    proc = _spawn(tmp_path, "checkpoint.every=1", "checkpoint.keep=3")
    root = tmp_path / "checkpoints"
    try:
        assert _wait_for(lambda: (root / "latest").exists())
        assert _wait_for(lambda: any(root.glob("*.partial")))  # a save is under way...
        proc.send_signal(signal.SIGKILL)  # ...kill -9 it
        proc.wait(timeout=30)
    finally:
        proc.kill()
    latest = find_latest(str(tmp_path))
    assert latest is not None
    trainer = Trainer(_cfg(tmp_path, "train.steps=100000", "checkpoint.resume=auto"))
    assert trainer.step == int(latest.name.split("_")[1])


def test_sigterm_saves_and_exits_with_requeue_code(tmp_path):
    proc = _spawn(tmp_path, "checkpoint.every=0")
    try:
        assert _wait_for(lambda: (tmp_path / "metrics.jsonl").exists() and
                         len((tmp_path / "metrics.jsonl").read_text().splitlines()) >= 2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == REQUEUE_EXIT_CODE, err[-2000:]
    latest = find_latest(str(tmp_path))
    assert latest is not None
    steps_logged = len((tmp_path / "metrics.jsonl").read_text().splitlines())
    assert int(latest.name.split("_")[1]) == steps_logged


def test_async_save_is_visible_only_when_complete_and_resumes_exactly(tmp_path):
    full = Trainer(_cfg(tmp_path / "full", "train.steps=4"))
    full_losses = [full.train_step()[0] for _ in range(4)]
    first = Trainer(_cfg(tmp_path / "a", "train.steps=4", "checkpoint.async_save=true"))
    losses = [first.train_step()[0] for _ in range(2)]
    first.save()
    assert first.pending_save is not None and find_latest(str(tmp_path / "a")) is None  # not visible yet
    losses.append(first.train_step()[0])  # training goes on while the shards are written
    first.finish_pending_save()
    assert find_latest(str(tmp_path / "a")).name == "step_00000002"
    resumed = Trainer(_cfg(tmp_path / "a", "train.steps=4", "checkpoint.resume=auto"))
    assert resumed.step == 2
    assert [resumed.train_step()[0] for _ in range(2)] == full_losses[2:]
    assert losses == full_losses[:3]


def test_checkpoint_from_fused_expert_stacks_resumes(tmp_path):
    """Checkpoints from before the unpadded per-group experts keyed the experts' AdamW step by the
    fused stacks (`optim/step/<layer>.experts.w13`, `.w2`), not per group: such a checkpoint (the
    current one rewritten with those keys) resumes, step counts included, to the uninterrupted run."""
    import torch.distributed.checkpoint as dcp

    from mohge.train.checkpoint import model_entries, optimizer_entries, quiet_single_process

    full = Trainer(_cfg(tmp_path / "full", "train.steps=4"))
    full_losses = [full.train_step()[0] for _ in range(4)]
    first = Trainer(_cfg(tmp_path / "split", "train.steps=4"))
    losses = [first.train_step()[0] for _ in range(2)]
    first.save()
    saved = tmp_path / "split" / "checkpoints" / "step_00000002"
    entries = {**model_entries(first.model), **optimizer_entries(first.model, first.optimizer)}
    for key in [k for k in entries if k.startswith("optim/step/") and ".experts.groups." in k]:
        layer = key[:key.index(".experts.groups.")]
        entries[f"{layer}.experts.w2" if key.endswith(".w2") else f"{layer}.experts.w13"] = entries.pop(key)
    old = tmp_path / "old" / "checkpoints" / "step_00000002"
    old.mkdir(parents=True)
    with quiet_single_process():
        dcp.save(entries, checkpoint_id=str(old))
    assert any(k.endswith(".experts.w13") for k in entries)
    meta = json.loads((saved / "meta.json").read_text())
    meta.pop("checksums", None)
    (old / "meta.json").write_text(json.dumps(meta))
    resumed = Trainer(_cfg(tmp_path / "split", "train.steps=4", f"checkpoint.resume={old}"))
    assert resumed.step == 2
    losses += [resumed.train_step()[0] for _ in range(2)]
    assert losses == full_losses
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(full.optimizer.state.values(), resumed.optimizer.state.values()):
        assert float(a["step"]) == float(b["step"])
