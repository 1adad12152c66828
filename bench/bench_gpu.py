"""Single-GPU benchmark: grouped GEMM vs per-expert loop, and training throughput / MFU of a
~0.75B MoHGE against a homogeneous MoE with the same expected activated parameters.

    python bench/bench_gpu.py --out runs/bench_gpu.json [--steps 30] [--stability-steps 200]

With --fp8 torchao (the default) it also runs the float8 variants: dense projections only
("-fp8"), and dense projections plus the routed experts' grouped GEMMs ("-fp8-experts",
train.fp8_experts=true); --no-fp8-experts leaves the latter out.

Tokens are synthetic (random walks on a fixed Markov chain, data/synthetic.py): learnable, so
loss curves mean something, and free of any data pipeline cost. Prints a table, writes JSON and,
with matplotlib available, a PNG of the stability run's loss curves next to the JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mohge.data.synthetic import SyntheticData
from mohge.model.config import ExpertGroupConfig, ModelConfig, MoEConfig
from mohge.model.moe.experts import GroupedExperts, LoopExperts
from mohge.model.transformer import build_model
from mohge.train.fp8 import apply_fp8
from mohge.train.throughput import device_peak_tflops, throughput

WIDTHS = [384, 512, 640, 768, 896, 1024, 1152, 1280]


def mohge_config(layers: int, experts_per_group: int) -> ModelConfig:
    return ModelConfig(vocab_size=32768, d_model=1024, n_layers=layers, n_heads=16, n_kv_heads=8,
                       ffn_hidden_size=4096, max_seq_len=2048, init_std=0.01,
                       moe=MoEConfig(groups=[ExpertGroupConfig(experts_per_group, w) for w in WIDTHS], k_group=4,
                                     top_k=6, group_aux_coeff=1e-5, intra_aux_coeff=4e-3, expert_compute="grouped"))


def moe_config(layers: int, experts_per_group: int) -> ModelConfig:
    """Homogeneous: the same number of experts, all of the mean MoHGE width (832), top-6."""
    cfg = mohge_config(layers, experts_per_group)
    cfg.moe = MoEConfig(groups=[ExpertGroupConfig(experts_per_group * len(WIDTHS), sum(WIDTHS) // len(WIDTHS))],
                        k_group=1, top_k=6, group_aux_coeff=0.0, intra_aux_coeff=4e-3, expert_compute="grouped")
    return cfg


def cuda_time(fn, iters: int = 20, warmup: int = 5) -> float:
    """Median milliseconds of fn() measured with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def bench_grouped_gemm(tokens: int, experts: int, d_model: int = 1024) -> list[dict]:
    """Forward + backward of one size group's experts: grouped GEMM vs per-expert loop (bf16)."""
    rows = []
    for width in WIDTHS:
        counts = torch.distributions.Multinomial(tokens, torch.ones(experts)).sample().long().cuda()
        x = torch.randn(tokens, d_model, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn(tokens, d_model, device="cuda", dtype=torch.bfloat16)
        result = {"width": width}
        outs = {}
        for name, cls in (("loop", LoopExperts), ("grouped", GroupedExperts)):
            group = cls(d_model, [ExpertGroupConfig(experts, width)]).cuda().to(torch.bfloat16)
            torch.manual_seed(0)
            with torch.no_grad():
                for p in group.parameters():
                    p.normal_(0, 0.02)

            def step():
                x.grad = None
                out = group(x, counts)
                out.backward(grad)
                return out

            outs[name] = step().detach().float()
            result[f"{name}_ms"] = cuda_time(step)
        flops = 3 * 2 * 3 * tokens * d_model * width  # 3 matmuls, 2 FLOPs/MAC, fwd + 2 bwd
        result["grouped_tflops"] = flops / result["grouped_ms"] / 1e9
        result["speedup"] = result["loop_ms"] / result["grouped_ms"]
        result["rel_err"] = float((outs["grouped"] - outs["loop"]).norm() / outs["loop"].norm())
        rows.append(result)
    return rows


def train_run(cfg: ModelConfig, steps: int, batch: int, seq_len: int, compute: str, seed: int = 0,
              profile_experts: bool = False, fp8: str = "none", fp8_experts: bool = False) -> dict:
    cfg.moe.expert_compute = compute
    torch.manual_seed(seed)
    model = build_model(cfg, "meta", expert_compute=compute)
    converted = apply_fp8(model, fp8, torch.device("cuda"), experts=fp8_experts)
    model.to_empty(device="cuda")
    model.init_weights(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    data = SyntheticData(cfg.vocab_size, seq_len, batch, seed)
    batches = [tuple(t.cuda() for t in data.next_train_batch()) for _ in range(min(steps, 64))]
    expert_time = [0.0]
    if profile_experts:  # CUDA events around every experts forward (backward is not captured)
        for layer in model.layers.values():
            experts = layer.ffn.experts
            inner = experts.forward

            def timed(*a, _inner=inner):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                out = _inner(*a)
                e.record()
                torch.cuda.synchronize()
                expert_time[0] += s.elapsed_time(e)
                return out

            experts.forward = timed
    losses, slots = [], None
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    start = time.perf_counter()
    timed_from = min(5, steps // 2)
    for step in range(steps):
        if step == timed_from:
            torch.cuda.synchronize()
            start = time.perf_counter()
            expert_time[0] = 0.0
        tokens, labels = batches[step % len(batches)]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(tokens)
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    for layer in model.layers.values():
        stats = layer.ffn.stats.pop()
        per_expert = stats["tokens_per_expert"]
        slots = per_expert if slots is None else slots + per_expert
    offsets = cfg.moe.group_offsets()
    fractions = [float(slots[offsets[g]:offsets[g + 1]].sum() / slots.sum()) for g in range(cfg.moe.num_groups)]
    tokens_per_s = (steps - timed_from) * batch * seq_len / elapsed
    rates = throughput(cfg, seq_len, tokens_per_s, fractions, device_peak_tflops(torch.device("cuda")))
    return {"compute": compute, "fp8": fp8, "fp8_experts": fp8_experts, "fp8_linears": converted, "params": cfg.num_params(), "active_params": cfg.active_params_per_token(fractions),
            "tokens_per_s": tokens_per_s, "tflops": rates["tflops"], "mfu": rates.get("mfu"),
            "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30, "losses": losses,
            "group_fractions": fractions,
            "expert_fwd_share": (expert_time[0] / 1e3) / elapsed if profile_experts else None}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts-per-group", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--stability-steps", type=int, default=200)
    parser.add_argument("--fp8", choices=("none", "torchao"), default="torchao")
    parser.add_argument("--no-fp8-experts", dest="fp8_experts", action="store_false",
                        help="skip the runs with float8 routed-expert GEMMs")
    parser.add_argument("--out", default="runs/bench_gpu.json")
    args = parser.parse_args(argv)
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    device = torch.cuda.get_device_name()
    report = {"device": device, "torch": torch.__version__, "args": vars(args)}

    report["grouped_gemm"] = bench_grouped_gemm(tokens=8 * 2048 * 6 // 8, experts=args.experts_per_group)
    print(f"device: {device}, torch {torch.__version__}")
    print("grouped GEMM vs per-expert loop, one size group (fwd+bwd, bf16):")
    print(f"{'width':>6}{'loop ms':>10}{'grouped ms':>12}{'speedup':>9}{'TFLOP/s':>9}{'rel err':>10}")
    for r in report["grouped_gemm"]:
        print(f"{r['width']:>6}{r['loop_ms']:>10.3f}{r['grouped_ms']:>12.3f}{r['speedup']:>9.2f}"
              f"{r['grouped_tflops']:>9.1f}{r['rel_err']:>10.2e}")

    runs = {}
    for name, cfg in (("mohge", mohge_config(args.layers, args.experts_per_group)),
                      ("moe", moe_config(args.layers, args.experts_per_group))):
        runs[f"{name}-grouped"] = train_run(cfg, args.steps, args.batch, args.seq_len, "grouped")
        runs[f"{name}-grouped-profiled"] = train_run(cfg, 12, args.batch, args.seq_len, "grouped", profile_experts=True)
        if args.fp8 != "none":
            runs[f"{name}-grouped-fp8"] = train_run(cfg, args.steps, args.batch, args.seq_len, "grouped", fp8=args.fp8)
        if args.fp8 != "none" and args.fp8_experts:
            runs[f"{name}-grouped-fp8-experts"] = train_run(cfg, args.steps, args.batch, args.seq_len, "grouped",
                                                            fp8=args.fp8, fp8_experts=True)
        torch.cuda.empty_cache()
    report["throughput"] = {k: {kk: vv for kk, vv in v.items() if kk != "losses"} for k, v in runs.items()}
    print(f"\ntraining throughput (bf16 autocast, batch {args.batch} x {args.seq_len}, {args.layers} layers):")
    print(f"{'run':<28}{'params':>10}{'active':>10}{'tok/s':>10}{'TFLOP/s':>9}{'MFU':>7}{'mem GB':>8}{'experts fwd':>12}")
    for k, v in runs.items():
        share = f"{v['expert_fwd_share']:.1%}" if v["expert_fwd_share"] is not None else "-"
        mfu = f"{v['mfu']:.1%}" if v["mfu"] is not None else "-"
        print(f"{k:<28}{v['params'] / 1e9:>9.2f}B{v['active_params'] / 1e6:>9.0f}M{v['tokens_per_s']:>10.0f}"
              f"{v['tflops']:>9.1f}{mfu:>7}{v['peak_mem_gb']:>8.1f}{share:>12}")

    small = mohge_config(4, 2)
    curves = {c: train_run(small, args.stability_steps, 4, 1024, c)["losses"] for c in ("loop", "grouped")}
    if args.fp8 != "none":
        curves[f"grouped-fp8-{args.fp8}"] = train_run(small, args.stability_steps, 4, 1024, "grouped", fp8=args.fp8)["losses"]
    if args.fp8 != "none" and args.fp8_experts:
        curves[f"grouped-fp8-experts-{args.fp8}"] = train_run(small, args.stability_steps, 4, 1024, "grouped",
                                                              fp8=args.fp8, fp8_experts=True)["losses"]
    tail = min(50, args.stability_steps)
    summary = {name: {"first": c[0], "last": c[-1], f"mean_last_{tail}": sum(c[-tail:]) / tail,
                      "max_rel_dev_vs_loop": max(abs(a - b) / abs(a) for a, b in zip(curves["loop"], c))}
               for name, c in curves.items()}
    report["stability"] = {"config": "4 layers, 8 groups x 2 experts, batch 4 x 1024, lr 6e-4", "curves": curves,
                           "summary": summary}
    print(f"\nstability, {args.stability_steps} steps (bf16 loop = reference):")
    for name, s_ in summary.items():
        print(f"  {name:<30} loss {s_['first']:.3f} -> {s_['last']:.3f}, mean of last {tail} "
              f"{s_[f'mean_last_{tail}']:.4f}, max rel. deviation from loop {s_['max_rel_dev_vs_loop']:.2e}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        for name, curve in curves.items():
            ax.plot(curve, label=name, lw=1)
        ax.set_xlabel("step")
        ax.set_ylabel("LM loss")
        ax.set_title(f"MoHGE expert paths on {device}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=120)
    except ImportError:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
