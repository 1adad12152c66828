"""Expert parallel on CPU (gloo): expert-FLOP imbalance of all_size vs group_coupled placement
and the share of the MoE layer's time spent in dispatch/combine, under skewed routing.

    python bench/bench_ep.py --ep 4 --out runs/bench_ep.json

Routing is made realistic by adding fixed logit biases to the routers: group traffic skewed
towards narrow groups (what the group-wise loss produces) and per-expert Dirichlet noise (the intra-group loss keeps it mild in training: concentration 10
by default).
Each rank runs the real MoHGELayer with the all-to-all dispatcher over real gloo collectives;
FLOPs per rank come from the tokens each rank's experts actually received.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mohge.launch.local import run_ranks
from mohge.model.config import ExpertGroupConfig, MoEConfig


def bench_moe(num_groups: int) -> MoEConfig:
    widths = [256 + 128 * g for g in range(num_groups)]
    return MoEConfig(groups=[ExpertGroupConfig(8, w) for w in widths], k_group=max(1, num_groups // 2),
                     top_k=4, intra_aux_coeff=0.0, group_aux_coeff=0.0)


def layer_on_mesh(dims, rank: int, d_model: int, moe: MoEConfig):
    """(context with its meshes built, one MoHGE layer (loop experts), a module holding it as
    `.ffn`, which is where the parallel transforms look for MoE layers) for this rank."""
    from mohge.model.moe.layer import MoHGELayer
    from mohge.parallel.parallelize import ParallelContext

    ctx = ParallelContext(dims=dims, rank=rank)
    ctx.dense_mesh, ctx.expert_mesh = dims.build_meshes("cpu")
    layer = MoHGELayer(d_model, moe, "loop")
    holder = torch.nn.Module()
    holder.ffn = layer
    return ctx, layer, holder


def _rank(rank, world, args, strategy):
    from mohge.parallel.allocation import rank_flops
    from mohge.parallel.dims import ParallelDims
    from mohge.parallel.expert_parallel import apply_expert_parallel

    moe = bench_moe(args.groups)
    moe.allocation = strategy
    ctx, layer, holder = layer_on_mesh(ParallelDims(1, world, 1, 1, world, world), rank, args.d_model, moe)
    apply_expert_parallel(holder, ctx, moe)
    gen = torch.Generator().manual_seed(0)  # same weights and biases on every rank
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    # Skew: narrow groups favoured (traffic ~ 1/(g+1)), experts within a group Dirichlet(concentration).
    group_bias = torch.log(1.0 / torch.arange(1, args.groups + 1, dtype=torch.float32)) * args.skew
    torch.manual_seed(0)
    dirichlet = torch.distributions.Dirichlet(torch.full((8,), args.concentration))
    expert_bias = torch.log(dirichlet.sample((args.groups,)) * 8).flatten()
    router = layer.router
    route = router._route
    router._route = lambda g, e: route(g + group_bias, e + expert_bias)

    timings = {"dispatch": 0.0, "combine": 0.0}
    dispatcher = layer.dispatcher
    for name in ("dispatch", "combine"):
        fn = getattr(dispatcher, name)

        def timed(*a, _fn=fn, _name=name, **kw):
            start = time.perf_counter()
            out = _fn(*a, **kw)
            timings[_name] += time.perf_counter() - start
            return out

        setattr(dispatcher, name, timed)

    x = torch.randn(1, args.tokens, args.d_model, generator=torch.Generator().manual_seed(1 + rank))
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            timings.update(dispatch=0.0, combine=0.0)
            layer.stats.pop()
            torch.distributed.barrier()
            start = time.perf_counter()
        out = layer(x)
        out.square().mean().backward()
    total = time.perf_counter() - start
    tokens_per_expert = layer.stats.pop()["tokens_per_expert"]
    torch.distributed.all_reduce(tokens_per_expert)
    flops = rank_flops(layer.placement, tokens_per_expert.tolist(), args.d_model)
    return {"time": total, "dispatch": timings["dispatch"], "combine": timings["combine"], "flops": flops,
            "group_slots": [float(tokens_per_expert[g * 8:(g + 1) * 8].sum()) for g in range(args.groups)]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ep", type=int, default=4)
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per rank per step")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--skew", type=float, default=1.0, help="0: uniform group traffic")
    parser.add_argument("--concentration", type=float, default=10.0, help="Dirichlet, experts in a group")
    parser.add_argument("--out", default="runs/bench_ep.json")
    args = parser.parse_args(argv)

    rows = []
    for strategy in ("all_size", "group_coupled"):
        results = run_ranks(args.ep, _rank, args, strategy, timeout=600)
        flops = results[0]["flops"]
        mean = sum(flops) / len(flops)
        layer_time = max(r["time"] for r in results) / args.steps
        comm = max(r["dispatch"] + r["combine"] for r in results) / args.steps
        slots = results[0]["group_slots"]
        rows.append({
            "allocation": strategy,
            "ep": args.ep,
            "flop_imbalance": max(flops) / mean,
            "rank_flops_share": [f / sum(flops) for f in flops],
            "group_traffic": [s / sum(slots) for s in slots],
            "layer_step_ms": layer_time * 1e3,
            "dispatch_combine_ms": comm * 1e3,
            "dispatch_share": comm / layer_time,
        })
    print(f"EP={args.ep} on CPU/gloo, {args.groups} groups x 8 experts (widths "
          f"{[256 + 128 * g for g in range(args.groups)]}), top_k 4, {args.tokens} tokens/rank, d_model {args.d_model}")
    print("group traffic (share of routed slots): " + " ".join(f"{t:.3f}" for t in rows[0]["group_traffic"]))
    print(f"{'allocation':<15}{'FLOP imbalance':>16}{'layer fwd+bwd ms':>18}{'dispatch+combine ms':>21}{'share':>8}")
    for r in rows:
        print(f"{r['allocation']:<15}{r['flop_imbalance']:>16.3f}{r['layer_step_ms']:>18.1f}"
              f"{r['dispatch_combine_ms']:>21.1f}{r['dispatch_share']:>8.1%}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "results": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
