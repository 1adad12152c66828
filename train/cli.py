"""`mohge-train [--config-name PRESET] [--dry-run] [hydra overrides]`: parse, then call train()."""

from __future__ import annotations

import argparse
import sys

from mohge.model.config import ConfigError

EPILOG = """\
overrides are Hydra-style key=value pairs, e.g.
  out_dir=runs/x train.steps=100 train.seed=1 parallel.ep=2 model.moe.allocation=group_coupled
presets: demo, tiny_mohge, tiny_moe, mohge_3b, moe_3b (configs/*.yaml)
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="mohge-train",
        description="Pretrain a MoHGE language model.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config-name", "-cn", default="demo", help="preset in configs/ (default: demo)")
    parser.add_argument("--print-config", action="store_true", help="print the composed config and exit")
    parser.add_argument(
        "--dry-run", action="store_true", help="build the model on the meta device, report its size, exit"
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides key=value")
    return parser.parse_args(argv)


def describe_model(cfg) -> str:
    """Parameter counts from the config and from the model built on meta (they must agree)."""
    from mohge.model.transformer import build_model

    m = cfg.model
    built = build_model(m, "meta").num_params()
    lines = [
        f"total params:           {m.num_params():,} (built model: {built:,})",
        f"routed expert params:   {m.num_routed_expert_params():,}",
        f"active params / token:  {m.active_params_per_token():,.0f} (uniform group routing)",
        f"train FLOPs / token:    {m.flops_per_token(cfg.train.seq_len):,.0f} at seq_len {cfg.train.seq_len}",
    ]
    if m.ffn_type == "mohge":
        groups = ", ".join(f"{g.num_experts}x{g.ffn_hidden_size}" for g in m.moe.groups)
        lines.insert(0, f"MoE layers: {m.num_moe_layers}/{m.n_layers}, groups [{groups}], "
                        f"k_group {m.moe.k_group}, top_k {m.moe.top_k} ({m.moe.topk_mode})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from mohge.train.hydra_config import compose_config, to_yaml

    try:
        cfg = compose_config(args.config_name, args.overrides)
    except ConfigError as err:
        print(f"mohge-train: config error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(to_yaml(cfg))
        return 0
    if args.dry_run:
        print(describe_model(cfg))
        return 0
    from mohge.data.errors import DataError
    from mohge.train.checkpoint import CheckpointError
    from mohge.train.numerics import DivergenceError
    from mohge.train.trainer import train

    try:
        train(cfg)
    except ConfigError as err:
        print(f"mohge-train: config error: {err}", file=sys.stderr)
        return 2
    except CheckpointError as err:
        print(f"mohge-train: checkpoint error: {err}", file=sys.stderr)
        return 2
    except (DataError, DivergenceError) as err:  # one line, no traceback (issue 16)
        print(f"mohge-train: {err}", file=sys.stderr)
        return 2 if isinstance(err, DataError) else 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
