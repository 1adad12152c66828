"""Routed experts: every local expert of a layer, of every width, in one zero-padded stack.

Shape legend: S rows after dispatch (sorted by local expert), D model dim, L local experts (all
groups, group-major, ascending global id), Fm the widest group's ffn width (of the whole model,
not only of the experts held here), F an expert's own width.

Weight layout (the only two expert tensors of a layer):
    w13 [L, 2*Fm, D]  gate and up fused: rows [0, F) are expert l's w1 (gate), rows
                      [Fm, Fm + F) its w3 (up); every other row is zero.
    w2  [L, D, Fm]    down: columns [0, F) are expert l's w2; every other column is zero.
Dim 0 (one expert per row) is the dim to shard (expert parallel keeps a subset of rows, FSDP may
split dim 0); never split dims 1/2, which mix real and padding entries.

Why padding: SwiGLU with zero gate/up rows gives h = silu(0) * 0 = 0 on the padding, so padded
experts compute exactly the unpadded ones, and the padding's gradients are exactly zero (AdamW
and weight decay keep zeros zero), so the padding stays zero through training. The stack is one
uniform 3-D tensor, so the whole layer is one grouped GEMM per projection (w13, then w2) whatever
the number of groups, shapes are static, and offsets stay on the device: no host sync. The price
is compute and memory on the padding (Fm / mean width, 1.54x for widths 384..1280). Measured
alternatives (docs/performance.md): per-group grouped GEMMs (G launches, exact) and sub-experts of
width gcd(widths) with rows replicated per sub-expert (exact FLOPs, 3-4x slower on CPU).

Checkpoints keep one entry per expert under the old names (`...experts.groups.<g>.w1/expert/<r>`,
shape [F, D]; w3 alike; w2 [D, F]): `checkpoint_entries` maps them onto views of the stack, and
initial values are drawn under those same names, so checkpoints and runs from before this layout
load and start identically.

`LoopExperts` is the readable reference (one matmul chain per expert on the unpadded views);
`GroupedExperts` is the fast path. Both hold the same parameters.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mohge.model.config import ExpertGroupConfig


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


class RoutedExperts(nn.Module):
    """All routed experts of a layer held by this process (see the module docstring)."""

    def __init__(self, d_model: int, groups: list[ExpertGroupConfig]):
        super().__init__()
        self.d_model = d_model
        self.widths = [g.ffn_hidden_size for g in groups]
        self.max_width = max(self.widths)
        # (group, row within the group) of every local expert, and its global id.
        self.expert_ids = [(g, r) for g, grp in enumerate(groups) for r in range(grp.num_experts)]
        self.full_group_sizes = [g.num_experts for g in groups]
        num = len(self.expert_ids)
        self.w13 = nn.Parameter(torch.empty(num, 2 * self.max_width, d_model))
        self.w2 = nn.Parameter(torch.empty(num, d_model, self.max_width))
        self.expert_rows: list[int] | None = None  # set by expert parallel: global ids held here
        self.full_num_experts = num

    @property
    def num_experts(self) -> int:
        return self.w13.shape[0]

    def local_counts(self) -> list[int]:
        """Local experts per group."""
        return [sum(1 for g, _ in self.expert_ids if g == gi) for gi in range(len(self.widths))]

    def expert_width(self, i: int) -> int:
        return self.widths[self.expert_ids[i][0]]

    def expert_views(self, w13: torch.Tensor, w2: torch.Tensor, i: int):
        """(w1 [F, D], w3 [F, D], w2 [D, F]) of local expert i: views of the stacks (no padding)."""
        f, fm = self.expert_width(i), self.max_width
        return w13[i, :f], w13[i, fm : fm + f], w2[i, :, :f]

    # ---- layout hooks: expert parallel, initialisation, checkpoints ------------------------
    def keep_local(self, global_ids: list[int]) -> None:
        """Keeps only these experts (global ids, ascending): expert parallel, on meta."""
        all_ids = [(g, r) for g, n in enumerate(self.full_group_sizes) for r in range(n)]
        self.expert_ids = [all_ids[e] for e in global_ids]
        self.expert_rows = list(global_ids)
        self.full_num_experts = len(all_ids)
        for name in ("w13", "w2"):
            full = getattr(self, name)
            setattr(self, name, nn.Parameter(full.new_empty((len(global_ids), *full.shape[1:]))))

    def init_experts(self, name: str, param: torch.Tensor, fill: Callable) -> int:
        """Fills this process's part of stack `name` (w13 or w2; a plain tensor or an FSDP shard)
        expert by expert: each real block is drawn as rows of the per-group tensor it would be in
        the per-group layout (`fill(name, whole_shape, out, vectors)`, mohge.model.init), so every
        layout starts from the same values; padding is zero. Returns the elements generated."""
        from mohge.model.init import global_index_vectors

        prefix, p_name = name.rsplit(".", 1)
        local = param.to_local() if hasattr(param, "device_mesh") else param
        local.zero_()
        if local.numel() == 0:
            return 0
        rows_L, mid, last = global_index_vectors(param, None)  # local expert, dim 1, dim 2 indices
        fm, generated = self.max_width, 0
        for pos, i in enumerate(rows_L.tolist()):
            g, r = self.expert_ids[i]
            n, f = self.full_group_sizes[g], self.widths[g]
            if p_name == "w13":  # [2Fm, D]: w1 rows 0..f, w3 rows fm..fm+f
                parts = [("w1", mid, 0, (n, f, self.d_model)), ("w3", mid, fm, (n, f, self.d_model))]
            else:  # [D, Fm]: w2 columns 0..f
                parts = [("w2", last, 0, (n, self.d_model, f))]
            for part, along, start, whole in parts:
                sel = ((along >= start) & (along < start + f)).nonzero().squeeze(1)
                if not sel.numel():
                    continue
                index = along[sel] - start
                if p_name == "w13":
                    vectors, out = [torch.tensor([r]), index, last], local.new_empty(1, sel.numel(), last.numel())
                    generated += fill(f"{prefix}.groups.{g}.{part}", whole, out, vectors)
                    local[pos].index_copy_(0, sel.to(local.device), out[0])
                else:
                    vectors, out = [torch.tensor([r]), mid, index], local.new_empty(1, mid.numel(), sel.numel())
                    generated += fill(f"{prefix}.groups.{g}.{part}", whole, out, vectors)
                    local[pos].index_copy_(1, sel.to(local.device), out[0])
        return generated

    @torch.no_grad()
    def zero_padding_(self) -> None:
        """Zeroes the padding of both stacks (after filling them by hand, e.g. in tests)."""
        for i in range(self.num_experts):
            f, fm = self.expert_width(i), self.max_width
            self.w13[i, f:fm].zero_()
            self.w13[i, fm + f :].zero_()
            self.w2[i, :, f:].zero_()

    def full_numel(self, param: torch.Tensor) -> int:
        """Real (unpadded) parameters of the whole model's stack `param` (w13 or w2)."""
        per_row = 2 if param.shape[1] == 2 * self.max_width else 1
        return per_row * self.d_model * sum(n * f for n, f in zip(self.full_group_sizes, self.widths))

    def checkpoint_entries(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """One entry per expert under the per-group names, as views of `tensor` (w13, w2 or an
        optimizer state shaped like them), so loading writes through."""
        prefix, p_name = name.rsplit(".", 1)
        entries = {}
        for i, (g, r) in enumerate(self.expert_ids):
            w1, w3, w2 = self.expert_views(tensor, tensor, i)
            if p_name == "w13":
                entries[f"{prefix}.groups.{g}.w1/expert/{r}"] = w1
                entries[f"{prefix}.groups.{g}.w3/expert/{r}"] = w3
            else:
                entries[f"{prefix}.groups.{g}.w2/expert/{r}"] = w2
        return entries

    def forward(self, x_SD: torch.Tensor, tokens_per_expert_L: torch.Tensor) -> torch.Tensor:
        """x_SD holds tokens_per_expert_L[l] rows for local expert l, in expert order."""
        raise NotImplementedError


class LoopExperts(RoutedExperts):
    """Reference: one matmul chain per expert on its unpadded weights (one host sync per layer)."""

    def forward(self, x_SD: torch.Tensor, tokens_per_expert_L: torch.Tensor) -> torch.Tensor:
        counts = tokens_per_expert_L.tolist()
        outs, start = [], 0
        for i, n in enumerate(counts):
            w1, w3, w2 = self.expert_views(self.w13, self.w2, i)
            x = x_SD[start : start + n]
            outs.append((F.silu(x @ w1.t()) * (x @ w3.t())) @ w2.t())
            start += n
        # Still touch the weights so every parameter is part of the graph.
        return torch.cat(outs, dim=0) + 0.0 * (self.w13.sum() + self.w2.sum())


class GroupedExperts(RoutedExperts):
    """The whole layer as one grouped GEMM per projection: x @ w13 -> silu(gate) * up -> @ w2.

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
        # grouped_mm is not covered by autocast: cast to the autocast dtype (bf16) by hand.
        device_type = x_SD.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x_SD.dtype
        x_SD = x_SD.to(dtype)
        rows = None
        if self.align > 1:
            x_SD, tokens_per_expert_L, rows = pad_segments(x_SD, tokens_per_expert_L.tolist(), self.align)
        offs = tokens_per_expert_L.cumsum(0).to(torch.int32)  # on the device: no sync
        h = self.gemm(x_SD, self.w13.to(dtype).transpose(-2, -1), offs)
        gate, up = h.chunk(2, dim=-1)
        out = self.gemm(F.silu(gate) * up, self.w2.to(dtype).transpose(-2, -1), offs)
        return out if rows is None else out[rows]


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


EXPERT_CLASSES = {"loop": LoopExperts, "grouped": GroupedExperts}


def build_experts(d_model: int, groups: list[ExpertGroupConfig], compute: str = "loop") -> RoutedExperts:
    return EXPERT_CLASSES[compute](d_model, groups)
