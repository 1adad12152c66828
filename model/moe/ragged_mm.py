"""`mohge::ragged_mm`: one grouped GEMM over the local experts of a layer, every width at once.

Shape legend: S rows (sorted by local expert), L local experts (group-major), G size groups, n a
group's local experts, K/N a group's contraction/output width, F a group's ffn width, Fm the
widest.

    out = ragged_mm(x [S, X], ws, offs [L], out_cols)  ->  [S, out_cols]

`ws` holds one weight per group ([n_g, K_g, N_g]: group g's n_g experts, contraction-major, i.e.
the transposed views of the stored tensors), `offs` the cumulative row ends of the L experts (on
the device; the rows of expert l are offs[l-1]:offs[l]). A row of an expert of group g reads the
first K_g columns of x and writes x[:, :K_g] @ w into the first N_g columns of out; the columns
after N_g are zero. FLOPs are exact: no expert multiplies padding.

The expert MLP in three ops, whatever the number of groups:
    h = ragged_mm(x, [w1 | w3]^T per group, offs, 2 Fm)    rows: [gate F | up F | 0 ...]
    a = ragged_swiglu(h, offs, widths, experts)            rows: [silu(gate) * up F | 0 ...]
    y = ragged_mm(a, w2^T per group, offs, D)
and back: dx = ragged_mm(dh, [w1 | w3] per group, offs, D) reads each row's [d gate | d up]
where it is, so no layout is converted anywhere.

Autograd (dx: this op on the transposed weights; dW: `ragged_mm_wgrad`, in the weights' own
memory layout) and shape functions (torch.compile, fullgraph) are registered.

Kernels. CPU: one C++ loop over the experts (model/moe/ragged_cpu.cpp, built on first use by
model/moe/cpu_kernels.py): each expert's GEMM written straight into its rows of the output (no
copies; any width), SwiGLU in place per group. Where it cannot be built (or with
MOHGE_CPU_KERNELS=python) the same loop in Python below: a single group at full width (the
homogeneous MoE) is one torch grouped_mm (its C++ loop over experts), several groups one mm per
expert. Both read `offs` where it lives, as torch's own CPU grouped_mm does: on the CPU there is
no device to wait for. CUDA with triton: the Triton kernels of model/moe/ragged_triton.py
(sync-free, one launch per op call; so far run only in Triton's interpreter). Any other device
runs the Python code, which reads `offs` to the host: a sync (counted by
mohge.parallel.host_syncs). `auto` picks this path on the CPU only (experts.resolve_auto) until a
GPU measures the Triton kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mohge.model.moe import cpu_kernels
from mohge.parallel.host_syncs import read_on_host


def _native(*tensors: torch.Tensor):
    """The C++ CPU kernels (torch.ops.mohge_cpu) when every tensor is on the CPU and they are
    built, else None (the Python kernels below run)."""
    return cpu_kernels.ops() if all(t.device.type == "cpu" for t in tensors) else None


def _aligned(*ts: torch.Tensor) -> bool:
    """torch's grouped_mm takes 16-byte aligned strides and pointers, in fp32/bf16/fp16."""
    for t in ts:
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float16) or t.data_ptr() % 16:
            return False
        if any(st != 1 and (st * t.element_size()) % 16 for st in t.stride()):
            return False
    return True


def _transposed(w: torch.Tensor) -> bool:
    return w.transpose(-2, -1).is_contiguous() and not w.is_contiguous()


