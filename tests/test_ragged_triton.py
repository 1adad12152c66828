"""The Triton kernels of model/moe/ragged_triton.py against the CPU ops of ragged_mm.py (the
reference), run by Triton's interpreter on CPU tensors (no GPU needed).

Triton reads TRITON_INTERPRET when a kernel is decorated (at import), so the cases run in ONE child
process started with it set (`python tests/test_ragged_triton.py`); this process never sets it,
so nothing leaks into other test files. Each pytest case checks its own line of the child's report.

Shape legend: S rows, D model width, L local experts, G groups, F a group's width, Fm the widest.
Weights as RaggedExperts passes them: one per group, gate|up [n, D, 2F] and down [n, F, D], both
transposed views (the dx GEMM and its wgrad take the contiguous transposes: both layouts);
hidden rows [gate F | up F | 0 ...]. Layout: 4 groups of widths 40, 8, 24, 16 with 2, 3, 0, 2
local experts (a group with no local expert); rows per expert 5, 0 | 0, 0, 0 | - | 21, 3: an
expert with no rows, a whole group with no rows, an expert over several 16-row tiles. Small
blocks (16) so every kernel loops over tiles.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback

import pytest

pytest.importorskip("triton")

import torch  # noqa: E402

D, WIDTHS, EXPERTS = 24, [40, 8, 24, 16], [2, 3, 0, 2]
COUNTS = [5, 0, 0, 0, 0, 21, 3]
FM = max(WIDTHS)
MM_BLOCKS, WGRAD_BLOCKS, SWIGLU_BLOCKS = (16, 16, 16), (16, 16, 16), (16, 16)
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _layer(dtype: torch.dtype, counts: list[int] = COUNTS):
    """Inputs as RaggedExperts builds them: one transposed (non-contiguous) weight per group."""
    gen = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(dtype)  # noqa: E731
    S = sum(counts)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    w1 = [rand(n, f, D) for n, f in zip(EXPERTS, WIDTHS)]
    w3 = [rand(n, f, D) for n, f in zip(EXPERTS, WIDTHS)]
    w2 = [rand(n, D, f) for n, f in zip(EXPERTS, WIDTHS)]
    gate_up = [torch.cat([a, b], dim=1).transpose(-2, -1) for a, b in zip(w1, w3)]  # [n, D, 2F]
    down = [w.transpose(-2, -1) for w in w2]  # [n, F, D]
    return rand(S, D), offs, gate_up, down, rand


def _close(name: str, got: torch.Tensor, want: torch.Tensor, chained: bool = False) -> None:
    """`chained`: several bf16 roundings in a different order (a whole layer) may differ by an
    ulp or two of the largest value, so the bf16 absolute tolerance scales with it."""
    assert (got.shape, got.dtype) == (want.shape, want.dtype), \
        f"{name}: got {tuple(got.shape)} {got.dtype}, want {tuple(want.shape)} {want.dtype}"
    tol = dict(TOL[want.dtype])
    if chained and want.dtype == torch.bfloat16 and want.numel():
        tol["atol"] = max(tol["atol"], 2**-6 * float(want.detach().abs().max()))
    torch.testing.assert_close(got, want, **tol, msg=lambda m: f"{name}: {m}")


def _case_mm_gate_up(dtype):
    """x @ [w1 | w3]^T into the zero-padded [S, 2 Fm] hidden: rows [gate F | up F | 0 ...]."""
    from mohge.model.moe.ragged_mm import ragged_mm
    from mohge.model.moe.ragged_triton import ragged_mm_triton
    x, offs, gate_up, _, _ = _layer(dtype)
    _close("h", ragged_mm_triton(x, gate_up, offs, 2 * FM, MM_BLOCKS), ragged_mm(x, gate_up, offs, 2 * FM))


def _case_mm_gate_up_dx(dtype):
    """The input gradient of gate|up: each row reads its first 2F columns, contiguous weights."""
    from mohge.model.moe.ragged_mm import ragged_mm
    from mohge.model.moe.ragged_triton import ragged_mm_triton
    x, offs, gate_up, _, rand = _layer(dtype)
    dh = rand(x.shape[0], 2 * FM)
    ws = [w.transpose(-2, -1) for w in gate_up]
    assert all(w.is_contiguous() for w in ws)
    _close("dx", ragged_mm_triton(dh, ws, offs, D, MM_BLOCKS), ragged_mm(dh, ws, offs, D))


def _case_mm_down(dtype):
    """Each row reading its first F columns of the padded [S, Fm] input."""
    from mohge.model.moe.ragged_mm import ragged_mm
    from mohge.model.moe.ragged_triton import ragged_mm_triton
    x, offs, _, down, rand = _layer(dtype)
    a = rand(x.shape[0], FM)
    _close("out", ragged_mm_triton(a, down, offs, D, MM_BLOCKS), ragged_mm(a, down, offs, D))


def _case_wgrad(dtype):
    """Weight gradients of the three GEMMs (zeros for empty experts), each in its weight's memory
    layout: the transposed views' gradients transposed views too, the contiguous ones contiguous."""
    from mohge.model.moe.ragged_mm import ragged_mm_wgrad
    from mohge.model.moe.ragged_triton import ragged_mm_wgrad_triton
    x, offs, gate_up, down, rand = _layer(dtype)
    S = x.shape[0]
    dh, a, dy = rand(S, 2 * FM), rand(S, FM), rand(S, D)
    back = [w.transpose(-2, -1) for w in gate_up]
    for name, args in (("gate_up", (x, dh, gate_up, offs)), ("gate_up_dx", (dh, x, back, offs)),
                       ("down", (a, dy, down, offs))):
        got, want = ragged_mm_wgrad_triton(*args, WGRAD_BLOCKS), ragged_mm_wgrad(*args)
        assert len(got) == len(want) == len(args[2])
        for i, (g, w, weight) in enumerate(zip(got, want, args[2])):
            _close(f"{name}[{i}]", g, w)
            if weight.shape[0]:
                assert g.stride() == weight.stride(), f"{name}[{i}]: strides {g.stride()}, weight's {weight.stride()}"


