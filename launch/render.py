"""Renders launch/slurm.sbatch for an allocation: `python -m mohge.launch.render --nodes 4 ...`."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Optional

TEMPLATE = Path(__file__).with_name("slurm.sbatch")


def render(nodes: int, gpus_per_node: int, time: str, out_dir: str, config_name: str,
           overrides: list[str], partition: Optional[str] = None, account: Optional[str] = None,
           job_name: str = "mohge", port: int = 29500, signal_seconds: int = 300,
           cpus_per_task: int = 16, python: str = "python3") -> str:
    """The sbatch script text; train args are shell-quoted into the srun command."""
    train_args = " ".join(shlex.quote(a) for a in ["--config-name", config_name, *overrides])
    return TEMPLATE.read_text().format(
        job_name=job_name, nodes=nodes, gpus_per_node=gpus_per_node, cpus_per_task=cpus_per_task, time=time,
        signal_seconds=signal_seconds, out_dir=out_dir, port=port, python=python, train_args=train_args,
        partition_line=f"#SBATCH --partition={partition}" if partition else "",
        account_line=f"#SBATCH --account={account}" if account else "",
    )


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mohge.launch.render", description=__doc__.split(":")[0])
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--time", default="24:00:00")
    parser.add_argument("--partition")
    parser.add_argument("--account")
    parser.add_argument("--job-name", default="mohge")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--config-name", default="mohge_3b")
    parser.add_argument("--signal-seconds", type=int, default=300, help="USR1 this long before the time limit")
    parser.add_argument("--output", "-o", help="write the script here (default: stdout)")
    parser.add_argument("overrides", nargs="*", help="mohge-train overrides")
    args = parser.parse_args(argv)
    text = render(args.nodes, args.gpus_per_node, args.time, args.out_dir, args.config_name, args.overrides,
                  args.partition, args.account, args.job_name, signal_seconds=args.signal_seconds)
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
