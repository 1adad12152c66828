"""One MoE layer and one full transformer block, forward + backward: MoHGE (8 groups, widths spread
like bench_gpu.py) against the homogeneous MoE with the same activated parameters, eager and
compiled, in one run with the same shapes. Prints a table and writes JSON.

The two models' steps of a path run interleaved (the order alternating every round), so both see
the same machine. Per case: tokens/s (median of the timed repeats), the process's CPU time per
step (median; on a shared CPU steadier than wall time), `vs moe` against the homogeneous model
on the same path and `vs best` against its fastest path (same module, eager or compiled),
`spread` the 25th-75th percentile of the per-round ratio (how much the machine moved the
figure), GEMM and total ops per layer step (torch.profiler: ops as issued from Python and
autograd, an op's inner ops not counted again; on CUDA, kernels), host syncs per layer step
(mohge.parallel.host_syncs), peak memory of the tensors the step allocates, first call seconds
(compilation). Gradients are dropped between steps as the optimizer's zero_grad does. On the CPU,
glibc's malloc keeps freed memory (`steady_malloc`; `--system-malloc` to keep its defaults):
otherwise page faults on fresh pages, not the layers, decide the comparison. The ragged ops run
their C++ CPU kernels (model/moe/cpu_kernels.py; MOHGE_CPU_KERNELS=python: the Python loop); the
header line says which.

Expert paths (model/moe/experts.py; weights stored unpadded per group in all): `ragged` (one op
per projection for every width, exact FLOPs; sync-free on the CPU), `grouped` (padded stacks
built in forward, one grouped GEMM per projection, sync-free everywhere, padded FLOPs) and `loop`
(reference, one matmul chain per expert).

    python bench/bench_moe.py [--device cpu|cuda] [--out runs/bench_moe.json] [--no-compile]
                              [--paths ragged,grouped] [--modules layer] [--no-loss]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from mohge.model.config import ExpertGroupConfig, ModelConfig, MoEConfig
from mohge.model.layers import rope_cache
from mohge.model.loss import chunked_linear_cross_entropy
from mohge.model.moe import cpu_kernels
from mohge.model.moe.experts import EXPERT_CLASSES
from mohge.model.moe.layer import MoHGELayer
from mohge.model.transformer import TransformerBlock
from mohge.parallel.host_syncs import count_host_syncs


CLASSES = EXPERT_CLASSES
# Ops that issue GEMMs, counted where Python or autograd issues them (matmul / linear dispatch to
# mm / addmm inside, counted once as the outer op).
GEMMS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::_grouped_mm",
         "mohge::grouped_mm", "mohge::grouped_mm_weight_grad", "mohge::ragged_mm", "mohge::ragged_mm_wgrad")


def configs(d_model: int, scale: int) -> dict[str, MoEConfig]:
    """MoHGE: 8 groups x 8 experts, widths 384..1280 step 128 divided by `scale`, top-6 of 4 kept
    groups; MoE: 64 experts of the mean width, top-6 (equal activated parameters)."""
    widths = [(384 + 128 * i) // scale for i in range(8)]
    mohge = MoEConfig(groups=[ExpertGroupConfig(8, w) for w in widths], k_group=4, top_k=6,
                      group_aux_start_fraction=0.0)
    moe = MoEConfig(groups=[ExpertGroupConfig(64, sum(widths) // 8)], k_group=1, top_k=6)
    return {"mohge": mohge, "moe": moe}


class PeakMemory(TorchDispatchMode):
    """Peak bytes of live storages created inside the block (outputs of ops, forward and backward)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.seen: set[int] = set()

    def _free(self, key, nbytes):
        self.live -= nbytes
        self.seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.seen:
                    self.seen.add(key)
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key, storage.nbytes())
        return out