def _case_swiglu(dtype):
    """Forward and backward at each group's width (up at column F of the row), zero past it."""
    from mohge.model.moe.ragged_mm import ragged_swiglu, ragged_swiglu_backward
    from mohge.model.moe.ragged_triton import ragged_swiglu_backward_triton, ragged_swiglu_triton
    x, offs, _, _, rand = _layer(dtype)
    h, dy = rand(x.shape[0], 2 * FM), rand(x.shape[0], FM)
    _close("y", ragged_swiglu_triton(h, offs, WIDTHS, EXPERTS, SWIGLU_BLOCKS), ragged_swiglu(h, offs, WIDTHS, EXPERTS))
    _close("dh", ragged_swiglu_backward_triton(dy, h, offs, WIDTHS, EXPERTS, SWIGLU_BLOCKS),
           ragged_swiglu_backward(dy, h, offs, WIDTHS, EXPERTS))


def _case_rows_past_offsets(dtype):
    """Rows past offs[-1] (which the CPU op refuses) come out zero, not uninitialised."""
    from mohge.model.moe.ragged_mm import ragged_mm
    from mohge.model.moe.ragged_triton import ragged_mm_triton, ragged_swiglu_backward_triton, ragged_swiglu_triton
    x, offs, gate_up, _, _ = _layer(dtype)
    S, extra = x.shape[0], 19
    xx = torch.cat([x, torch.ones(extra, D, dtype=dtype)])
    h = ragged_mm_triton(xx, gate_up, offs, 2 * FM, MM_BLOCKS)
    _close("h rows", h[:S], ragged_mm(x, gate_up, offs, 2 * FM))
    assert not h[S:].any(), "rows past offs[-1] are not zero"
    ones = torch.ones_like(h)
    y = ragged_swiglu_triton(ones, offs, WIDTHS, EXPERTS, SWIGLU_BLOCKS)
    assert not y[S:].any() and y[:S].any()
    dh = ragged_swiglu_backward_triton(torch.ones_like(y), ones, offs, WIDTHS, EXPERTS, SWIGLU_BLOCKS)
    assert not dh[S:].any() and dh[:S].any()


def _case_bad_shapes(dtype):
    """Static mismatches raise ValueError before a launch, as the CPU op does for the counts."""
    from mohge.model.moe.ragged_mm import ragged_mm
    from mohge.model.moe.ragged_triton import (ragged_mm_triton, ragged_mm_wgrad_triton, ragged_swiglu_backward_triton,
                                               ragged_swiglu_triton)
    x, offs, gate_up, down, _ = _layer(dtype)
    calls = (  # (message part, ops that must raise it, call)
        ("7 ", (ragged_mm_triton, ragged_mm), lambda mm: mm(x, gate_up[1:], offs, 2 * FM)),  # 5 experts
        ("needs at most 16 input", (ragged_mm_triton,), lambda mm: mm(x[:, :16], gate_up, offs, 2 * FM)),
        ("64 output", (ragged_mm_triton,), lambda mm: mm(x, gate_up, offs, 2 * FM - 16)),
    )
    for what, ops, call in calls:
        for mm in ops:
            try:
                call(mm)
            except ValueError as err:
                assert what in str(err) and "ragged_mm" in str(err), (what, str(err))
            else:
                raise AssertionError(f"{mm}: no ValueError for {what!r}")
    for fn, args in ((ragged_mm_wgrad_triton, (x, x, down, offs)),
                     (ragged_swiglu_triton, (x, offs, WIDTHS, EXPERTS)),
                     (ragged_swiglu_backward_triton, (x, x, offs, WIDTHS, EXPERTS))):
        try:
            fn(*args)
        except ValueError:
            continue
        raise AssertionError(f"{fn.__name__}: no ValueError")


