"""torchrun script and SLURM template: rendered commands, and the requeue path on a local run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from distributed import free_port

from mohge.launch.render import render

ROOT = Path(__file__).parents[1]


def _dry_run(env: dict, *args: str) -> str:
    proc = subprocess.run(["bash", str(ROOT / "launch" / "torchrun.sh"), *args], capture_output=True, text=True,
                          env={**os.environ, "DRY_RUN": "1", **env}, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


def test_torchrun_script_single_node_cpu():
    cmd = _dry_run({"MOHGE_CPU": "1"}, "--config-name", "tiny_mohge", "parallel.ep=2")
    assert "--nnodes=1 --node-rank=0 --nproc-per-node=2 --master-addr=127.0.0.1 --master-port=29500" in cmd
    assert cmd.rstrip().endswith("-m mohge.train.cli --config-name tiny_mohge parallel.ep=2 "
                                 "parallel.backend=gloo train.device=cpu")


def test_torchrun_script_multi_node_rendezvous():
    cmd = _dry_run({"MOHGE_CPU": "1", "NNODES": "4", "NODE_RANK": "2", "NPROC_PER_NODE": "8",
                    "RDZV_ENDPOINT": "node0:29400"}, "--config-name", "mohge_3b")
    assert "--nnodes=4 --node-rank=2 --nproc-per-node=8 --rdzv-backend=c10d --rdzv-endpoint=node0:29400" in cmd


def test_sbatch_renders_valid_commands(tmp_path):
    script = render(nodes=4, gpus_per_node=8, time="12:00:00", out_dir="/ckpt/run1", config_name="mohge_3b",
                    overrides=["parallel.ep=8", "parallel.dp_shard=32"], partition="gpu", account="proj")
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --signal=B:USR1@300", "#SBATCH --requeue", "#SBATCH --partition=gpu",
                 "#SBATCH --account=proj"):
        assert line in script
    assert "--nnodes=4 --nproc-per-node=$GPUS" in script
    assert "--node-rank=\\$SLURM_NODEID --rdzv-backend=c10d --rdzv-endpoint=$MASTER_ADDR:$MASTER_PORT" in script
    assert ("-m mohge.train.cli --config-name mohge_3b parallel.ep=8 parallel.dp_shard=32 out_dir=/ckpt/run1 "
            "checkpoint.resume=auto") in script


def _stub(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/usr/bin/env bash\n" + body + "\n")
    path.chmod(0o755)


@pytest.mark.multirank
def test_usr1_before_time_limit_saves_and_requeues(tmp_path):
    """The rendered batch script on this machine with srun/scontrol/scancel stubbed: USR1 to the
    batch shell -> the trainer saves a checkpoint -> the script calls `scontrol requeue`."""
    bin_dir, out = tmp_path / "bin", tmp_path / "run"
    bin_dir.mkdir()
    out.mkdir()
    calls = tmp_path / "calls.log"
    _stub(bin_dir, "scontrol", f'if [[ "$1" == show ]]; then echo localhost; else echo "scontrol $*" >> {calls}; fi')
    _stub(bin_dir, "srun", 'while [[ "$1" == --* ]]; do shift; done; SLURM_NODEID=0 exec "$@"')
    _stub(bin_dir, "scancel", f'echo "scancel $*" >> {calls}; pkill -USR1 -f "mohge.train.cli --config-name tiny_mohge"')
    script = render(nodes=1, gpus_per_node=1, time="0:10:00", out_dir=str(out), config_name="tiny_mohge",
                    overrides=["data=synthetic", "train.steps=100000", "train.device=cpu", "parallel.backend=gloo",
                               "logging.progress=false", "train.eval_every=0"],
                    port=free_port(), python=sys.executable)
    (tmp_path / "job.sbatch").write_text(script)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "localhost", "SLURM_GPUS_ON_NODE": "1", "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen(["bash", str(tmp_path / "job.sbatch")], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 90
        metrics = out / "metrics.jsonl"
        while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
            time.sleep(0.1)
        job.send_signal(signal.SIGUSR1)  # what SLURM sends --signal seconds before the limit
        output, _ = job.communicate(timeout=120)
    finally:
        job.kill()
    assert job.returncode == 0, output[-3000:]
    assert "scancel --signal=USR1 4242" in calls.read_text()
    assert "scontrol requeue 4242" in calls.read_text()
    from mohge.train.checkpoint import find_latest

    latest = find_latest(str(out))
    assert latest is not None and not (out / "REQUEUE").exists()
