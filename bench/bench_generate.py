"""Generation speed of the standalone module: KV cache vs recomputing the prefix, same model,
same prompts, same run (greedy; the outputs are checked identical before timing counts).

    python bench/bench_generate.py --out runs/bench_generate.json
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny_mohge", help="model preset (random weights)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--new", type=int, nargs="+", default=[16, 48])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="runs/bench_generate.json")
    args = parser.parse_args(argv)

    from mohge.launch.modeling import MoHGEForCausalLM
    from mohge.train.hydra_config import compose_config

    cfg = asdict(compose_config(args.preset, []).model)
    model = MoHGEForCausalLM(cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p) if name.endswith("norm.weight") else torch.randn(p.shape, generator=gen) * 0.05)
    model.eval()
    prompts = torch.randint(0, cfg["vocab_size"], (args.batch, args.prompt), generator=gen)
    model.generate(prompts, 2)  # warm-up
    model.generate(prompts, 2, use_cache=False)
    rows = []
    for new in args.new:
        outs, times = {}, {}
        for use_cache in (True, False):
            best = float("inf")
            for _ in range(args.repeats):
                start = time.perf_counter()
                outs[use_cache] = model.generate(prompts, new, use_cache=use_cache)
                best = min(best, time.perf_counter() - start)
            times[use_cache] = best
        assert torch.equal(outs[True], outs[False]), "cached and recomputed generations differ"
        rows.append({"new_tokens": new, "batch": args.batch, "prompt": args.prompt,
                     "cache_tok_per_s": args.batch * new / times[True],
                     "recompute_tok_per_s": args.batch * new / times[False],
                     "speedup": times[False] / times[True]})
    print(f"{args.preset}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, {torch.get_num_threads()} threads")
    print(f"{'new':>5} {'batch':>5} {'prompt':>6} {'cache tok/s':>12} {'recompute tok/s':>16} {'speedup':>8}")
    for r in rows:
        print(f"{r['new_tokens']:>5} {r['batch']:>5} {r['prompt']:>6} {r['cache_tok_per_s']:>12.1f} "
              f"{r['recompute_tok_per_s']:>16.1f} {r['speedup']:>7.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"preset": args.preset, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