def _layer_vs_loop(dtype, device: str) -> None:
    """RaggedExperts forward + backward through the ops' dispatch and autograd with the Triton
    kernels (the CUDA wrappers, registered here for `device`) == LoopExperts: output, input gradient
    and every weight gradient; one kernel per op call; on CUDA no host sync in the ragged step."""
    from mohge.model.config import ExpertGroupConfig
    from mohge.model.moe import ragged_mm as ops
    from mohge.model.moe import ragged_triton as rt
    from mohge.model.moe.experts import LoopExperts, RaggedExperts
    calls = {}

    def counted(fn):
        def run(*args):
            calls[fn.__name__] = calls.get(fn.__name__, 0) + 1
            return fn(*args)
        return run

    for op, fn in ((ops.ragged_mm, rt._ragged_mm_cuda), (ops.ragged_mm_wgrad, rt._ragged_mm_wgrad_cuda),
                   (ops.ragged_swiglu, rt._ragged_swiglu_cuda),
                   (ops.ragged_swiglu_backward, rt._ragged_swiglu_backward_cuda)):
        op.register_kernel(device)(counted(fn))
    groups = [ExpertGroupConfig(n, f) for n, f in zip([2, 3, 2, 2], WIDTHS)]
    keep = [0, 1, 2, 3, 4, 7, 8]  # group 2 (ids 5, 6) not held here: EXPERTS == [2, 3, 0, 2]
    loop, ragged = LoopExperts(D, groups), RaggedExperts(D, groups)
    loop.keep_local(keep), ragged.keep_local(keep)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in loop.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    ragged.load_state_dict(loop.state_dict())
    x = torch.randn(sum(COUNTS), D, generator=gen).to(device, dtype)
    g = torch.randn(sum(COUNTS), D, generator=gen).to(device, dtype)
    counts = torch.tensor(COUNTS, device=device)
    results = []
    for experts in (loop.to(device, dtype), ragged.to(device, dtype)):
        xi = x.clone().requires_grad_(True)
        no_sync = device == "cuda" and experts is ragged
        if no_sync:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")  # any host sync raises
        try:
            out = experts(xi, counts)
            (out * g).sum().backward()
        finally:
            if no_sync:
                torch.cuda.set_sync_debug_mode(0)
        results.append([out, xi.grad] + [p.grad for p in experts.parameters()])
    for i, (want, got) in enumerate(zip(*results)):
        if want.numel() == 0 and got is None:  # the group without local experts
            continue
        _close(f"layer result {i}", got.cpu(), want.cpu(), chained=True)
    # forward: gate/up, swiglu, down; backward: dx and dW of each projection, swiglu's backward
    assert calls == {"_ragged_mm_cuda": 4, "_ragged_mm_wgrad_cuda": 2, "_ragged_swiglu_cuda": 1,
                     "_ragged_swiglu_backward_cuda": 1}, calls


def _case_layer(dtype):
    """The layer on CPU tensors: the Triton kernels replace the CPU ops' code in this child."""
    _layer_vs_loop(dtype, "cpu")


