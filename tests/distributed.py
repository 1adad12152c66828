"""Test-side name for the local multi-process runner."""

from mohge.launch.local import free_port, run_ranks  # noqa: F401


def run_train(out_dir, nproc: int, base: list[str], *overrides, timeout: int = 240) -> list[dict]:
    """mohge-train with `base` + `overrides` on `nproc` processes through launch/torchrun.sh (CPU/gloo
    mode); one process runs the entry point directly. Returns the run's metrics.jsonl lines."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MOHGE_CPU": "1", "NPROC_PER_NODE": str(nproc),
           "MASTER_PORT": str(free_port()), "PYTHON": sys.executable}
    cmd = ["bash", str(root / "launch" / "torchrun.sh"), *base, f"out_dir={out_dir}", *overrides]
    if nproc == 1:
        cmd = [sys.executable, "-m", "mohge.train.cli", *base, f"out_dir={out_dir}", *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def layout_nproc(layout: list[str]) -> int:
    """Processes a layout needs: the product of its dp_replicate, dp_shard, tp and pp degrees."""
    n = 1
    for override in layout:
        key, _, value = override.partition("=")
        if key in ("parallel.dp_replicate", "parallel.dp_shard", "parallel.tp", "parallel.pp"):
            n *= int(value)
    return n
