"""Triton kernels (CUDA) for the ragged expert ops of model/moe/ragged_mm.py: no host sync, one
launch per op call whatever the number of size groups, exact FLOPs.

Shape legend as in ragged_mm.py: S rows (sorted by local expert), L local experts (group-major),
G size groups, n_g a group's local experts, K_g/N_g its weight's contraction/output width, F a
group's ffn width, Fm the widest.

How the launches stay static with data-dependent row counts:
- `ragged_mm`: grid (cdiv(S, BM) + L + 1 row tiles, cdiv(out_cols, BN)). Every
  program loads `offs` (on the device), counts each expert's row tiles, and finds by a cumulative
  sum which expert and rows its tile is; programs past the last tile return. That bound covers any
  split of S rows over L experts (plus the rows past offs[-1], which get zeros; the CPU op
  raises there, a device kernel cannot without a sync). Column tiles past the group's N_g write
  the zero padding instead of a separate memset; their K loop runs 0 times.
- `ragged_mm_wgrad`: grid (L, cdiv(max K, BK), cdiv(max N, BN)): each program reduces one
  [BK, BN] tile of one expert's weight gradient over that expert's rows (none: zeros), and
  stores it with the weight's strides (the gradient comes back in the weight's memory layout,
  as the CPU op's `_like`).
- `ragged_swiglu(_backward)`: elementwise over [S, Fm] (backward: [S, 2 Fm]) tiles, each row's
  width F from its expert; rows are [gate F | up F | 0 ...], so `up` starts at the row's F.
Weights (and the wgrad outputs) of the G groups go in as a tuple of tensors with tuples of their
strides; a program picks its group's pointer with a chain of `tl.where` over the tuple, so no
pointer table is copied to the device. Per-group shapes are host metadata.

fp32 and bf16 (tested; fp16 should work, untested), accumulation in fp32. fp32 products use IEEE fp32
unless torch.backends.cuda.matmul.allow_tf32 is set (then tf32), like torch.mm on CUDA.
Verified only in Triton's interpreter on CPU tensors (tests/test_ragged_triton.py) and by
compiling for sm_90 without running; not yet run or timed on a GPU.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from mohge.model.moe.ragged_mm import _like, ragged_mm, ragged_mm_wgrad, ragged_swiglu, ragged_swiglu_backward

MM_BLOCKS = (64, 64, 32)  # BM rows, BN output columns, BK contraction (tl.dot needs each >= 16)
WGRAD_BLOCKS = (32, 64, 64)  # BM rows reduced per step, BK, BN of the gradient tile
SWIGLU_BLOCKS = (32, 64)  # rows, columns


@triton.jit
def _group_of(e, GROUP_END, G: tl.constexpr):
    """Group of expert `e` (scalar or vector): how many groups end at or before it (G past the end)."""
    g = e * 0
    for i in tl.static_range(G):
        g += (e >= GROUP_END[i]).to(tl.int32)
    return g


@triton.jit
def _pick(g, ptrs, s0s, sks, sns, G: tl.constexpr):
    """Group g's tensor pointer and its (expert, K, N) strides, from the per-group tuples."""
    ptr = ptrs[0]
    s0 = s0s[0]
    sk = sks[0]
    sn = sns[0]
    for i in tl.static_range(1, G):
        ptr = tl.where(g == i, ptrs[i], ptr)
        s0 = tl.where(g == i, s0s[i], s0)
        sk = tl.where(g == i, sks[i], sk)
        sn = tl.where(g == i, sns[i], sn)
    return ptr, s0, sk, sn


