"""Every user mistake ends as one `mohge-<tool>: <kind> error: ...` line with exit code 2."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from distributed import free_port

from mohge.launch.run import summarize
from mohge.train.cli import main
from mohge.train.errors import CheckpointError, ConfigError, DataError, error_line

ROOT = Path(__file__).parents[1]
TINY = ["--config-name", "tiny_mohge", "train.steps=1", "logging.progress=false"]


def _one_line(capsys, argv: list[str]) -> str:
    """Runs mohge-train in this process; asserts exit 2 and exactly one stderr line, returns it."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


@pytest.mark.parametrize("override, expected", [
    ("train.global_batch_size=0", "train.global_batch_size: must be >= 1"),
    ("train.eval_iters=-1", "train.eval_iters: must be >= 1"),
    ("train.lr=-1", "train.lr: must be > 0"),
    ("train.device=tpu", "train.device: unknown device 'tpu'"),
    ("train.bogus=1", "train.bogus: no such field"),
    ("model=nope", "model=nope: no such option"),
    ("data.tokenizer=tok.json", "data.tokenizer: only read with data=megatron"),
    ("data.prefixes=[a]", "data.prefixes: only read with data=megatron"),
    ("data=embedded", "model.vocab_size: 256 is smaller than the embedded corpus"),
    ("+train.extra=1", "+train.extra=1: adds a key the schema does not have"),
])
def test_config_errors_are_one_line(capsys, tmp_path, override, expected):
    line = _one_line(capsys, [*TINY, f"out_dir={tmp_path}", override])
    assert line.startswith("mohge-train: config error: ") and expected in line, line


def test_negative_blend_weight_is_a_config_error(capsys, tmp_path):
    line = _one_line(capsys, [*TINY, f"out_dir={tmp_path}", "data=megatron", "data.tokenizer=bytes",
                              "data.prefixes=[a,b]", "data.weights=[1,-1]"])
    assert line.startswith("mohge-train: config error: data.weights: [1.0, -1.0] must be >= 0"), line


def test_data_split_as_printed_in_docs_parses():
    from mohge.train.hydra_config import compose_config

    assert compose_config("tiny_mohge", ["data.split=969,30,1"]).data.split == "969,30,1"


def test_unwritable_out_dir_is_one_line(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    line = _one_line(capsys, [*TINY, f"out_dir={blocker}/run"])
    assert line.startswith(f"mohge-train: config error: out_dir: {blocker}/run is not writable"), line


def test_data_error_is_one_line(capsys, tmp_path):
    line = _one_line(capsys, [*TINY, f"out_dir={tmp_path}", "data=megatron", "data.tokenizer=bytes",
                              f"data.prefixes=[{tmp_path}/missing]", "model.vocab_size=260"])
    assert line.startswith(f"mohge-train: data error: data.prefixes: {tmp_path}/missing.bin does not exist"), line


def test_checkpoint_error_is_one_line(capsys, tmp_path):
    line = _one_line(capsys, [*TINY, f"out_dir={tmp_path}", f"checkpoint.resume={tmp_path}/nope"])
    assert line.startswith("mohge-train: checkpoint error: checkpoint.resume="), line


def test_error_line_categories():
    assert error_line("convert", CheckpointError("x: bad")) == "mohge-convert: checkpoint error: x: bad"
    assert error_line("preprocess", DataError("f: bad")) == "mohge-preprocess: data error: f: bad"
    assert error_line("plan", ConfigError("k: bad")) == "mohge-plan: config error: k: bad"
    full = OSError(errno.ENOSPC, "No space left on device", "/ckpt/x")
    assert error_line("train", full) == ("mohge-train: I/O error: /ckpt/x: No space left on device; "
                                         "free space or choose another out_dir")


def test_launcher_summary_of_worker_exits():
    def fail(code):
        return SimpleNamespace(exitcode=code, signal_name=lambda: "SIGTERM" if code == -15 else "SIGKILL")

    assert summarize({0: fail(2), 1: fail(-15)}, 0) == (2, [])  # the others were stopped by the agent
    code, lines = summarize({0: fail(75), 1: fail(75)}, 0)
    assert code == 75 and len(lines) == 1 and "preemption" in lines[0]
    code, lines = summarize({0: fail(-15), 1: fail(1)}, 1)
    assert code == 1 and lines == ["mohge-train: rank 1 exited with code 1; its error is printed above"]


@pytest.mark.multirank
def test_user_error_under_torchrun_is_one_line_exit_2(tmp_path):
    """Two processes through launch/torchrun.sh: one line (rank 0's), exit 2, no failure block."""
    env = {**os.environ, "MOHGE_CPU": "1", "NPROC_PER_NODE": "2", "MASTER_PORT": str(free_port()),
           "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    args = [*TINY, f"out_dir={tmp_path}", "train.micro_batch_size=2", "train.lr=-1"]  # dp_shard inferred: 2
    proc = subprocess.run(["bash", str(ROOT / "launch" / "torchrun.sh"), *args],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if not l.startswith("+ ")]  # the script echoes its command
    assert lines == ["mohge-train: config error: train.lr: must be > 0 (got -1.0)"], proc.stderr


@pytest.mark.multirank
def test_user_error_line_survives_a_rank_0_behind_the_others(tmp_path):
    """Under torchrun the agent stops every worker once one exits: rank 1 reaching the same config
    error before rank 0 (a loaded machine) got rank 0 killed before it printed (exit 2, no line)."""
    worker = tmp_path / "worker.py"
    worker.write_text(
        "import os, sys, time\n"
        "from mohge.train.errors import ConfigError, run_tool\n"
        "def body():\n"
        "    if os.environ['RANK'] == '0':\n"
        "        time.sleep(1.5)  # behind the other rank\n"
        "    raise ConfigError('train.lr: must be > 0')\n"
        "sys.exit(run_tool('train', body))\n")
    cmd = [sys.executable, "-m", "mohge.launch.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", str(worker)]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == ["mohge-train: config error: train.lr: must be > 0"], proc.stderr


def test_usage_error_is_one_line(capsys):
    line = _one_line(capsys, [*TINY, "--print-config", "--world-size", "0"])
    assert line == "mohge-train: usage error: --world-size: must be >= 1 (got 0)"
