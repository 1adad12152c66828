"""Routed experts: stored unpadded per size group; one interface, three ways to compute them.

Shape legend: S rows after dispatch (sorted by local expert), D model dim, L local experts (all
groups, group-major, ascending global id), n a group's local experts, F a group's ffn width, Fm
the widest group's width (of the whole model, not only of the experts held here).

Storage (the only expert parameters of a layer; exact sizes, no padding):
    groups.<g>.w1 [n, F, D]  gate     groups.<g>.w3 [n, F, D]  up     groups.<g>.w2 [n, D, F]  down
These are the per-group tensors under whose names initial values are drawn, and each row is one
checkpoint entry (`...experts.groups.<g>.w1/expert/<r>`, r the expert's row in the whole group),
so checkpoints of every earlier layout (per-group, fused padded stacks) load unchanged and
`mohge-convert` is untouched. Under expert parallel a group keeps the rows (`expert_rows`) of the
experts placed on the rank; a group with no local expert keeps zero-row tensors. Data parallel
shards every expert tensor along D (parallel/data_parallel.py expert_shard_dim).

Compute paths (`model.moe.expert_compute`; docs/performance.md has the measurements):
- `loop` (LoopExperts): the reference, one matmul chain per expert; one host sync per layer.
- `grouped` (GroupedExperts): builds, in forward, the zero-padded stacks w13 [L, 2*Fm, D] (gate
  rows [0, F), up rows [Fm, Fm + F)) and w2 [L, D, Fm] from the per-group tensors (a transient,
  like FSDP's gathered weights; autograd slices the gradients back), then one grouped GEMM per
  projection for every width. SwiGLU with zero gate/up rows gives exactly zero on the padding, so
  it computes the unpadded experts exactly. Static shapes, offsets on the device: no host sync at
  ep=1; compute is padded (Fm / mean width).
- `ragged` (RaggedExperts): exact FLOPs, one op per projection for every width
  (`mohge::ragged_mm`, model/moe/ragged_mm.py): gate and up of all local experts in one GEMM op
  into a hidden [S, 2 Fm] whose rows are [gate F | up F | 0 ...], SwiGLU at each group's width
  (`mohge::ragged_swiglu`), down in one op reading each row's first F columns. Offsets stay on the
  device; the CPU kernels (C++, model/moe/ragged_cpu.cpp) read them where they live (no device to
  wait for: 0 host syncs at ep=1); on CUDA Triton kernels run the ops sync-free
  (model/moe/ragged_triton.py, not yet run on a GPU), so `auto` keeps `grouped` on CUDA until
  they are measured.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mohge.model.config import ExpertGroupConfig
from mohge.model.moe.ragged_mm import ragged_mm, ragged_swiglu


@torch.library.custom_op("mohge::grouped_mm", mutates_args=())
def _grouped_mm_op(x: torch.Tensor, w_t: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return F.grouped_mm(x, w_t, offs=offs)


@_grouped_mm_op.register_fake
def _(x, w_t, offs):
    return x.new_empty(x.shape[0], w_t.shape[-1])


@torch.library.custom_op("mohge::grouped_mm_weight_grad", mutates_args=())
def _grouped_mm_weight_grad(x: torch.Tensor, grad: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return F.grouped_mm(x.t(), grad, offs=offs)  # ragged contraction: [L, K, M]


@_grouped_mm_weight_grad.register_fake
def _(x, grad, offs):
    return x.new_empty(offs.shape[0], x.shape[1], grad.shape[1])


def _setup(ctx, inputs, output):
    x, w_t, offs = inputs
    ctx.save_for_backward(x, w_t, offs)


def _backward(ctx, grad):
    x, w_t, offs = ctx.saved_tensors
    grad = grad.contiguous()
    return _grouped_mm_op(grad, w_t.transpose(-2, -1), offs), _grouped_mm_weight_grad(x, grad, offs), None


_grouped_mm_op.register_autograd(_backward, setup_context=_setup)


def grouped_mm(x: torch.Tensor, w_t: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x [S, K] in segments ending at offs, w_t [L, K, M]: segment l times w_t[l] -> [S, M].

    On CUDA torch's own op. Elsewhere the same op behind a custom op: torch.compile's shape
    function for grouped_mm accepts only bf16, while the CPU kernel (and this op) takes any dtype.
    """
    if x.is_cuda:
        return F.grouped_mm(x, w_t, offs=offs)
    return _grouped_mm_op(x, w_t, offs)