def _like(w: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor shaped like w, in w's memory layout: the weights come as transposed
    views of the parameters, and a gradient in the parameter's own layout lands in .grad without
    the slow transposing copy autograd would otherwise make."""
    if _transposed(w):
        return w.new_empty(w.shape[:-2] + w.shape[-2:][::-1]).transpose(-2, -1)
    return w.new_empty(w.shape)


def _gemm(a: torch.Tensor, b: torch.Tensor, ends: list[int]) -> torch.Tensor:
    """a [T, K] in segments ending at `ends` (host ints, relative to a), b [n, K, N] -> [T, N]."""
    if _aligned(a, b):
        return F.grouped_mm(a, b, offs=torch.tensor(ends, dtype=torch.int32, device=a.device))
    return _mm_per_expert(a, b, ends, a.new_empty(a.shape[0], b.shape[-1]))


def _mm_per_expert(a: torch.Tensor, b: torch.Tensor, ends: list[int], out: torch.Tensor) -> torch.Tensor:
    """One mm per expert, each written straight into its rows of `out` (a row-strided view works)."""
    counts = [end - start for start, end in zip([0, *ends[:-1]], ends)]
    for a_e, b_e, out_e in zip(a.split(counts), b.unbind(0), out.split(counts)):
        torch.mm(a_e, b_e, out=out_e)
    return out


def _gemm_wgrad(a: torch.Tensor, g: torch.Tensor, ends: list[int], like: torch.Tensor) -> torch.Tensor:
    """[n, K, N]: a_j^T @ g_j per segment j (zero for an empty one), laid out like `like`."""
    if _aligned(a, g):
        offs = torch.tensor(ends, dtype=torch.int32, device=a.device)
        if _transposed(like):
            return F.grouped_mm(g.t(), a, offs=offs).transpose(-2, -1)
        return F.grouped_mm(a.t(), g, offs=offs)
    out, start = _like(like), 0
    for j, end in enumerate(ends):
        torch.mm(a[start:end].t(), g[start:end], out=out[j])
        start = end
    return out


def _groups(offs: torch.Tensor, ws: list[torch.Tensor], rows: int):
    """(weight, first row, end row, its experts' row ends relative to the first) per group, from
    offs read where it lives; checks that the experts' rows are exactly the `rows` of x."""
    ends = read_on_host(offs)
    if len(ends) != sum(w.shape[0] for w in ws):
        raise ValueError(f"ragged_mm: {len(ends)} offsets for {sum(w.shape[0] for w in ws)} experts")
    if (ends[-1] if ends else 0) != rows:
        raise ValueError(f"ragged_mm: offsets end at {ends[-1] if ends else 0}, x has {rows} rows")
    rows_g, e = _group_rows(ends, [w.shape[0] for w in ws]), 0
    for g, w in enumerate(ws):
        lo, n = rows_g[g], w.shape[0]
        yield w, lo, rows_g[g + 1], [end - lo for end in ends[e : e + n]]
        e += n


@torch.library.custom_op("mohge::ragged_mm", mutates_args=())
def ragged_mm(x: torch.Tensor, ws: list[torch.Tensor], offs: torch.Tensor, out_cols: int) -> torch.Tensor:
    """See the module docstring."""
    if (native := _native(x, offs)) is not None:
        return native.ragged_mm(x, ws, offs, out_cols)
    groups = list(_groups(offs, ws, x.shape[0]))
    if len(groups) == 1 and ws[0].shape[2] == out_cols:  # one group at full width: the GEMM's own output
        w, _, _, ends = groups[0]
        return _gemm(x[:, : w.shape[1]], w, ends)
    # Several groups: each expert's GEMM writes straight into its rows of out (mm's out= takes
    # the row-strided view), cheaper than a grouped_mm per group and a copy of its result.
    out = x.new_empty(x.shape[0], out_cols)
    for w, lo, hi, ends in groups:
        K, N = w.shape[1:]
        _mm_per_expert(x[lo:hi, :K], w, ends, out[lo:hi, :N])
        if N < out_cols:
            out[lo:hi, N:] = 0
    return out


@ragged_mm.register_fake
def _(x, ws, offs, out_cols):
    return x.new_empty(x.shape[0], out_cols)


@torch.library.custom_op("mohge::ragged_mm_wgrad", mutates_args=())
def ragged_mm_wgrad(x: torch.Tensor, grad: torch.Tensor, ws: list[torch.Tensor], offs: torch.Tensor) -> list[torch.Tensor]:
    """Gradients of `ws` for `ragged_mm(x, ws, offs, grad.shape[1])`, each in its weight's layout."""
    if (native := _native(x, grad, offs)) is not None:
        return native.ragged_mm_wgrad(x, grad, ws, offs)
    out = []
    for w, lo, hi, ends in _groups(offs, ws, x.shape[0]):
        K, N = w.shape[1:]
        out.append(_like(w).zero_() if hi == lo else _gemm_wgrad(x[lo:hi, :K], grad[lo:hi, :N], ends, w))
    return out


@ragged_mm_wgrad.register_fake
def _(x, grad, ws, offs):
    return [_like(w) for w in ws]


def _setup(ctx, inputs, output):
    x, ws, offs, out_cols = inputs
    ctx.save_for_backward(x, offs, *ws)


def _backward(ctx, grad):
    x, offs, *ws = ctx.saved_tensors
    grad = grad.contiguous()
    dx = ragged_mm(grad, [w.transpose(-2, -1) for w in ws], offs, x.shape[1])
    return dx, ragged_mm_wgrad(x, grad, ws, offs), None, None


ragged_mm.register_autograd(_backward, setup_context=_setup)


def _check_groups(widths: list[int], experts: list[int]) -> None:
    if not widths or len(widths) != len(experts):
        raise ValueError(f"ragged_swiglu: {len(widths)} widths for {len(experts)} groups")


def _group_rows(ends: list[int], experts: list[int]) -> list[int]:
    """First row of every group and S, from the experts' row ends (host ints) and the groups'
    local expert counts."""
    bounds, e = [0], 0
    for n in experts:
        e += n
        bounds.append(ends[e - 1] if n else bounds[-1])
    return bounds


@torch.library.custom_op("mohge::ragged_swiglu", mutates_args=())
def ragged_swiglu(h: torch.Tensor, offs: torch.Tensor, widths: list[int], experts: list[int]) -> torch.Tensor:
    """silu(gate) * up at each group's width F from h's rows [gate F | up F | ...] -> [S, Fm], zero
    after F. `widths`/`experts`: each group's width and local expert count."""
    if (native := _native(h, offs)) is not None:
        return native.ragged_swiglu(h, offs, widths, experts)
    _check_groups(widths, experts)
    fm = max(widths)
    if all(f == fm for f, n in zip(widths, experts) if n):  # every row at full width
        return F.silu(h[:, :fm]) * h[:, fm : 2 * fm]
    out = h.new_empty(h.shape[0], fm)
    rows = _group_rows(read_on_host(offs), experts)
    for g, f in enumerate(widths):
        lo, hi = rows[g], rows[g + 1]
        a = torch.ops.aten.silu.out(h[lo:hi, :f], out=out[lo:hi, :f])  # in place: no temporaries
        a.mul_(h[lo:hi, f : 2 * f])
        out[lo:hi, f:] = 0
    return out


@ragged_swiglu.register_fake
def _(h, offs, widths, experts):
    return h.new_empty(h.shape[0], max(widths))


@torch.library.custom_op("mohge::ragged_swiglu_backward", mutates_args=())
def ragged_swiglu_backward(grad: torch.Tensor, h: torch.Tensor, offs: torch.Tensor, widths: list[int],
                           experts: list[int]) -> torch.Tensor:
    """[d gate | d up | 0 ...] per row, in h's layout."""
    if (native := _native(grad, h, offs)) is not None:
        return native.ragged_swiglu_backward(grad, h, offs, widths, experts)
    _check_groups(widths, experts)
    out = h.new_empty(h.shape)
    rows = _group_rows(read_on_host(offs), experts)
    for g, f in enumerate(widths):
        lo, hi = rows[g], rows[g + 1]
        dy, gate, up = grad[lo:hi, :f], h[lo:hi, :f], h[lo:hi, f : 2 * f]
        d_gate = torch.mul(dy, up, out=out[lo:hi, :f])  # written in place: no temporaries
        torch.ops.aten.silu_backward.grad_input(d_gate, gate, grad_input=d_gate)
        torch.ops.aten.silu.out(gate, out=out[lo:hi, f : 2 * f]).mul_(dy)
        out[lo:hi, 2 * f :] = 0
    return out


@ragged_swiglu_backward.register_fake
def _(grad, h, offs, widths, experts):
    return h.new_empty(h.shape)


def _swiglu_setup(ctx, inputs, output):
    h, offs, widths, experts = inputs
    ctx.save_for_backward(h, offs)
    ctx.widths, ctx.experts = widths, experts


def _swiglu_backward(ctx, grad):
    h, offs = ctx.saved_tensors
    return ragged_swiglu_backward(grad.contiguous(), h, offs, ctx.widths, ctx.experts), None, None, None


ragged_swiglu.register_autograd(_swiglu_backward, setup_context=_swiglu_setup)


if torch.version.cuda is not None:  # CUDA builds: kernels in Triton (shipped with them), sync-free
    try:
        from mohge.model.moe import ragged_triton  # noqa: E402,F401
    except ImportError as err:  # no triton: the CPU code runs on CUDA too
        if not (err.name or "").startswith("triton"):
            raise
