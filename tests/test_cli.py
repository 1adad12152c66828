"""mohge-train's command line: inferred degrees and the resolved layout in --print-config."""

from __future__ import annotations

import pytest

from mohge.model.config import ConfigError
from mohge.parallel.config import ParallelConfig
from mohge.parallel.dims import ParallelDims
from mohge.train.cli import main
from mohge.train.hydra_config import compose_config


def test_dp_shard_is_inferred_from_the_world_size():
    cfg = compose_config("tiny_mohge", ["parallel.tp=2", "parallel.ep=2", "train.micro_batch_size=1"], world_size=8)
    assert (cfg.parallel.dp_shard, cfg.grad_accum_steps) == (4, 1)
    dims = ParallelDims.from_config(ParallelConfig(dp_replicate=2, pp=2), 16)  # dp_shard -1 by default
    assert (dims.dp_replicate, dims.dp_shard, dims.pp) == (2, 4, 2)


def test_dp_shard_inferred_from_torchrun_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = compose_config("tiny_mohge", ["parallel.ep=2", "train.micro_batch_size=2"])
    assert (cfg.parallel.dp_shard, cfg.grad_accum_steps) == (2, 1)


def test_accumulation_error_only_when_it_cannot_divide():
    assert compose_config("tiny_mohge", ["train.micro_batch_size=1"], world_size=2).grad_accum_steps == 2
    with pytest.raises(ConfigError, match=r"train.global_batch_size: 4 must be a multiple of .* \(4\) x "
                                          r"data-parallel degree \(2\); e.g. train.micro_batch_size=2"):
        compose_config("tiny_mohge", [], world_size=2)
    with pytest.raises(ConfigError, match=r"parallel.dp_shard=-1: the world size 6 is not divisible by .* = 4"):
        compose_config("tiny_mohge", ["parallel.tp=4"], world_size=6)
    with pytest.raises(ConfigError, match=r"parallel.dp_shard: must be >= 1, or -1"):
        compose_config("tiny_mohge", ["parallel.dp_shard=0"])


def test_print_config_shows_the_resolved_layout(capsys):
    assert main(["--config-name", "tiny_mohge", "--print-config", "--world-size", "8", "parallel.tp=2",
                 "parallel.ep=2", "train.global_batch_size=16", "train.micro_batch_size=2"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == ("# layout: world 8 = dp_replicate 1 x dp_shard 4 x tp 2 x pp 1; ep 2; "
                                   "global batch 16 = micro 2 x dp 4 x accumulation 2")
    assert "  dp_shard: 4\n" in out


def test_layout_and_pipeline_micro_batches_count_cp_ranks_as_one_reader(capsys):
    """The cp ranks of a group read the same sequences: the layout line's arithmetic divides by cp,
    and pp's micro-batch count (checked at start-up, not by torch's pipelining) uses dp / cp."""
    assert main(["--config-name", "tiny_mohge", "--print-config", "--world-size", "4", "parallel.cp=2",
                 "train.global_batch_size=8", "train.micro_batch_size=2"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == (
        "# layout: world 4 = dp_replicate 1 x dp_shard 4 x tp 1 x pp 1; ep 1; "
        "global batch 8 = micro 2 x dp 4 / cp 2 x accumulation 2")
    with pytest.raises(ConfigError, match=r"train.global_batch_size: 1 micro-batches per step is fewer than the 2"):
        compose_config("tiny_mohge", ["parallel.pp=2", "parallel.cp=2"], world_size=4)

def test_router_flat_reports_every_conflicting_field_in_one_line(capsys):
    bad = {"k_group": "2", "topk_mode": "per_group", "combine": "authors", "group_aux_coeff": "0.01",
           "group_bias_update_rate": "0.001", "router_entropy_coeff": "0.1"}
    overrides = ["model.moe.router=flat", *(f"model.moe.{k}={v}" for k, v in bad.items())]
    with pytest.raises(ConfigError) as err:
        compose_config("tiny_mohge", overrides)
    line = str(err.value)
    assert "\n" not in line and line.startswith(f"model.moe.router=flat conflicts with {len(bad)} fields: "), line
    for field in bad:
        assert f"model.moe.{field}: " in line, (field, line)
    assert main(["--config-name", "tiny_mohge", "--dry-run", *overrides]) == 2
    assert capsys.readouterr().err.strip() == f"mohge-train: config error: {line}"
    # Fixing every named field is enough: the config then composes.
    compose_config("tiny_mohge", ["model.moe.router=flat", "model.moe.k_group=1", "model.moe.group_aux_coeff=0"])


def test_plan_output_piped_into_head_is_not_a_traceback():
    import subprocess
    import sys

    # The reader is gone before the first write (as `| head` after its lines): every write fails with EPIPE.
    proc = subprocess.Popen([sys.executable, "-m", "mohge.parallel.plan_cli", "--config-name", "mohge_3b",
                             "--ep", "8"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 0 and err == "", err


def test_overrides_may_come_before_and_after_flags(capsys):
    """`mohge-train ... parallel.cp=2 --world-size 4 train.global_batch_size=8` (and mohge-plan
    alike) was argparse's 'unrecognized arguments' for the overrides after the flag."""
    from mohge.parallel.plan_cli import parse_args as plan_args

    assert main(["--config-name", "tiny_mohge", "parallel.cp=2", "--print-config", "--world-size", "4",
                 "train.global_batch_size=8"]) == 0
    assert "global batch 8 = micro 4 x dp 4 / cp 2 x accumulation 1" in capsys.readouterr().out
    args = plan_args(["parallel.dp_shard=64", "--memory", "parallel.ep=8"])
    assert args.memory and args.overrides == ["parallel.dp_shard=64", "parallel.ep=8"]
