"""Load-balancing comparison on the embedded corpus at CPU scale (docs/balancing.md).

Trains seven variants with the same token budget (configs/train/balance.yaml) one after the other,
each in its own process, then prints a table and writes JSON (and a plot of load over steps when
matplotlib is installed):

    python bench/bench_balancing.py --out runs/bench_balancing [--steps N] [--only moe_micro,hmoe]

Columns: final validation loss; max/mean expert load over the global batch (mean over the logged
steps of the second half, averaged over MoE layers), also inside each size group for the
heterogeneous models; the share of routed slots per size group at the end; wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

BIAS = "model.moe.bias_update_rate=1e-3"
VARIANTS = {
    "moe_micro": ("balance_moe", []),
    "moe_global": ("balance_moe", ["model.moe.balance_scope=global_batch"]),
    # DeepSeek-V3: bias-steered selection plus a tiny sequence-wise loss.
    "moe_bias": ("balance_moe", [BIAS, "model.moe.balance_scope=sequence", "model.moe.intra_aux_coeff=1e-4"]),
    "mohge_authors": ("balance_mohge", []),
    "mohge_global": ("balance_mohge", ["model.moe.balance_scope=global_batch"]),
    # Expert bias replaces the intra-group loss; the cost-aware group-wise loss stays.
    "mohge_bias": ("balance_mohge", [BIAS, "model.moe.intra_aux_coeff=0"]),
    "hmoe": ("balance_hmoe", []),
}


def run_variant(name: str, out: Path, steps: int | None, reuse: bool = False, seed: int | None = None) -> dict:
    preset, overrides = VARIANTS[name]
    run_dir = out / name
    if reuse:  # summarise a finished run (e.g. after an interrupted bench); no wall time
        lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return summarise(name, preset, overrides, lines, float("nan"))
    if (run_dir / "metrics.jsonl").exists():
        (run_dir / "metrics.jsonl").unlink()
    cmd = [sys.executable, "-m", "mohge.train.cli", "--config-name", preset, f"out_dir={run_dir}",
           "logging.progress=false", "checkpoint.save_final=false", *overrides]
    if steps:
        cmd += [f"train.steps={steps}", f"train.eval_every={steps}"]
    if seed is not None:
        cmd += [f"train.seed={seed}"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{name}: mohge-train failed:\n{proc.stderr[-2000:]}")
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return summarise(name, preset, overrides, lines, wall)


def _layer_mean(moe: dict, key: str) -> float:
    return sum(entry[key] for entry in moe.values()) / len(moe)


def summarise(name: str, preset: str, overrides: list[str], lines: list[dict], wall: float) -> dict:
    second_half = [l for l in lines if l["step"] > lines[-1]["step"] / 2]
    last_moe = lines[-1]["moe"]
    num_groups = len(next(iter(last_moe.values()))["group_fraction"])
    return {
        "variant": name,
        "preset": preset,
        "overrides": overrides,
        "steps": lines[-1]["step"],
        "val_loss": lines[-1].get("val_loss"),
        "train_lm_loss": lines[-1]["lm_loss"],
        "max_over_mean_load": sum(_layer_mean(l["moe"], "max_over_mean_load") for l in second_half) / len(second_half),
        "in_group_max_over_mean_load": sum(
            max(sum(e["group_max_over_mean_load"][g] for e in l["moe"].values()) / len(l["moe"])
                for g in range(num_groups))
            for l in second_half) / len(second_half),
        "group_fraction": [sum(e["group_fraction"][g] for e in last_moe.values()) / len(last_moe)
                           for g in range(num_groups)],
        "wall_s": wall,
        "load_curve": [(l["step"], _layer_mean(l["moe"], "max_over_mean_load")) for l in lines],
    }


def print_table(rows: list[dict]) -> None:
    print(f"{'variant':<15}{'val loss':>9}{'max/mean load':>15}{'in-group max/mean':>19}  {'group share':<20}{'wall s':>8}")
    for r in rows:
        val = f"{r['val_loss']:.4f}" if r["val_loss"] is not None else "-"
        share = " ".join(f"{f:.2f}" for f in r["group_fraction"])
        print(f"{r['variant']:<15}{val:>9}{r['max_over_mean_load']:>15.3f}{r['in_group_max_over_mean_load']:>19.3f}"
              f"  {share:<20}{r['wall_s']:>8.0f}")


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        steps, load = zip(*r["load_curve"])
        ax.plot(steps, load, label=r["variant"], linestyle="--" if r["variant"].startswith("moe") else "-")
    ax.set_xlabel("step")
    ax.set_ylabel("max / mean expert load")
    ax.set_title("expert load over the global batch (mean over MoE layers)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/bench_balancing", help="run directories, JSON and plot go here")
    parser.add_argument("--steps", type=int, default=None, help="override train.steps (same for every variant)")
    parser.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(VARIANTS)}")
    parser.add_argument("--seed", type=int, default=None, help="train.seed for every variant (default: the preset's, 1234)")
    parser.add_argument("--reuse", action="store_true", help="summarise the runs already in OUT, train nothing")
    parser.add_argument("--plot", default=None, help="plot path (default OUT/load_over_steps.png)")
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"--only: unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:
        rows.append(run_variant(name, out, args.steps, args.reuse, args.seed))
        print(f"done {name}: val {rows[-1]['val_loss']} in {rows[-1]['wall_s']:.0f}s", flush=True)
    print_table(rows)
    (out / "bench_balancing.json").write_text(json.dumps(rows, indent=1))
    plot_path = Path(args.plot) if args.plot else out / "load_over_steps.png"
    if plot(rows, plot_path):
        print(f"plot: {plot_path}")
    print(f"json: {out / 'bench_balancing.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
