"""`mohge::ragged_mm`: one grouped GEMM over the local experts of a layer, every width at once.

Shape legend: S rows (sorted by local expert), L local experts (group-major), G size groups, P
parts per group, n a group's local experts, K/N a part's contraction/output width in its group.

    out = ragged_mm(x [S, X], ws, offs [L], out_cols, parts, split_input)  ->  [S, out_cols]

`ws` holds G * P weight tensors, group-major (`ws[g * P + p]`, [n_g, K_g, N_g]: part p of group g's
n_g experts, already transposed to contraction-major), `offs` the cumulative row ends of the L
experts (on the device; the rows of expert l are offs[l-1]:offs[l]).

- `split_input=False` (P output parts): the row of an expert of group g gets, for every part p,
  `x[:, :K_g] @ ws[g*P+p][j]` in the columns `p * out_cols/P + [0, N_g)`. With P=2 and (gate, up)
  as the parts this is the fused gate/up projection into one padded [S, 2 Fm] hidden, gate in
  [0, Fm), up in [Fm, 2 Fm), whatever the group's width F.
- `split_input=True` (P input parts): `sum_p x[:, p * X/P + [0, K_g)] @ ws[g*P+p][j]` in columns
  `[0, N_g)`: the same layout read back (the gradient of the gate/up projection).

Columns a row does not write are zero, so a narrow group's hidden is zero-padded and SwiGLU keeps
it zero (silu(0) * 0 = 0); the down projection reads only each row's first F_g columns. FLOPs are
exact: no expert multiplies padding.

One op per projection whatever the number of groups; autograd (dx: this op with the parts on the
other side; dW: `ragged_mm_wgrad`) and a shape function (torch.compile, fullgraph) are registered.
Kernels: CPU (any dtype) loops over the experts inside the op reading `offs` where they live, as
torch's own CPU grouped_mm does; there is no device to wait for. Other devices run the same loop,
which reads `offs` to the host: a host sync (counted by mohge.parallel.host_syncs), so `auto`
does not choose this op on CUDA (see experts.resolve_auto).
"""

from __future__ import annotations

import torch

from mohge.parallel.host_syncs import read_on_host


def _part_cols(total: int, parts: int) -> int:
    if total % parts:
        raise ValueError(f"ragged_mm: {total} columns do not split into {parts} parts")
    return total // parts