def build(kind: str, moe: MoEConfig, d_model: int, compute: str, device: str):
    cls = CLASSES[compute]
    if kind == "layer":
        module = MoHGELayer(d_model, moe, "loop")
    else:
        cfg = ModelConfig(vocab_size=256, d_model=d_model, n_layers=1, n_heads=d_model // 64,
                          n_kv_heads=d_model // 64, ffn_hidden_size=4 * d_model, max_seq_len=4096,
                          first_k_dense=0, ffn_type="mohge", moe=moe)
        module = TransformerBlock(cfg, 0, "loop")
    layer = module if kind == "layer" else module.ffn
    layer.experts = cls(d_model, moe.groups)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return module.to(device)


def prepare_case(kind, moe, d_model, compute, compiled, tokens, seq, device, backend):
    """The module and its training step (forward, backward, gradients dropped as the optimizer's
    zero_grad(set_to_none=True) does), after a first call (compilation when compiled)."""
    module = build(kind, moe, d_model, compute, device)
    x = torch.randn(tokens // seq, seq, d_model, device=device, requires_grad=True)
    grad = torch.randn_like(x)
    rope = rope_cache(seq, 64, 10000.0, device=device) if kind == "block" else None
    fn = torch.compile(module, backend=backend, fullgraph=True) if compiled else module

    def step():
        x.grad = None
        for p in module.parameters():
            p.grad = None
        out = fn(x) if rope is None else fn(x, rope)
        out.backward(grad)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    start = time.perf_counter()
    step()
    return step, time.perf_counter() - start


def time_pair(steps: dict, repeats: int) -> dict:
    """Wall and process CPU seconds of each step, the two models' steps interleaved (order
    alternating every round) so that both see the same machine."""
    times = {name: ([], []) for name in steps}
    names = list(steps)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            start, cpu_start = time.perf_counter(), time.process_time()
            steps[name]()
            times[name][0].append(time.perf_counter() - start)
            times[name][1].append(time.process_time() - cpu_start)
    return times


def describe(step, compiled: bool, device: str) -> dict:
    """GEMM and total ops per layer step (torch.profiler), host syncs and peak memory (eager only:
    dispatch modes cannot run under torch.compile)."""
    syncs, peak_mb = None, None
    if not compiled:
        with count_host_syncs() as counted:
            step()
        syncs = sum(counted.values())
        peak = PeakMemory()
        with peak:
            step()
        peak_mb = peak.peak / 2**20
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        step()
    events = prof.events()
    if device == "cuda":
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        gemm = sum(1 for e in kernels if any(s in e.name.lower() for s in ("gemm", "sm90", "cutlass", "matmul")))
        ops = len(kernels)
    else:
        # Ops as issued by Python and autograd (an op inside another op, e.g. the per-expert mm
        # of a CPU grouped GEMM kernel, is part of its parent's launch).
        def top(e):
            parent = e.cpu_parent
            while parent is not None:
                if parent.name.startswith(("aten::", "mohge::")):
                    return False
                parent = parent.cpu_parent
            return e.name.startswith(("aten::", "mohge::"))

        issued = [e for e in events if top(e)]
        gemm = sum(1 for e in issued if e.name in GEMMS)
        ops = len(issued)
    return {"gemm_ops": gemm, "ops": ops, "host_syncs": syncs, "peak_mb": peak_mb}


def run_pair(kind, compute, compiled, d_model, tokens, seq, device, repeats, backend) -> list[dict]:
    """MoHGE and the homogeneous MoE, same shapes, one path, timed side by side."""
    steps, first, rows = {}, {}, []
    for model, moe in configs(d_model, 1024 // d_model).items():
        steps[model], first[model] = prepare_case(kind, moe, d_model, compute, compiled, tokens, seq, device,
                                                  backend)
    times = time_pair(steps, repeats)
    ratios = sorted(m / h for h, m in zip(times["mohge"][1], times["moe"][1]))  # per round, CPU time
    spread = [ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]]
    for model, step in steps.items():
        wall, cpu = (statistics.median(t) for t in times[model])
        rows.append({"module": kind, "model": model, "experts": compute, "compiled": compiled,
                     "tokens_per_s": tokens / wall, "ms": wall * 1e3, "cpu_ms": cpu * 1e3,
                     "round_ratio_iqr": spread if model == "mohge" else None,
                     **describe(step, compiled, device), "first_call_s": first[model]})
    return rows


def loss_rows(tokens: int, d_model: int, vocab: int, chunk: int, device: str, repeats: int) -> list[dict]:
    """Output projection + cross-entropy, forward + backward: whole fp32 logits (today's lm_loss)
    against model/loss.py's chunks."""
    gen = torch.Generator().manual_seed(0)
    h = (torch.randn(tokens, d_model, generator=gen) * 0.5).to(device).requires_grad_(True)
    w = (torch.randn(vocab, d_model, generator=gen) * 0.02).to(device).requires_grad_(True)
    labels = torch.randint(0, vocab, (tokens,), generator=gen).to(device)
    paths = {"whole": lambda: F.cross_entropy(F.linear(h, w).float(), labels),
             f"chunked_{chunk}": lambda: chunked_linear_cross_entropy(h, w, labels, chunk)}
    rows = []
    for name, fn in paths.items():
        def step():
            h.grad = w.grad = None
            loss = fn()
            loss.backward()
            return loss
        step()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            loss = step()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        peak = PeakMemory()
        with peak:
            step()
        rows.append({"path": name, "tokens": tokens, "vocab": vocab, "loss": float(loss.detach()),
                     "ms": statistics.median(times) * 1e3, "peak_mb": peak.peak / 2**20})
    return rows


def steady_malloc() -> bool:
    """Keeps freed memory in glibc's heap (no mmap per large tensor, no trimming), as jemalloc or
    tcmalloc would: by default glibc hands every large freed block back to the OS, each step's
    tensors then land on fresh pages, and on this VM every first touch of a page costs ~3 us, so
    page faults, not the layer, set the ranking (the homogeneous layer's larger tensors fault
    more). Returns False where mallopt is not there (not glibc)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def _spread(row: dict) -> str:
    iqr = row["round_ratio_iqr"]
    return "-" if iqr is None else f"{iqr[0]:.2f}-{iqr[1]:.2f}"


def _fmt(value, width: int, spec: str) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}{spec}}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="runs/bench_moe.json")
    p.add_argument("--d-model", type=int, default=0, help="default: 256 on CPU, 1024 on CUDA")
    p.add_argument("--tokens", type=int, default=0, help="default: 512 on CPU, 16384 on CUDA")
    p.add_argument("--repeats", type=int, default=0, help="timed rounds per path (default 7 on CPU, 20 on CUDA)")
    p.add_argument("--paths", default="loop,ragged,grouped", help="comma list of expert paths (loop: eager only)")
    p.add_argument("--backend", default="inductor", help="torch.compile backend of the compiled rows")
    p.add_argument("--no-compile", action="store_true", help="eager rows only")
    p.add_argument("--only-compiled", action="store_true", help="compiled rows only")
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--loss-tokens", type=int, default=0, help="default: 1024 on CPU, 16384 on CUDA")
    p.add_argument("--loss-chunk", type=int, default=512)
    p.add_argument("--only-loss", action="store_true", help="only the output projection + CE rows")
    p.add_argument("--no-loss", action="store_true", help="skip the output projection + CE rows")
    p.add_argument("--modules", default="layer,block", help="comma list of layer, block")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (1: steadier on a shared machine)")
    p.add_argument("--system-malloc", action="store_true",
                   help="keep glibc's default malloc settings on the CPU (see steady_malloc)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    malloc = "system" if cuda or args.system_malloc or not steady_malloc() else "steady"
    d_model = args.d_model or (1024 if cuda else 256)
    tokens = args.tokens or (16384 if cuda else 512)
    repeats = args.repeats or (20 if cuda else 7)
    seq = min(tokens, 256 if not cuda else 2048)
    # The ragged ops' CPU kernels: C++ (built here, before any timing) or the Python loop.
    kernels = "-" if cuda else "cpp" if cpu_kernels.ops() is not None else "python"
    torch.manual_seed(0)
    cases = [("layer", "loop", False), ("layer", "ragged", False), ("layer", "grouped", False),
             ("block", "ragged", False), ("block", "grouped", False)]
    if not args.no_compile:
        cases += [("layer", "ragged", True), ("layer", "grouped", True), ("block", "ragged", True),
                  ("block", "grouped", True)]
    rows = []
    if args.only_loss:
        cases = []
    if args.only_compiled:
        cases = [c for c in cases if c[2]]
    cases = [c for c in cases if c[0] in args.modules.split(",") and c[1] in args.paths.split(",")]
    for kind, compute, compiled in cases:
        rows += run_pair(kind, compute, compiled, d_model, tokens, seq, args.device, repeats, args.backend)
    by = {(r["module"], r["experts"], r["compiled"], r["model"]): r for r in rows}
    for r in rows:
        base = by[(r["module"], r["experts"], r["compiled"], "moe")]
        r["vs_moe"] = r["tokens_per_s"] / base["tokens_per_s"]
        r["vs_moe_cpu"] = base["cpu_ms"] / r["cpu_ms"]
        # against the homogeneous MoE's fastest path of the same module, eager or compiled
        best = min(b["cpu_ms"] for b in rows if b["model"] == "moe" and b["module"] == r["module"]
                   and b["compiled"] == r["compiled"])
        r["vs_best_moe_cpu"] = best / r["cpu_ms"]
    head = (f"{'module':<7}{'model':<7}{'experts':<10}{'compiled':<9}{'tok/s':>10}{'ms':>9}{'vs moe':>8}"
            f"{'cpu ms':>9}{'vs moe':>8}{'vs best':>8}{'spread':>11}{'gemm':>6}{'ops':>6}{'syncs':>6}{'peak MB':>9}{'1st s':>7}")
    print(f"device {args.device}, d_model {d_model}, tokens {tokens}, threads {torch.get_num_threads()}, "
          f"malloc {malloc}, cpu kernels {kernels}")
    print(head)
    for r in rows:
        print(f"{r['module']:<7}{r['model']:<7}{r['experts']:<10}{str(r['compiled']):<9}{r['tokens_per_s']:>10.0f}"
              f"{r['ms']:>9.1f}{r['vs_moe']:>8.2f}{r['cpu_ms']:>9.1f}{r['vs_moe_cpu']:>8.2f}{r['vs_best_moe_cpu']:>8.2f}{_spread(r):>11}{r['gemm_ops']:>6}{r['ops']:>6}{_fmt(r['host_syncs'], 6, 'd')}"
              f"{_fmt(r['peak_mb'], 9, '.1f')}{r['first_call_s']:>7.1f}")
    loss_tokens = args.loss_tokens or (16384 if cuda else 1024)
    losses = [] if args.no_loss else loss_rows(loss_tokens, d_model, args.vocab, args.loss_chunk,
                                                args.device, repeats if cuda else 3)
    if losses:
        print(f"\noutput projection + cross-entropy, fwd+bwd, {loss_tokens} tokens, vocab {args.vocab}")
        print(f"{'path':<16}{'ms':>9}{'peak MB':>10}{'loss':>10}")
    for r in losses:
        print(f"{r['path']:<16}{r['ms']:>9.1f}{r['peak_mb']:>10.1f}{r['loss']:>10.4f}")
    report = {"device": args.device, "d_model": d_model, "tokens": tokens, "repeats": repeats, "malloc": malloc,
              "cpu_kernels": kernels, "backend": args.backend, "rows": rows, "loss_rows": losses}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
