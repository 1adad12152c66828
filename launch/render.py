"""Renders launch/slurm.sbatch for an allocation: `python -m mohge.launch.render --nodes 4 ...`.

The config and the layout are validated for nodes x GPUs before anything is written; paths and
overrides are shell-quoted; the log directory is created (SLURM opens --output before the job runs).
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path
from typing import Optional

from mohge.train.errors import ConfigError, UsageError, run_tool

TEMPLATE = Path(__file__).with_name("slurm.sbatch")
ENV_SH = Path(__file__).with_name("env.sh")
SBATCH_UNSAFE = re.compile(r"[\s'\"\\$`]")  # #SBATCH lines are not shell: no quoting there


def render(nodes: int, gpus_per_node: int, time: str, out_dir: str, config_name: str,
           overrides: list[str], partition: Optional[str] = None, account: Optional[str] = None,
           job_name: str = "mohge", port: int = 29500, signal_seconds: int = 300,
           cpus_per_task: int = 16, python: str = "python3", setup: Optional[str] = None,
           exclusive: bool = False, mem: Optional[str] = None, log_dir: Optional[str] = None) -> str:
    """The sbatch script text; every path and train argument is shell-quoted."""
    log_dir = log_dir or out_dir
    for flag, value in (("--log-dir (default: --out-dir)", log_dir), ("--job-name", job_name),
                        ("--partition", partition or ""), ("--account", account or ""), ("--mem", mem or ""),
                        ("--time", time)):
        if SBATCH_UNSAFE.search(value):
            raise UsageError(f"{flag}: {value!r} goes on an #SBATCH line, which cannot quote spaces or quotes; "
                             "choose a value without them")
    train_args = " ".join(shlex.quote(a) for a in ["--config-name", config_name, *overrides,
                                                   f"out_dir={out_dir}", "checkpoint.resume=auto"])
    extra = [f"#SBATCH --partition={partition}" if partition else "",
             f"#SBATCH --account={account}" if account else "",
             "#SBATCH --exclusive" if exclusive else "",
             f"#SBATCH --mem={mem}" if mem else ""]
    return TEMPLATE.read_text().format(
        job_name=job_name, nodes=nodes, gpus_per_node=gpus_per_node, cpus_per_task=cpus_per_task, time=time,
        signal_seconds=signal_seconds, log_dir=log_dir, out_dir_q=shlex.quote(out_dir), port=port,
        python=shlex.quote(python), train_args=train_args, extra_sbatch="\n".join(e for e in extra if e),
        env_sh=ENV_SH.read_text().strip(), setup=setup or "# (none)",
    )


def check(nodes: int, gpus_per_node: int, config_name: str, overrides: list[str]) -> str:
    """Validates the run config for nodes x gpus_per_node processes; returns its layout line."""
    from mohge.train.hydra_config import compose_config

    if nodes < 1 or gpus_per_node < 1:
        raise UsageError(f"--nodes/--gpus-per-node: must be >= 1 (got {nodes}, {gpus_per_node})")
    cfg = compose_config(config_name, overrides, world_size=nodes * gpus_per_node)
    if cfg.data.source == "embedded" and not any(o.startswith("data=") for o in overrides):
        raise ConfigError(f"data: preset {config_name} trains on the embedded demo corpus (1M tokens); give "
                          "data=megatron data.tokenizer=PATH data.prefixes=[...] for a cluster run, or data=embedded "
                          "to mean it")
    from mohge.parallel.dims import ParallelDims

    ParallelDims.from_config(cfg.parallel, nodes * gpus_per_node)  # the degrees multiply to the world size
    return cfg.layout_line()


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mohge.launch.render", description=__doc__.split(":")[0])
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--time", default="24:00:00")
    parser.add_argument("--partition")
    parser.add_argument("--account")
    parser.add_argument("--job-name", default="mohge")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--log-dir", help="where slurm-<jobid>.out goes (default: --out-dir); created now")
    parser.add_argument("--config-name", default="mohge_3b")
    parser.add_argument("--signal-seconds", type=int, default=300, help="USR1 this long before the time limit")
    parser.add_argument("--port", type=int, default=29500, help="rendezvous port on the first node")
    parser.add_argument("--python", default="python3", help="interpreter on the compute nodes")
    parser.add_argument("--setup", help="shell line run before the job step, e.g. 'source /env/bin/activate'")
    parser.add_argument("--exclusive", action="store_true", help="#SBATCH --exclusive")
    parser.add_argument("--mem", help="#SBATCH --mem, e.g. 0 (all of each node) or 500G")
    parser.add_argument("--output", "-o", help="write the script here (default: stdout)")
    parser.add_argument("overrides", nargs="*", help="mohge-train overrides")
    args = parser.parse_intermixed_args(argv)  # overrides may come before and after flags

    def body() -> int:
        layout = check(args.nodes, args.gpus_per_node, args.config_name, args.overrides)
        text = render(args.nodes, args.gpus_per_node, args.time, args.out_dir, args.config_name, args.overrides,
                      args.partition, args.account, args.job_name, port=args.port, signal_seconds=args.signal_seconds,
                      python=args.python, setup=args.setup, exclusive=args.exclusive, mem=args.mem,
                      log_dir=args.log_dir)
        Path(args.log_dir or args.out_dir).mkdir(parents=True, exist_ok=True)
        if args.output:
            Path(args.output).write_text(text)
            print(f"wrote {args.output}: {layout}", file=sys.stderr)
        else:
            sys.stdout.write(text)
        return 0

    return run_tool("render", body)


if __name__ == "__main__":
    sys.exit(main())