CASES = {f"{name}-{tag}": (fn, dtype) for name, fn in
         (("mm_gate_up", _case_mm_gate_up), ("mm_gate_up_dx", _case_mm_gate_up_dx), ("mm_down", _case_mm_down),
          ("wgrad", _case_wgrad), ("swiglu", _case_swiglu), ("rows_past_offsets", _case_rows_past_offsets),
          ("bad_shapes", _case_bad_shapes),
          ("layer", _case_layer))  # last: it replaces the CPU kernels
         for tag, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
CASES = dict(sorted(CASES.items(), key=lambda kv: kv[0].startswith("layer")))


def _compile_for_h100() -> dict[str, str]:
    """Compiles every kernel the launchers start for an H100 (sm_90) on this GPU-less machine: a
    stand-in Triton driver names the target and each launch stops after compiling (warmup). The
    test's layout in fp32 and bf16, then bf16 with d_model and widths multiples of 16 (`aligned`).
    Returns per launch how its matmul is done (wgmma: Hopper tensor cores, mma, fma) and whether
    its loads are pipelined (cp.async)."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    class H100Target:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    driver.set_active(H100Target())
    from mohge.model.moe import ragged_triton as rt
    compiled, layout = {}, ""
    for name in ("_mm_kernel", "_wgrad_kernel", "_swiglu_kernel", "_swiglu_bwd_kernel"):
        kernel = getattr(rt, name)

        def compile_only(*args, grid, warmup, _run=kernel.run, _name=name, **kwargs):
            ptx = _run(*args, grid=grid, warmup=True, **kwargs).asm["ptx"]
            dtype = "bf16" if any(getattr(a, "dtype", None) == torch.bfloat16 for a in args) else "fp32"
            how = "wgmma" if "wgmma" in ptx else "mma" if "mma.sync" in ptx else "fma"
            compiled[f"{_name}-{dtype}{layout}-{len(compiled)}"] = how + (" cp.async" if "cp.async" in ptx else "")

        kernel.run = compile_only
    global D, WIDTHS
    for layout, dtype in (("", torch.float32), ("", torch.bfloat16), ("-aligned", torch.bfloat16)):
        if layout:
            D, WIDTHS = 256, [384, 512, 768, 1024]
        fm = max(WIDTHS)
        x, offs, gate_up, down, rand = _layer(dtype, [300, 0, 0, 0, 0, 2000, 45])  # several tiles per expert
        S = x.shape[0]
        h = rand(S, 2 * fm)
        rt.ragged_mm_triton(x, gate_up, offs, 2 * fm)
        rt.ragged_mm_triton(h, [w.transpose(-2, -1) for w in gate_up], offs, D)
        rt.ragged_mm_triton(rand(S, fm), down, offs, D)
        rt.ragged_mm_wgrad_triton(x, h, gate_up, offs)
        rt.ragged_mm_wgrad_triton(rand(S, fm), rand(S, D), down, offs)
        rt.ragged_swiglu_triton(h, offs, WIDTHS, EXPERTS)
        rt.ragged_swiglu_backward_triton(rand(S, fm), h, offs, WIDTHS, EXPERTS)
    return compiled


def _child(*args: str, interpret: bool) -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True, timeout=300)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and lines, f"child failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return json.loads(lines[-1])


@pytest.mark.slow
def test_kernels_compile_for_h100():
    """Not a run: the kernels pass Triton's whole compiler (to an sm_90 cubin); bf16 matmuls on
    wgmma, with pipelined loads (cp.async) when the widths are multiples of 16."""
    compiled = _child("--compile-sm90", interpret=False)
    assert len(compiled) == 21, compiled
    for key, how in compiled.items():
        if key.startswith(("_mm_kernel-bf16", "_wgrad_kernel-bf16")):
            assert how.startswith("wgmma"), (key, how)
        if key.startswith(("_mm_kernel-bf16-aligned", "_wgrad_kernel-bf16-aligned")):
            assert how == "wgmma cp.async", (key, how)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (not yet run on one)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_layer_matches_loop_without_host_sync(dtype):
    """Compiled, on a GPU: the layer as in the interpreter case, and no host sync in its step."""
    assert os.environ.get("TRITON_INTERPRET", "0") != "1"
    _layer_vs_loop(dtype, "cuda")


@pytest.fixture(scope="module")
def report():
    """Runs every case once in a child process under Triton's interpreter."""
    import triton
    if tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 7):
        pytest.skip(f"triton {triton.__version__}: its interpreter fails on loops with a tensor bound (3.7+ runs them)")
    return _child(interpret=True)


def test_interpreter_is_on_only_in_the_child():
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "TRITON_INTERPRET leaked into the test process"


@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_matches_cpu_op(report, case):
    assert report.get(case) == "ok", report.get(case, f"{case}: not run")


if __name__ == "__main__" and sys.argv[1:] == ["--compile-sm90"]:
    print(json.dumps(_compile_for_h100()))
elif __name__ == "__main__":  # the child: TRITON_INTERPRET=1 was set by report() before triton is imported
    assert os.environ.get("TRITON_INTERPRET") == "1"
    results = {}
    for case, (fn, dtype) in CASES.items():
        try:
            fn(dtype)
            results[case] = "ok"
        except Exception:  # report every case, not only the first failure
            results[case] = traceback.format_exc(limit=4)
    print(json.dumps(results))
