"""`mohge-train [--config-name PRESET] [--dry-run] [hydra overrides]`: parse, then call train()."""

from __future__ import annotations

import argparse
import sys

from mohge.train.errors import ConfigError, Interrupted, UsageError, hide_megatron_notices, run_tool

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
    parser.add_argument("--print-config", action="store_true",
                        help="print the composed config with the resolved layout and exit")
    parser.add_argument("--world-size", type=int, default=None,
                        help="with --print-config/--dry-run: resolve degrees for this many processes "
                             "(default: $WORLD_SIZE or 1)")
    parser.add_argument(
        "--dry-run", action="store_true", help="build the model on the meta device, report its size, exit"
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides key=value")
    return parser.parse_intermixed_args(argv)  # overrides may come before and after flags


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


def check_out_dir(out_dir: str) -> None:
    """Fails before any work when out_dir cannot be created or written (it holds metrics and checkpoints)."""
    import os
    import tempfile

    try:
        os.makedirs(out_dir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".write-test-"):
            pass
    except OSError as err:
        raise ConfigError(f"out_dir: {out_dir} is not writable ({err.strerror or err}); choose a writable "
                          "directory with out_dir=PATH") from err


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_tool("train", lambda: _main(args))


def _main(args: argparse.Namespace) -> int:
    from mohge.train.hydra_config import compose_config, to_yaml

    if args.world_size is not None and args.world_size < 1:
        raise UsageError(f"--world-size: must be >= 1 (got {args.world_size})")
    cfg = compose_config(args.config_name, args.overrides, world_size=args.world_size)
    if args.print_config:
        print(f"# layout: {cfg.layout_line()}")
        print(to_yaml(cfg))
        return 0
    if args.dry_run:
        print(describe_model(cfg))
        return 0
    hide_megatron_notices()  # once per rank otherwise
    from mohge.train.trainer import train

    check_out_dir(cfg.out_dir)
    from mohge.model.moe import cpu_kernels

    cpu_kernels.check()  # MOHGE_CPU_KERNELS, before the model is built, on any device
    try:
        train(cfg)
    except KeyboardInterrupt:  # a second Ctrl-C, or one before the training loop took over (train/preemption.py)
        raise Interrupted(interrupted_line(cfg.out_dir)) from None
    return 0


def interrupted_line(out_dir: str) -> str:
    """What survives a Ctrl-C that stopped the run at once: the newest complete checkpoint."""
    from mohge.train.checkpoint import find_latest

    latest = find_latest(out_dir)
    if latest is None:
        return f"stopped by Ctrl-C; no checkpoint was saved in {out_dir}"
    return (f"stopped by Ctrl-C; the last complete checkpoint is {latest} (resume with checkpoint.resume=auto; "
            "an unfinished save stays a .partial directory and is never loaded)")


if __name__ == "__main__":
    sys.exit(main())
