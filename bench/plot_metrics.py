"""Plots a run's metrics.jsonl: loss curves and the share of routed slots per expert group.

    python bench/plot_metrics.py runs/demo/metrics.jsonl docs/img/demo_run.png   (needs matplotlib)
"""

from __future__ import annotations

import json
import sys


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print(__doc__.strip().split("\n\n")[1], file=sys.stderr)
        return 2
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot_metrics: needs matplotlib (pip install matplotlib)", file=sys.stderr)
        return 2
    lines = [json.loads(line) for line in open(argv[0])]
    steps = [m["step"] for m in lines]
    fig, (loss_ax, group_ax) = plt.subplots(1, 2, figsize=(10, 3.5))
    loss_ax.plot(steps, [m["lm_loss"] for m in lines], label="train LM loss")
    val = [(m["step"], m["val_loss"]) for m in lines if "val_loss" in m]
    if val:
        loss_ax.plot(*zip(*val), "o-", label="validation loss")
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("loss")
    loss_ax.legend()
    layers = [m["moe"] for m in lines]
    num_groups = len(next(iter(layers[0].values()))["group_fraction"]) if layers[0] else 0
    for g in range(num_groups):
        share = [sum(e["group_fraction"][g] for e in moe.values()) / len(moe) for moe in layers]
        group_ax.plot(steps, share, label=f"group {g}")
    switch = next((m["step"] for m in lines if m.get("group_aux_active")), None)
    if switch:
        group_ax.axvline(switch, color="gray", ls="--", lw=1)
    group_ax.set_xlabel("step")
    group_ax.set_ylabel("share of routed slots (mean over MoE layers)")
    group_ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(argv[1], dpi=110)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
