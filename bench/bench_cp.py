"""Context-parallel attention on CPU (gloo): ring vs all-gather, side by side in the same run.

    python bench/bench_cp.py --cp 2 --seq-len 2048 --out runs/bench_cp.json

Each of `cp` processes holds its load-balanced share of one sequence and runs the attention core
(`RingSDPA` or the all-gather `ContextParallelSDPA`) forward + backward on random q/k/v (GQA heads,
MLA-like qk/v head dims optional). Reported per rank 0: median wall time of fwd+bwd, bytes saved
for backward by the core (saved_tensors_hooks, each storage once, the inputs excluded), bytes this
rank sends (counted from the sizes the flavour exchanges: ring = (cp-1) kv blocks forward, cp-1 kv
blocks + cp dK/dV blocks backward; all-gather = its kv block to cp-1 peers forward and a
full-sequence dK/dV all-reduce backward, counted as a ring all-reduce's 2 (cp-1)/cp of it), and
the max difference of the two flavours' outputs and gradients.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from mohge.launch.local import run_ranks


def _inputs(args, rank):
    from mohge.parallel.context_parallel import load_balanced_positions

    g = torch.Generator().manual_seed(0)
    S = args.seq_len
    q = torch.randn(1, args.heads, S, args.qk_dim, generator=g)
    k = torch.randn(1, args.kv_heads, S, args.qk_dim, generator=g)
    v = torch.randn(1, args.kv_heads, S, args.v_dim, generator=g)
    pos = load_balanced_positions(S, args.cp, rank)
    return [x[:, :, pos].contiguous().requires_grad_() for x in (q, k, v)]


def _rank(rank, world, args):
    import torch.distributed as dist

    from mohge.parallel.context_parallel import ContextParallelSDPA, load_balanced_positions
    from mohge.parallel.ring_attention import RingSDPA

    torch.set_num_threads(1)
    group = dist.group.WORLD
    pos = load_balanced_positions(args.seq_len, world, rank)
    all_pos = torch.cat([load_balanced_positions(args.seq_len, world, r) for r in range(world)])
    cores = {"ring": RingSDPA(group), "all_gather": ContextParallelSDPA(group, pos, all_pos)}
    scale = args.qk_dim**-0.5
    rows, results, times, saved_bytes = {}, {}, {n: [] for n in cores}, {}
    for rep in range(args.warmup + args.reps):  # flavours alternate, so load changes hit both alike
        for name, core in cores.items():
            q, k, v = _inputs(args, rank)
            inputs = {x.untyped_storage().data_ptr() for x in (q, k, v)}
            seen = {}

            def pack(t):
                s = t.untyped_storage()
                seen[s.data_ptr()] = s.nbytes()
                return t

            dist.barrier()
            t0 = time.perf_counter()
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = core(q, k, v, scale)
            out.backward(torch.ones_like(out))
            dist.barrier()
            if rep >= args.warmup:
                times[name].append(time.perf_counter() - t0)
            saved_bytes[name] = sum(b for ptr, b in seen.items() if ptr not in inputs)
            results[name] = [out.detach(), q.grad, k.grad, v.grad]
    for name in cores:
        Sl, e = args.seq_len // world, 4  # fp32 elements
        kv_block = Sl * args.kv_heads * (args.qk_dim + args.v_dim) * e
        if name == "ring":
            sent = (world - 1) * kv_block + (world - 1) * kv_block + world * kv_block
        else:
            sent = (world - 1) * kv_block + 2 * (world - 1) / world * world * kv_block
        rows[name] = {"fwd_bwd_ms": 1e3 * statistics.median(times[name]), "saved_MiB": saved_bytes[name] / 2**20,
                      "sent_MiB": sent / 2**20}
    diff = max((a - b).abs().max().item() for a, b in zip(results["ring"], results["all_gather"]))
    return rows, diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cp", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--qk-dim", type=int, default=64)
    parser.add_argument("--v-dim", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default="runs/bench_cp.json")
    args = parser.parse_args()
    rows, diff = run_ranks(args.cp, _rank, args)[0]
    print(f"cp={args.cp} seq_len={args.seq_len} heads={args.heads} kv_heads={args.kv_heads} "
          f"qk_dim={args.qk_dim} v_dim={args.v_dim} (rank 0, fp32, gloo)")
    print(f"{'flavour':<12}{'fwd+bwd ms':>12}{'saved MiB':>12}{'sent MiB':>12}")
    for name, r in rows.items():
        print(f"{name:<12}{r['fwd_bwd_ms']:>12.1f}{r['saved_MiB']:>12.2f}{r['sent_MiB']:>12.2f}")
    print(f"max |ring - all_gather| over output and q/k/v grads: {diff:.2e}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "results": rows, "max_abs_diff": diff}, indent=1))


if __name__ == "__main__":
    main()
