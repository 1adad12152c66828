"""MoE parallel folding on CPU (gloo), 2 tp ranks: one MoE layer's forward + backward per rank,
unfolded (tp2: both ranks gather the sequence and compute every expert on all of it) against
folded (tp2 with ep2 over the same ranks: each rank's experts get only the tokens routed to them).

    python bench/bench_fold.py --out runs/bench_fold.json

Both run the real MoHGELayer on the gathered sequence (comm.GatherSequence) from each rank's
sequence shard; the folded one through parallel/moe_folding.py and the all-to-all dispatcher.
Expert rows per rank are counted from what each rank's experts received.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mohge.launch.local import run_ranks
from mohge.model.config import ExpertGroupConfig, MoEConfig

from bench_ep import layer_on_mesh  # run as `python bench/bench_fold.py`: bench/ is on the path


def bench_moe(num_groups: int) -> MoEConfig:
    return MoEConfig(groups=[ExpertGroupConfig(8, 256 + 128 * g) for g in range(num_groups)],
                     k_group=max(1, num_groups // 2), top_k=4, num_shared_experts=1, shared_ffn_hidden_size=256)


def _rank(rank, world, args, folded):
    import torch.distributed as dist

    from mohge.parallel.comm import gather_sequence
    from mohge.parallel.dims import ParallelDims
    from mohge.parallel.expert_parallel import apply_expert_parallel
    from mohge.parallel.moe_folding import apply_moe_folding

    torch.set_num_threads(1)
    moe = bench_moe(args.groups)
    dims = ParallelDims(1, 1, world, 1, world if folded else 1, world, moe_fold=folded)
    ctx, layer, holder = layer_on_mesh(dims, rank, args.d_model, moe)
    gen = torch.Generator().manual_seed(0)  # the same weights on every rank (before keeping local experts)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    if folded:
        apply_expert_parallel(holder, ctx, moe)
        apply_moe_folding(holder, ctx.dense_mesh["tp"])
        run = layer
    else:  # today's tp: gather, the whole layer on every rank, keep this rank's shard
        def run(x_BSlD):
            Sl = x_BSlD.shape[1]
            return layer(gather_sequence(x_BSlD, ctx.group("tp")))[:, rank * Sl : (rank + 1) * Sl]
    rows = []
    experts_forward = layer.experts.forward

    def counted(x, tokens_per_expert):
        rows.append(int(tokens_per_expert.sum()))
        return experts_forward(x, tokens_per_expert)

    layer.experts.forward = counted
    x = torch.randn(1, args.tokens // world, args.d_model, generator=torch.Generator().manual_seed(1 + rank))
    x.requires_grad_(True)
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            rows.clear()
            dist.barrier()
            start = time.perf_counter()
        run(x).square().mean().backward()
    dist.barrier()
    return {"time": time.perf_counter() - start, "expert_rows": sum(rows) / args.steps}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--groups", type=int, default=3)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per sequence (split over the 2 tp ranks)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", default="runs/bench_fold.json")
    args = parser.parse_args(argv)

    rows = []
    for folded in (False, True):
        results = run_ranks(2, _rank, args, folded, timeout=600)
        rows.append({"layout": "tp2 ep2 folded" if folded else "tp2 (unfolded)",
                     "layer_step_ms": max(r["time"] for r in results) / args.steps * 1e3,
                     "expert_rows_per_rank": [r["expert_rows"] for r in results]})
    print(f"one MoHGE layer, 2 ranks on CPU/gloo (1 thread each), {args.groups} groups x 8 experts, top_k 4, "
          f"1 shared expert, {args.tokens} tokens, d_model {args.d_model}; "
          f"{args.steps} steps after {args.warmup} warmup")
    print(f"{'layout':<18}{'layer fwd+bwd ms (max rank)':>29}{'expert rows per rank':>24}")
    for r in rows:
        print(f"{r['layout']:<18}{r['layer_step_ms']:>29.1f}{str([int(v) for v in r['expert_rows_per_rank']]):>24}")
    print(f"speedup {rows[0]['layer_step_ms'] / rows[1]['layer_step_ms']:.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "results": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