class ExpertGroup(nn.Module):
    """One size group's local experts, unpadded: w1, w3 [n, F, D] and w2 [n, D, F].

    `expert_rows` (set by expert parallel) are the rows of the whole group's [N, ...] tensors held
    here, `full_num_experts` is N: model/init.py draws initial values and train/checkpoint.py
    names entries from them (None: all N rows)."""

    def __init__(self, num_experts: int, width: int, d_model: int):
        super().__init__()
        self.width = width
        self.w1 = nn.Parameter(torch.empty(num_experts, width, d_model))
        self.w3 = nn.Parameter(torch.empty(num_experts, width, d_model))
        self.w2 = nn.Parameter(torch.empty(num_experts, d_model, width))
        self.expert_rows: list[int] | None = None
        self.full_num_experts = num_experts

    @property
    def num_local(self) -> int:
        return self.w1.shape[0]

    def checkpoint_entries(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """One entry per expert, `<name>/expert/<row in the whole group>`, a view of its row of
        `tensor` (a parameter or an optimizer state shaped like it), so loading writes through."""
        rows = self.expert_rows if self.expert_rows is not None else range(tensor.shape[0])
        return {f"{name}/expert/{r}": tensor[i] for i, r in enumerate(rows)}

    def keep_rows(self, rows: list[int]) -> None:
        """Keeps only these rows of the group (expert parallel, on meta)."""
        self.expert_rows = list(rows)
        for name in ("w1", "w3", "w2"):
            full = getattr(self, name)
            setattr(self, name, nn.Parameter(full.new_empty((len(rows), *full.shape[1:]))))


class RoutedExperts(nn.Module):
    """All routed experts of a layer held by this process (see the module docstring)."""

    def __init__(self, d_model: int, groups: list[ExpertGroupConfig]):
        super().__init__()
        self.d_model = d_model
        self.widths = [g.ffn_hidden_size for g in groups]
        self.max_width = max(self.widths)
        self.full_group_sizes = [g.num_experts for g in groups]
        self.groups = nn.ModuleList(ExpertGroup(g.num_experts, g.ffn_hidden_size, d_model) for g in groups)
        # (group, row within the whole group) of every local expert, in the order tokens arrive.
        self.expert_ids = [(g, r) for g, n in enumerate(self.full_group_sizes) for r in range(n)]

    @property
    def num_experts(self) -> int:
        return len(self.expert_ids)

    def local_counts(self) -> list[int]:
        """Local experts per group."""
        return [grp.num_local for grp in self.groups]

    def expert_width(self, i: int) -> int:
        return self.widths[self.expert_ids[i][0]]

    def expert_weights(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(w1 [F, D], w3 [F, D], w2 [D, F]) of local expert i: views of its group's tensors."""
        grp, j = self.groups[self.expert_ids[i][0]], self.local_row(i)
        return grp.w1[j], grp.w3[j], grp.w2[j]

    def local_row(self, i: int) -> int:
        """Row of local expert i in its group's local tensors."""
        g, r = self.expert_ids[i]
        rows = self.groups[g].expert_rows
        return r if rows is None else rows.index(r)

    def keep_local(self, global_ids: list[int]) -> None:
        """Keeps only these experts (global ids, ascending, group-major): expert parallel, on meta."""
        all_ids = [(g, r) for g, n in enumerate(self.full_group_sizes) for r in range(n)]
        self.expert_ids = [all_ids[e] for e in global_ids]
        for g, grp in enumerate(self.groups):
            grp.keep_rows([r for gi, r in self.expert_ids if gi == g])

    def padded_stacks(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The transient zero-padded stacks w13 [L, 2*Fm, D] and w2 [L, D, Fm] of the local experts
        (cast to `dtype` first, so the copy is in the compute dtype)."""
        fm, w13s, w2s = self.max_width, [], []
        for grp in self.groups:  # zero-row groups too: their (empty) gradients stay defined
            pad = fm - grp.width
            w1, w3, w2 = grp.w1.to(dtype), grp.w3.to(dtype), grp.w2.to(dtype)
            if pad:
                w1, w3, w2 = F.pad(w1, (0, 0, 0, pad)), F.pad(w3, (0, 0, 0, pad)), F.pad(w2, (0, pad))
            w13s.append(torch.cat([w1, w3], dim=1))
            w2s.append(w2)
        return torch.cat(w13s), torch.cat(w2s)

    def forward(self, x_SD: torch.Tensor, tokens_per_expert_L: torch.Tensor) -> torch.Tensor:
        """x_SD holds tokens_per_expert_L[l] rows for local expert l, in expert order."""
        raise NotImplementedError


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """grouped_mm is not covered by autocast: the autocast dtype (bf16) by hand, else x's dtype."""
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype


class LoopExperts(RoutedExperts):
    """Reference: one matmul chain per expert on its unpadded weights (one host sync per layer)."""

    def forward(self, x_SD: torch.Tensor, tokens_per_expert_L: torch.Tensor) -> torch.Tensor:
        counts = tokens_per_expert_L.tolist()
        # One unbind per tensor (its backward stacks the rows' gradients once; indexing per expert
        # would build a whole-tensor gradient per expert).
        rows = [list(zip(grp.w1.unbind(0), grp.w3.unbind(0), grp.w2.unbind(0))) for grp in self.groups]
        outs, start = [], 0
        for i, n in enumerate(counts):
            w1, w3, w2 = rows[self.expert_ids[i][0]][self.local_row(i)]
            x = x_SD[start : start + n]
            outs.append((F.silu(x @ w1.t()) * (x @ w3.t())) @ w2.t())
            start += n
        # Still touch the weights so every parameter is part of the graph.
        touch = sum(p.sum() for p in self.parameters())
        return torch.cat(outs, dim=0) + 0.0 * touch


class GroupedExperts(RoutedExperts):
    """The whole layer as one grouped GEMM per projection on the transient padded stacks:
    x @ w13 -> silu(gate) * up -> @ w2.

    `gemm(x, w_t, offs)` is the kernel (`grouped_mm`; FP8 training swaps in a float8 one from
    outside, see mohge.train.fp8) and `align` the row count each expert's segment must be a
    multiple of for it (float8 kernels: 16); segments are then zero-padded to it, which needs the
    counts on the host (one sync, FP8 path only).
    """

    def __init__(self, d_model: int, groups: list[ExpertGroupConfig]):
        super().__init__(d_model, groups)
        self.gemm = grouped_mm
        self.align = 1

    def forward(self, x_SD: torch.Tensor, tokens_per_expert_L: torch.Tensor) -> torch.Tensor:
        if self.num_experts == 0:
            return x_SD * 0.0
        dtype = _compute_dtype(x_SD)
        x_SD = x_SD.to(dtype)
        rows = None
        if self.align > 1:
            x_SD, tokens_per_expert_L, rows = pad_segments(x_SD, tokens_per_expert_L.tolist(), self.align)
        offs = tokens_per_expert_L.cumsum(0).to(torch.int32)  # on the device: no sync
        w13, w2 = self.padded_stacks(dtype)
        h = self.gemm(x_SD, w13.transpose(-2, -1), offs)
        gate, up = h.chunk(2, dim=-1)
        out = self.gemm(F.silu(gate) * up, w2.transpose(-2, -1), offs)
        return out if rows is None else out[rows]


class RaggedExperts(RoutedExperts):
    """Exact FLOPs in one op per projection for every width (model/moe/ragged_mm.py):
    x @ [w1 | w3] -> silu(gate) * up at each group's width -> @ w2. Offsets on the device: no host
    sync at ep=1 on the CPU (the op's kernel reads them where they live)."""

    def forward(self, x_SD: torch.Tensor, tokens_per_expert_L: torch.Tensor) -> torch.Tensor:
        if self.num_experts == 0:
            return x_SD * 0.0
        dtype = _compute_dtype(x_SD)
        x_SD = x_SD.to(dtype)
        offs = tokens_per_expert_L.cumsum(0).to(torch.int32)
        # [gate | up] per group: a transient copy (like the grouped path's stacks), one GEMM per expert
        gate_up = [torch.cat([grp.w1.to(dtype), grp.w3.to(dtype)], dim=1).transpose(-2, -1) for grp in self.groups]
        h = ragged_mm(x_SD, gate_up, offs, 2 * self.max_width)  # rows [gate F | up F | 0 ...]
        a = ragged_swiglu(h, offs, self.widths, self.local_counts())  # [S, Fm]
        down = [grp.w2.to(dtype).transpose(-2, -1) for grp in self.groups]
        return ragged_mm(a, down, offs, self.d_model)


def pad_segments(x_SD: torch.Tensor, counts: list[int], align: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Zero-pads each expert's segment of x_SD to a multiple of `align` rows.

    Returns the padded tensor, the padded counts (a device tensor), and the row of each original
    token in it (so `padded[rows]` is x_SD again).
    """
    padded = [-(-n // align) * align for n in counts]
    starts = torch.tensor([0, *padded[:-1]]).cumsum(0)
    rows = torch.cat([torch.arange(n) + start for n, start in zip(counts, starts.tolist())])
    rows = rows.to(x_SD.device, non_blocking=True)
    out = x_SD.new_zeros(sum(padded), x_SD.shape[-1]).index_copy(0, rows, x_SD)
    return out, torch.tensor(padded, device=x_SD.device), rows


def resolve_auto(device_type: str, widths: list[int] | None = None, d_model: int = 0) -> str:
    """`expert_compute=auto`: `ragged` on the CPU, eager or compiled (exact FLOPs, sync-free there,
    one op per projection: the fastest CPU path in bench_moe.py, docs/performance.md); `grouped`
    elsewhere (sync-free on any device, 2 grouped GEMMs per layer, padded FLOPs) when grouped_mm's
    16-byte rows allow it (every width and d_model multiples of 8), else `ragged` (any width)."""
    if device_type == "cpu":
        return "ragged"
    aligned = widths is None or (all(w % 8 == 0 for w in widths) and d_model % 8 == 0)
    return "grouped" if aligned else "ragged"


EXPERT_CLASSES = {"loop": LoopExperts, "grouped": GroupedExperts, "ragged": RaggedExperts}


def build_experts(d_model: int, groups: list[ExpertGroupConfig], compute: str = "loop") -> RoutedExperts:
    return EXPERT_CLASSES[compute](d_model, groups)
