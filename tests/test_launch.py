"""torchrun script and SLURM template: rendered commands, and the requeue path on a local run."""

from __future__ import annotations

import os
import shlex
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
    assert '--nnodes=4 --nproc-per-node="$GPUS"' in script
    assert "PET_NODE_RANK=$SLURM_NODEID" in script and "srun --label" in script
    assert '--master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT"' in script
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
    _stub(bin_dir, "scancel", f'echo "scancel $*" >> {calls}; pkill -USR1 -f "mohge.train.cli .*out_dir={out}( |$)"')  # this test's trainers only
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
    assert "ChildFailedError" not in output and "Traceback" not in output, output[-3000:]
    assert "mohge-train: stopped for preemption after saving a checkpoint" in output  # one line, not a block
    assert "scancel --signal=USR1 4242" in calls.read_text()
    assert "scontrol requeue 4242" in calls.read_text()
    from mohge.train.checkpoint import find_latest

    latest = find_latest(str(out))
    assert latest is not None and not (out / "REQUEUE").exists()


def _failing_dry_run(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "launch" / "torchrun.sh"), "--config-name", "tiny_mohge"],
                          capture_output=True, text=True, env={**os.environ, "DRY_RUN": "1", **env}, timeout=30)


def test_torchrun_script_counts_gpus_like_the_tools_users_know(tmp_path):
    """GPUS_PER_NODE (Megatron's name) and CUDA_VISIBLE_DEVICES decide the process count; a GPU
    run gets the NCCL environment of launch/env.sh (the one the SLURM script inlines)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NCCL_", "TORCH_NCCL", "CUDA_DEVICE"))}
    env.pop("MOHGE_CPU", None)
    probe = tmp_path / "python"  # stands in for the interpreter: prints what it was given
    probe.write_text("#!/usr/bin/env bash\necho \"args: $*\"; env | grep -E '^(NCCL_IB_TIMEOUT|"
                     "TORCH_NCCL_ASYNC_ERROR_HANDLING|CUDA_DEVICE_MAX_CONNECTIONS)=' | sort\n")
    probe.chmod(0o755)

    def launch(**extra):
        proc = subprocess.run(["bash", str(ROOT / "launch" / "torchrun.sh"), "x=1"], capture_output=True, text=True,
                              env={**env, "PYTHON": str(probe), **extra}, timeout=30)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    out = launch(CUDA_VISIBLE_DEVICES="2,3,5")
    assert "--nproc-per-node=3 " in out and "parallel.backend=gloo" not in out
    assert "CUDA_DEVICE_MAX_CONNECTIONS=1\nNCCL_IB_TIMEOUT=22\nTORCH_NCCL_ASYNC_ERROR_HANDLING=3" in out
    assert "--nproc-per-node=2 " in launch(CUDA_VISIBLE_DEVICES="2,3,5", GPUS_PER_NODE="2")
    cpu = launch(CUDA_VISIBLE_DEVICES="")  # CUDA hides every GPU: CPU mode
    assert "parallel.backend=gloo train.device=cpu" in cpu and "NCCL_IB_TIMEOUT" not in cpu
    assert "--nproc-per-node=4 " in launch(CUDA_VISIBLE_DEVICES="", GPUS_PER_NODE="4")
    proc = _failing_dry_run({"CUDA_VISIBLE_DEVICES": "0", "NPROC_PER_NODE": "4", "MOHGE_CPU": "0"})
    assert proc.returncode == 2 and "NPROC_PER_NODE=4 but only 1 GPU(s) are visible" in proc.stderr


def test_torchrun_script_multi_node_needs_an_address():
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "RDZV_ENDPOINT")}
    proc = subprocess.run(["bash", str(ROOT / "launch" / "torchrun.sh")], capture_output=True, text=True,
                          env={**env, "DRY_RUN": "1", "MOHGE_CPU": "1", "NNODES": "2"}, timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("launch/torchrun.sh: NNODES=2 needs MASTER_ADDR=<host of NODE_RANK 0> (static "
                                   "rendezvous) or RDZV_ENDPOINT=<host:port> (c10d)")
    cmd = _dry_run({"MOHGE_CPU": "1", "NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "node0"})
    assert "--nnodes=2 --node-rank=1 --nproc-per-node=2 --master-addr=node0 --master-port=29500" in cmd


def test_render_validates_quotes_and_takes_options(tmp_path, capsys):
    from mohge.launch.render import main as render_main

    data = ["data=megatron", "data.tokenizer=/data/tok", "data.prefixes=[/data/web]"]
    base = ["--nodes", "4", "--gpus-per-node", "8", "--out-dir", str(tmp_path / "my run")]
    # A layout that cannot fill 4 x 8 GPUs, a misspelled preset, the embedded corpus by default: nothing written.
    for extra, expected in ((["parallel.tp=3", *data], "parallel.dp_shard=-1: the world size 32 is not divisible"),
                            (["--config-name", "mohge3b", *data], "--config-name mohge3b: no such preset"),
                            (["parallel.ep=8"], "data: preset mohge_3b trains on the embedded demo corpus")):
        assert render_main([*base, "-o", str(tmp_path / "job.sbatch"), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("mohge-render: config error: ") and expected in err, err
        assert not (tmp_path / "job.sbatch").exists()
    assert render_main([*base, "--log-dir", str(tmp_path / "my run"), *data]) == 2  # #SBATCH lines cannot quote
    assert "--log-dir (default: --out-dir)" in capsys.readouterr().err
    assert render_main([*base, "--log-dir", str(tmp_path / "logs"), "--port", "31000", "--python", "/opt/py 3/python",
                        "--setup", "module load cuda", "--exclusive", "--mem", "0", "-o", str(tmp_path / "job.sbatch"),
                        "parallel.ep=8", *data, "train.lr=1e-4", "logging.wandb_project=\"it's a run\""]) == 0
    script = (tmp_path / "job.sbatch").read_text()
    assert (tmp_path / "logs").is_dir()  # SLURM opens --output before the job starts
    assert subprocess.run(["bash", "-n", str(tmp_path / "job.sbatch")]).returncode == 0
    words = shlex.split(script.split("-m mohge.train.cli ")[1].split(" &")[0])  # as the job's shell reads them
    assert words[-3:] == ["logging.wandb_project=\"it's a run\"", f"out_dir={tmp_path}/my run", "checkpoint.resume=auto"]
    for line in ("#SBATCH --exclusive", "#SBATCH --mem=0", f"#SBATCH --output={tmp_path}/logs/slurm-%j.out",
                 "MASTER_PORT=31000", "module load cuda", "'/opt/py 3/python' -m mohge.launch.run",
                 f"'out_dir={tmp_path}/my run'", "'logging.wandb_project=\"it'\"'\"'s a run\"'", "NCCL_IB_TIMEOUT"):
        assert line in script, line