def _ragged_loop(x: torch.Tensor, ws: list[torch.Tensor], offs: torch.Tensor, out_cols: int, parts: int,
                 split_input: bool) -> torch.Tensor:
    ends = read_on_host(offs)
    S = x.shape[0]
    stride_in = _part_cols(x.shape[1], parts) if split_input else 0
    stride_out = 0 if split_input else _part_cols(out_cols, parts)
    full = all(w.shape[2] * (1 if split_input else parts) == out_cols for w in ws)
    out = x.new_empty(S, out_cols) if full else x.new_zeros(S, out_cols)
    start, e = 0, 0
    for g in range(len(ws) // parts):
        group = ws[g * parts : (g + 1) * parts]
        K, N = group[0].shape[1:]
        for j in range(group[0].shape[0]):
            end = ends[e]
            e += 1
            if end == start:
                continue
            rows = x[start:end]
            if split_input:
                dst = out[start:end, :N]
                torch.mm(rows[:, :K], group[0][j], out=dst)
                for p in range(1, parts):
                    dst.addmm_(rows[:, p * stride_in : p * stride_in + K], group[p][j])
            else:
                for p in range(parts):
                    torch.mm(rows[:, :K], group[p][j], out=out[start:end, p * stride_out : p * stride_out + N])
            start = end
    if start != S:
        raise ValueError(f"ragged_mm: offsets end at {start}, x has {S} rows")
    return out


@torch.library.custom_op("mohge::ragged_mm", mutates_args=())
def ragged_mm(x: torch.Tensor, ws: list[torch.Tensor], offs: torch.Tensor, out_cols: int, parts: int,
              split_input: bool) -> torch.Tensor:
    """See the module docstring."""
    return _ragged_loop(x, ws, offs, out_cols, parts, split_input)


@ragged_mm.register_fake
def _(x, ws, offs, out_cols, parts, split_input):
    return x.new_empty(x.shape[0], out_cols)


@torch.library.custom_op("mohge::ragged_mm_wgrad", mutates_args=())
def ragged_mm_wgrad(x: torch.Tensor, grad: torch.Tensor, ws: list[torch.Tensor], offs: torch.Tensor, parts: int,
                    split_input: bool) -> list[torch.Tensor]:
    """Gradients of `ws` for `ragged_mm(x, ws, offs, grad.shape[1], parts, split_input)`."""
    ends = read_on_host(offs)
    stride_in = _part_cols(x.shape[1], parts) if split_input else 0
    stride_out = 0 if split_input else _part_cols(grad.shape[1], parts)
    out = [w.new_empty(w.shape) for w in ws]
    start, e = 0, 0
    for g in range(len(ws) // parts):
        K, N = ws[g * parts].shape[1:]
        for j in range(ws[g * parts].shape[0]):
            end = ends[e]
            e += 1
            if end == start:  # an expert without rows: zero gradient
                for p in range(parts):
                    out[g * parts + p][j].zero_()
                continue
            for p in range(parts):
                xin = x[start:end, p * stride_in : p * stride_in + K]
                gout = grad[start:end, p * stride_out : p * stride_out + N]
                torch.mm(xin.t(), gout, out=out[g * parts + p][j])
            start = end
    return out


@ragged_mm_wgrad.register_fake
def _(x, grad, ws, offs, parts, split_input):
    return [w.new_empty(w.shape) for w in ws]


def _setup(ctx, inputs, output):
    x, ws, offs, out_cols, parts, split_input = inputs
    ctx.save_for_backward(x, offs, *ws)
    ctx.parts, ctx.split_input = parts, split_input


def _backward(ctx, grad):
    x, offs, *ws = ctx.saved_tensors
    grad = grad.contiguous()
    dx = ragged_mm(grad, [w.transpose(-2, -1) for w in ws], offs, x.shape[1], ctx.parts, not ctx.split_input)
    dws = ragged_mm_wgrad(x, grad, ws, offs, ctx.parts, ctx.split_input)
    return dx, dws, None, None, None, None


ragged_mm.register_autograd(_backward, setup_context=_setup)


def _group_bounds(offs: torch.Tensor, experts: list[int]) -> list[int]:
    """First row of every group and S, read where offs lives (see read_on_host)."""
    ends = read_on_host(offs)
    bounds, e = [0], 0
    for n in experts:
        e += n
        bounds.append(ends[e - 1] if e else 0)
    return bounds


@torch.library.custom_op("mohge::ragged_swiglu", mutates_args=())
def ragged_swiglu(h: torch.Tensor, offs: torch.Tensor, widths: list[int], experts: list[int]) -> torch.Tensor:
    """silu(gate) * up at each group's exact width, h [S, 2 Fm] as `ragged_mm` with 2 output parts
    writes it (gate [0, F), up [Fm, Fm + F)) -> [S, Fm], zero beyond F. `widths`/`experts`: each
    group's width and local expert count."""
    fm = h.shape[1] // 2
    out = h.new_zeros(h.shape[0], fm)
    bounds = _group_bounds(offs, experts)
    for g, f in enumerate(widths):
        rows = h[bounds[g] : bounds[g + 1]]
        torch.mul(torch.nn.functional.silu(rows[:, :f]), rows[:, fm : fm + f], out=out[bounds[g] : bounds[g + 1], :f])
    return out


@ragged_swiglu.register_fake
def _(h, offs, widths, experts):
    return h.new_empty(h.shape[0], h.shape[1] // 2)


@torch.library.custom_op("mohge::ragged_swiglu_backward", mutates_args=())
def ragged_swiglu_backward(grad: torch.Tensor, h: torch.Tensor, offs: torch.Tensor, widths: list[int],
                           experts: list[int]) -> torch.Tensor:
    fm = h.shape[1] // 2
    out = h.new_zeros(h.shape)
    bounds = _group_bounds(offs, experts)
    for g, f in enumerate(widths):
        lo, hi = bounds[g], bounds[g + 1]
        gate, up, dy = h[lo:hi, :f], h[lo:hi, fm : fm + f], grad[lo:hi, :f]
        sig = torch.sigmoid(gate)
        silu = gate * sig
        torch.mul(dy, silu, out=out[lo:hi, fm : fm + f])
        # d silu(x) / dx = sig * (1 + x * (1 - sig))
        torch.mul(dy * up, sig * (1 + gate * (1 - sig)), out=out[lo:hi, :f])
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
