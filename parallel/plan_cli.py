"""`mohge-plan`: expert placement, per-rank parameters, expected expert FLOPs and all-to-all bytes;
with --memory, each rank's bytes of parameters, gradients, optimizer states and activations.

    mohge-plan --config-name mohge_3b --ep 8 --ep 16 [--allocation both] [--group-traffic 0.4,...]
               [--json] [hydra overrides...]
    mohge-plan --memory --config-name mohge_3b parallel.dp_shard=64 parallel.ep=8
               [--gpu-mem GiB] [--experts-replicated] [--json] [hydra overrides...]
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

from mohge.model.config import ConfigError
from mohge.parallel.allocation import allocate
from mohge.train.errors import report as report_error


def _traffic(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--group-traffic: {text!r} is not a comma-separated list of numbers")
    if any(v < 0 for v in values) or abs(sum(values) - 1.0) > 0.02:
        raise argparse.ArgumentTypeError(f"--group-traffic: values must be >= 0 and sum to 1 (got {sum(values):.3f})")
    return values


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mohge-plan", description=__doc__.split("\n")[0])
    parser.add_argument("--config-name", "-cn", default="mohge_3b", help="preset in configs/ (default mohge_3b)")
    parser.add_argument("--ep", type=int, action="append", help="EP size (repeatable; placement report)")
    parser.add_argument("--memory", action="store_true",
                        help="per-rank memory of the layout in parallel.* (train.micro_batch_size, train.seq_len)")
    parser.add_argument("--gpu-mem", type=float, default=None, metavar="GiB",
                        help="with --memory: does the layout fit in GiB per GPU; the smallest layouts that do")
    parser.add_argument("--experts-replicated", action="store_true",
                        help="with --memory: count routed experts as whole copies on every edp rank (before sharding)")
    parser.add_argument("--allocation", choices=("all_size", "group_coupled", "both"), default="both")
    parser.add_argument("--group-traffic", type=_traffic, default=None,
                        help="share of routed slots per group, e.g. 0.4,0.3,0.2,0.1 (default: uniform)")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides key=value")
    return parser.parse_intermixed_args(argv)  # overrides may come before and after flags


def tokens_per_rank_step(cfg, ep: int) -> int:
    """Tokens one data-parallel rank processes per step; EP ranks are data-parallel ranks, so the
    data-parallel degree is at least ep."""
    dp = max(cfg.parallel.dp_replicate * cfg.parallel.dp_shard, ep)
    return cfg.train.global_batch_size * cfg.train.seq_len // dp


def plan(cfg, ep: int, strategy: str, traffic: Optional[list[float]]) -> dict:
    """One placement's report: which experts where, and per-rank costs per layer and step."""
    moe, d_model = cfg.model.moe, cfg.model.d_model
    placement = allocate(moe, ep, strategy)
    tokens = tokens_per_rank_step(cfg, ep)
    layers = cfg.model.num_moe_layers
    report = {"ep": ep, "allocation": strategy, "experts_per_rank": placement.num_local(0), "traffic": {}}
    for label, t in (("uniform", None), ("skewed", traffic)):
        if label == "skewed" and t is None:
            continue
        rows = placement.summary(d_model, t, tokens_per_rank=tokens, top_k=moe.top_k)
        report["traffic"][label] = {
            "group_traffic": t,
            "flop_imbalance": placement.imbalance(d_model, t),
            "ranks": [
                {**row.as_dict(), "params": row.params * layers, "a2a_bytes": row.a2a_bytes * layers}
                for row in rows
            ],
        }
    report["placement"] = {r: placement.local_experts(r) for r in range(ep)}
    return report


def _print_table(cfg, report: dict) -> None:
    widths = cfg.model.moe.group_widths
    print(f"\n== EP {report['ep']}, {report['allocation']}: {report['experts_per_rank']} experts per rank "
          f"(per-rank figures summed over {cfg.model.num_moe_layers} MoE layers; a2a per step, bf16)")
    header = "rank  experts per group (" + ",".join(map(str, widths)) + ")"
    for label, block in report["traffic"].items():
        print(f"-- {label} group traffic: expert-FLOP imbalance (max/mean) {block['flop_imbalance']:.3f}")
        print(f"{header:<48} {'params':>14} {'FLOP share':>10} {'a2a GB/step':>12}")
        for row in block["ranks"]:
            counts = " ".join(f"{n}" for n in row["experts_per_group"])
            print(f"{row['rank']:>4}  {counts:<42} {row['params']:>14,} {row['flops_share']:>10.4f} "
                  f"{row['a2a_bytes'] / 1e9:>12.3f}")


def main(argv: Optional[list[str]] = None) -> int:
    from mohge.train.errors import run_tool

    args = parse_args(argv)
    return run_tool("plan", lambda: _main(args))  # `| head`, Ctrl-C and I/O errors: one line, no traceback


def _main(args: argparse.Namespace) -> int:
    from mohge.train.hydra_config import compose_config

    if args.memory:
        from mohge.parallel.memory_cli import memory_main

        return memory_main(args)
    if args.gpu_mem is not None or args.experts_replicated:
        print("mohge-plan: --gpu-mem and --experts-replicated need --memory", file=sys.stderr)
        return 2
    if not args.ep:
        print("mohge-plan: give --ep N (placement report) or --memory (memory report)", file=sys.stderr)
        return 2
    try:
        cfg = compose_config(args.config_name, args.overrides)
        if cfg.model.ffn_type != "mohge":
            raise ConfigError("model.ffn_type: dense models have no experts to place")
        if args.group_traffic is not None and len(args.group_traffic) != cfg.model.moe.num_groups:
            raise ConfigError(
                f"--group-traffic: {len(args.group_traffic)} values for {cfg.model.moe.num_groups} groups"
            )
        strategies = ["all_size", "group_coupled"] if args.allocation == "both" else [args.allocation]
        reports = [plan(cfg, ep, s, args.group_traffic) for ep in args.ep for s in strategies]
    except ConfigError as err:
        return report_error("plan", err)
    if args.json:
        print(json.dumps({"config": args.config_name, "plans": reports}, indent=1))
        return 0
    m = cfg.model
    print(f"{args.config_name}: {m.moe.num_groups} groups x widths {m.moe.group_widths}, "
          f"{m.moe.num_experts} experts, top_k {m.moe.top_k}, d_model {m.d_model}, "
          f"global batch {cfg.train.global_batch_size} x {cfg.train.seq_len} tokens, data-parallel over "
          f"max(dp, ep) ranks")
    for report in reports:
        _print_table(cfg, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