@triton.jit
def _mm_kernel(x_ptr, s_xm, s_xk, out_ptr, s_om, s_on, offs_ptr, S, L, ws, ws_s0, ws_sk, ws_sn,
               GROUP_START, GROUP_END, GK, GN, W, G: tl.constexpr, LP: tl.constexpr, BM: tl.constexpr,
               BN: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    pm = tl.program_id(0)
    pn = tl.program_id(1)
    # Row segments: experts 0..L-1, then the rows past offs[-1] as a segment L (written as zeros).
    idx = tl.arange(0, LP)
    ends = tl.load(offs_ptr + idx, mask=idx < L, other=0).to(tl.int32)
    ends = tl.where(idx == L, S, ends)
    starts = tl.load(offs_ptr + idx - 1, mask=(idx > 0) & (idx <= L), other=0).to(tl.int32)
    tiles = tl.where(idx <= L, tl.maximum(ends - starts + BM - 1, 0) // BM, 0)
    cum = tl.cumsum(tiles, 0)
    e = tl.sum((cum <= pm).to(tl.int32), 0)
    if e > L:
        return
    row0 = tl.sum(tl.where(idx == e, starts + (pm - cum + tiles) * BM, 0), 0)
    row_end = tl.minimum(tl.sum(tl.where(idx == e, ends, 0), 0), S)
    g = _group_of(e, GROUP_END, G)
    K = 0
    N = 0
    first = 0  # the group's first expert
    for i in tl.static_range(G):
        K = tl.where(g == i, GK[i], K)
        N = tl.where(g == i, GN[i], N)
        first = tl.where(g == i, GROUP_START[i], first)
    j = (e - first).to(tl.int64)  # the expert's row in its group's weights
    rows = row0 + tl.arange(0, BM)
    rmask = rows < row_end
    rows64 = rows.to(tl.int64)
    cols = pn * BN + tl.arange(0, BN)
    k_end = tl.where(pn * BN < N, K, 0)  # a column tile past N_g only writes zeros
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    w_ptr, s0, sk, sn = _pick(g, ws, ws_s0, ws_sk, ws_sn, G)
    w_ptr += j * s0
    x_rows = x_ptr + rows64[:, None] * s_xm
    for k0 in range(0, k_end, BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks < K
        a = tl.load(x_rows + ks[None, :] * s_xk, mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(w_ptr + ks[:, None].to(tl.int64) * sk + cols[None, :] * sn,
                    mask=kmask[:, None] & (cols < N)[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    out = out_ptr + rows64[:, None] * s_om + cols[None, :] * s_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & (cols < W)[None, :])


@triton.jit
def _wgrad_kernel(x_ptr, s_xm, s_xk, g_ptr, s_gm, s_gn, offs_ptr, outs, outs_s0, outs_sk, outs_sn, GROUP_START,
                  GROUP_END, GK, GN, G: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr,
                  PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    e = tl.program_id(0)
    pk = tl.program_id(1)
    pn = tl.program_id(2)
    row0 = tl.load(offs_ptr + e - 1, mask=e > 0, other=0).to(tl.int32)
    row_end = tl.load(offs_ptr + e).to(tl.int32)
    g = _group_of(e, GROUP_END, G)
    K = 0
    N = 0
    first = 0
    for i in tl.static_range(G):
        K = tl.where(g == i, GK[i], K)
        N = tl.where(g == i, GN[i], N)
        first = tl.where(g == i, GROUP_START[i], first)
    if (pk * BK >= K) | (pn * BN >= N):
        return
    ks = pk * BK + tl.arange(0, BK)
    cols = pn * BN + tl.arange(0, BN)
    kmask = ks < K
    nmask = cols < N
    acc = tl.zeros((BK, BN), dtype=tl.float32)
    for m0 in range(row0, row_end, BM):  # no rows: the tile stays zero
        rows = m0 + tl.arange(0, BM)
        rmask = rows < row_end
        rows64 = rows.to(tl.int64)
        a = tl.load(x_ptr + rows64[None, :] * s_xm + ks[:, None] * s_xk,
                    mask=kmask[:, None] & rmask[None, :], other=0.0)  # x^T tile [BK, BM]
        b = tl.load(g_ptr + rows64[:, None] * s_gm + cols[None, :] * s_gn,
                    mask=rmask[:, None] & nmask[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    o_ptr, s0, sk, sn = _pick(g, outs, outs_s0, outs_sk, outs_sn, G)
    o_ptr += (e - first).to(tl.int64) * s0  # the weight's layout: a transposed view has sk == 1
    tl.store(o_ptr + ks[:, None].to(tl.int64) * sk + cols[None, :].to(tl.int64) * sn, acc.to(o_ptr.dtype.element_ty),
             mask=kmask[:, None] & nmask[None, :])


@triton.jit
def _row_widths(rows, offs_ptr, L, GROUP_END, WIDTHS, G: tl.constexpr, LP: tl.constexpr):
    """Width of each row's group (0 for rows past offs[-1])."""
    idx = tl.arange(0, LP)
    ends = tl.load(offs_ptr + idx, mask=idx < L, other=0).to(tl.int32)
    e = tl.sum(((rows[:, None] >= ends[None, :]) & (idx < L)[None, :]).to(tl.int32), 1)
    g = _group_of(e, GROUP_END, G)
    width = rows * 0
    for i in tl.static_range(G):
        width = tl.where(g == i, WIDTHS[i], width)
    return width


@triton.jit
def _swiglu_kernel(h_ptr, s_hm, s_hn, y_ptr, s_ym, s_yn, offs_ptr, S, L, fm, GROUP_END, WIDTHS,
                   G: tl.constexpr, LP: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    width = _row_widths(rows, offs_ptr, L, GROUP_END, WIDTHS, G, LP)
    rmask = rows < S
    live = rmask[:, None] & (cols[None, :] < width[:, None])
    h = h_ptr + rows.to(tl.int64)[:, None] * s_hm
    gate = tl.load(h + cols[None, :] * s_hn, mask=live, other=0.0).to(tl.float32)
    up = tl.load(h + (width[:, None] + cols[None, :]) * s_hn, mask=live, other=0.0).to(tl.float32)  # [gate F | up F]
    y = gate * tl.sigmoid(gate) * up  # 0 past the row's width: silu(0) * 0
    tl.store(y_ptr + rows.to(tl.int64)[:, None] * s_ym + cols[None, :] * s_yn, y.to(y_ptr.dtype.element_ty),
             mask=rmask[:, None] & (cols < fm)[None, :])


@triton.jit
def _swiglu_bwd_kernel(dy_ptr, s_dm, s_dn, h_ptr, s_hm, s_hn, dh_ptr, s_om, s_on, offs_ptr, S, L, H, GROUP_END,
                       WIDTHS, G: tl.constexpr, LP: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)  # of dh's H (>= 2 Fm) columns
    width = _row_widths(rows, offs_ptr, L, GROUP_END, WIDTHS, G, LP)[:, None]
    rmask = rows < S
    is_gate = cols[None, :] < width
    live = rmask[:, None] & (cols[None, :] < 2 * width)
    c = tl.where(is_gate, cols[None, :], cols[None, :] - width)  # the column within the row's F
    rows64 = rows.to(tl.int64)[:, None]
    h = h_ptr + rows64 * s_hm
    gate = tl.load(h + c * s_hn, mask=live, other=0.0).to(tl.float32)
    up = tl.load(h + (width + c) * s_hn, mask=live, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + rows64 * s_dm + c * s_dn, mask=live, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    dgate = dy * up * sig * (1 + gate * (1 - sig))  # d silu(x) / dx = sig * (1 + x * (1 - sig))
    dup = dy * gate * sig
    dh = tl.where(is_gate, dgate, dup)  # 0 past 2F: every load there was masked to 0
    tl.store(dh_ptr + rows64 * s_om + cols[None, :] * s_on, dh.to(dh_ptr.dtype.element_ty),
             mask=rmask[:, None] & (cols < H)[None, :])


def _group_table(counts: list[int], L: int, what: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """First and one-past-last expert of each group, from the static local expert counts."""
    if sum(counts) != L:
        raise ValueError(f"{what}: the groups hold {sum(counts)} local experts, offs has {L} entries")
    ends = [sum(counts[: g + 1]) for g in range(len(counts))]
    return tuple(e - n for e, n in zip(ends, counts)), tuple(ends)


def _check_dtypes(what: str, *tensors: torch.Tensor) -> None:
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) > 1:
        raise ValueError(f"{what}: the Triton kernel needs one dtype for x, grad and the weights, "
                         f"got {sorted(map(str, dtypes))}")


def _on(t: torch.Tensor):
    """Launch on t's GPU (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _upcast(dtype: torch.dtype) -> bool:
    """Triton's interpreter (TRITON_INTERPRET=1 at import, the CPU tests) keeps bf16 as raw uint16
    bits and multiplies those in tl.dot, so there the tiles go to fp32 first; compiled, bf16 tiles
    feed the tensor cores as they are."""
    return dtype != torch.float32 and type(_mm_kernel).__name__ == "InterpretedFunction"


def _precision(dtype: torch.dtype) -> str:
    """fp32 products as torch.mm does them on CUDA: IEEE unless TF32 matmuls are allowed."""
    return "ieee" if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32"


def _check_widths(what: str, ws: list[torch.Tensor], in_cols: int, out_cols: int) -> None:
    """Static shapes the CPU op would reject by slicing; a kernel would read or write out of bounds."""
    for g, w in enumerate(ws):
        if w.shape[1] > in_cols or w.shape[2] > out_cols:
            raise ValueError(f"{what}: ws[{g}] is {tuple(w.shape)}: needs at most {in_cols} input and "
                             f"{out_cols} output columns")


def ragged_mm_triton(x: torch.Tensor, ws: list[torch.Tensor], offs: torch.Tensor, out_cols: int,
                     blocks: tuple[int, int, int] = MM_BLOCKS, num_warps: int = 4) -> torch.Tensor:
    """`mohge::ragged_mm` in one launch (see the module docstring)."""
    S, X = x.shape
    L = offs.shape[0]
    G = len(ws)
    _check_dtypes("ragged_mm", x, *ws)
    _check_widths("ragged_mm", ws, X, out_cols)
    starts, ends = _group_table([w.shape[0] for w in ws], L, "ragged_mm")
    out = x.new_empty(S, out_cols)
    if S == 0 or out_cols == 0:
        return out
    if G == 0:
        return out.zero_()
    BM, BN, BK = blocks
    grid = (triton.cdiv(S, BM) + L + 1, triton.cdiv(out_cols, BN))
    strides = [tuple(w.stride(d) for w in ws) for d in range(3)]
    shapes = [tuple(w.shape[d] for w in ws) for d in (1, 2)]
    with _on(x):
        _mm_kernel[grid](
            x, x.stride(0), x.stride(1), out, out.stride(0), out.stride(1), offs, S, L, tuple(ws), *strides,
            starts, ends, *shapes, out_cols, G=G, LP=triton.next_power_of_2(L + 1), BM=BM, BN=BN, BK=BK,
            PRECISION=_precision(x.dtype), UPCAST=_upcast(x.dtype), num_warps=num_warps)
    return out


def ragged_mm_wgrad_triton(x: torch.Tensor, grad: torch.Tensor, ws: list[torch.Tensor], offs: torch.Tensor,
                           blocks: tuple[int, int, int] = WGRAD_BLOCKS, num_warps: int = 4) -> list[torch.Tensor]:
    """`mohge::ragged_mm_wgrad` in one launch: one program per (expert, K tile, N tile); each
    gradient in its weight's memory layout (`_like`)."""
    L = offs.shape[0]
    G = len(ws)
    _check_dtypes("ragged_mm_wgrad", x, grad, *ws)
    _check_widths("ragged_mm_wgrad", ws, x.shape[1], grad.shape[1])
    starts, ends = _group_table([w.shape[0] for w in ws], L, "ragged_mm_wgrad")
    outs = [_like(w) for w in ws]
    k_max = max((w.shape[1] for w in ws), default=0)
    n_max = max((w.shape[2] for w in ws), default=0)
    if L == 0 or k_max == 0 or n_max == 0:
        return outs
    BM, BK, BN = blocks
    grid = (L, triton.cdiv(k_max, BK), triton.cdiv(n_max, BN))
    shapes = [tuple(w.shape[d] for w in ws) for d in (1, 2)]
    with _on(x):
        _wgrad_kernel[grid](
            x, x.stride(0), x.stride(1), grad, grad.stride(0), grad.stride(1), offs, tuple(outs),
            *[tuple(o.stride(d) for o in outs) for d in range(3)], starts, ends, *shapes, G=G, BM=BM, BK=BK,
            BN=BN, PRECISION=_precision(x.dtype), UPCAST=_upcast(x.dtype), num_warps=num_warps)
    return outs


def _swiglu_args(h: torch.Tensor, offs: torch.Tensor, widths: list[int], experts: list[int], what: str):
    if len(widths) != len(experts):
        raise ValueError(f"{what}: {len(widths)} widths for {len(experts)} groups")
    L = offs.shape[0]
    _, ends = _group_table(list(experts), L, what)
    fm = max(widths, default=0)
    if 2 * fm > h.shape[1]:
        raise ValueError(f"{what}: width {fm} needs 2 * {fm} columns of h, it has {h.shape[1]}")
    return L, ends, fm


def ragged_swiglu_triton(h: torch.Tensor, offs: torch.Tensor, widths: list[int], experts: list[int],
                         blocks: tuple[int, int] = SWIGLU_BLOCKS) -> torch.Tensor:
    """`mohge::ragged_swiglu` in one launch: [S, Fm], zero past each row's width."""
    L, ends, fm = _swiglu_args(h, offs, widths, experts, "ragged_swiglu")
    S = h.shape[0]
    y = h.new_empty(S, fm)
    if S == 0 or fm == 0:
        return y
    if not widths:
        return y.zero_()
    BR, BC = blocks
    with _on(h):
        _swiglu_kernel[(triton.cdiv(S, BR), triton.cdiv(fm, BC))](
            h, h.stride(0), h.stride(1), y, y.stride(0), y.stride(1), offs, S, L, fm, ends, tuple(widths),
            G=len(widths), LP=triton.next_power_of_2(L + 1), BR=BR, BC=BC)
    return y


def ragged_swiglu_backward_triton(grad: torch.Tensor, h: torch.Tensor, offs: torch.Tensor, widths: list[int],
                                  experts: list[int], blocks: tuple[int, int] = SWIGLU_BLOCKS) -> torch.Tensor:
    """`mohge::ragged_swiglu_backward` in one launch: h's shape, rows [d gate F | d up F | 0 ...]."""
    L, ends, _ = _swiglu_args(h, offs, widths, experts, "ragged_swiglu_backward")
    S, H = h.shape
    dh = h.new_empty(h.shape)
    if S == 0 or H == 0:
        return dh
    if not widths:
        return dh.zero_()
    BR, BC = blocks
    with _on(h):
        _swiglu_bwd_kernel[(triton.cdiv(S, BR), triton.cdiv(H, BC))](
            grad, grad.stride(0), grad.stride(1), h, h.stride(0), h.stride(1), dh, dh.stride(0), dh.stride(1),
            offs, S, L, H, ends, tuple(widths), G=len(widths), LP=triton.next_power_of_2(L + 1), BR=BR, BC=BC)
    return dh


@ragged_mm.register_kernel("cuda")
def _ragged_mm_cuda(x, ws, offs, out_cols):
    return ragged_mm_triton(x, ws, offs, out_cols)


@ragged_mm_wgrad.register_kernel("cuda")
def _ragged_mm_wgrad_cuda(x, grad, ws, offs):
    return ragged_mm_wgrad_triton(x, grad, ws, offs)


@ragged_swiglu.register_kernel("cuda")
def _ragged_swiglu_cuda(h, offs, widths, experts):
    return ragged_swiglu_triton(h, offs, widths, experts)


@ragged_swiglu_backward.register_kernel("cuda")
def _ragged_swiglu_backward_cuda(grad, h, offs, widths, experts):
    return ragged_swiglu_backward_triton(grad, h, offs, widths, experts)
