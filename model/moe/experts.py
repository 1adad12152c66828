"""Routed experts: one set of 3-D SwiGLU weights per size group, two interchangeable computations.

Shape legend: S tokens after dispatch (sorted by local expert), D model dim, N experts of a group
held here, F the group's ffn width.

`LoopExpertGroup` is the readable reference (one matmul chain per expert). `GroupedGemmExpertGroup`
runs the whole group as one grouped GEMM per projection (torch.nn.functional.grouped_mm). Both
hold the same parameters, so a checkpoint loads into either.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mohge.model.config import ExpertGroupConfig


class ExpertGroup(nn.Module):
    """N experts of one width: w1/w3 [N, F, D] (gate/up) and w2 [N, D, F] (down)."""

    def __init__(self, num_experts: int, d_model: int, ffn_hidden_size: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_experts, ffn_hidden_size, d_model))
        self.w3 = nn.Parameter(torch.empty(num_experts, ffn_hidden_size, d_model))
        self.w2 = nn.Parameter(torch.empty(num_experts, d_model, ffn_hidden_size))

    @property
    def num_experts(self) -> int:
        return self.w1.shape[0]

    def forward(self, x_SD: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """x_SD holds counts[i] tokens for expert i, in expert order."""
        raise NotImplementedError


class LoopExpertGroup(ExpertGroup):
    def forward(self, x_SD: torch.Tensor, counts: list[int]) -> torch.Tensor:
        outs, start = [], 0
        for i, n in enumerate(counts):
            x = x_SD[start : start + n]
            h = F.silu(x @ self.w1[i].t()) * (x @ self.w3[i].t())
            outs.append(h @ self.w2[i].t())
            start += n
        if not outs:
            return x_SD.new_zeros(0, x_SD.shape[-1])
        return torch.cat(outs, dim=0)


def grouped_mm(x: torch.Tensor, w_t: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x [S, K] in segments ending at offs, w_t [N, K, M]: segment i times w_t[i] -> [S, M]."""
    return F.grouped_mm(x, w_t, offs=offs)


class GroupedGemmExpertGroup(ExpertGroup):
    """The group as one grouped GEMM per projection.

    `gemm(x, w_t, offs)` is the kernel (bf16 `grouped_mm`; FP8 training swaps in a float8 one from
    outside, see mohge.train.fp8) and `align` the token count each expert's segment must be a
    multiple of for it (float8 kernels: 16); segments are zero-padded to it and the padding rows
    dropped after, so they change neither outputs nor gradients.
    """

    def __init__(self, num_experts: int, d_model: int, ffn_hidden_size: int):
        super().__init__(num_experts, d_model, ffn_hidden_size)
        self.gemm = grouped_mm
        self.align = 1

    def forward(self, x_SD: torch.Tensor, counts: list[int]) -> torch.Tensor:
        if self.num_experts == 0 or x_SD.shape[0] == 0:
            # Still touch the weights so every parameter is part of the graph.
            return x_SD.new_zeros(x_SD.shape) + 0.0 * self.w2.sum()
        # grouped_mm is not covered by autocast: cast to the autocast dtype (bf16) by hand.
        device_type = x_SD.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x_SD.dtype
        x_SD = x_SD.to(dtype)
        rows = None
        if self.align > 1:
            x_SD, counts, rows = pad_segments(x_SD, counts, self.align)
        offs = torch.tensor(counts, device=x_SD.device).cumsum(0).to(torch.int32)
        gate = self.gemm(x_SD, self.w1.to(dtype).transpose(-2, -1), offs)
        up = self.gemm(x_SD, self.w3.to(dtype).transpose(-2, -1), offs)
        h = (F.silu(gate) * up).contiguous()
        out = self.gemm(h, self.w2.to(dtype).transpose(-2, -1), offs)
        return out if rows is None else out[rows]


def pad_segments(x_SD: torch.Tensor, counts: list[int], align: int) -> tuple[torch.Tensor, list[int], torch.Tensor]:
    """Zero-pads each expert's segment of x_SD to a multiple of `align` rows.

    Returns the padded tensor, the padded counts, and the row of each original token in it (so
    `padded[rows]` is x_SD again). The row index is built on the host from `counts`, which the
    caller already holds, and copied once: no device sync.
    """
    padded = [-(-n // align) * align for n in counts]
    starts = torch.tensor([0, *padded[:-1]]).cumsum(0)
    rows = torch.cat([torch.arange(n) + start for n, start in zip(counts, starts.tolist())])
    rows = rows.to(x_SD.device, non_blocking=True)
    out = x_SD.new_zeros(sum(padded), x_SD.shape[-1]).index_copy(0, rows, x_SD)
    return out, padded, rows


EXPERT_GROUP_CLASSES = {"loop": LoopExpertGroup, "grouped": GroupedGemmExpertGroup}


class RoutedExperts(nn.Module):
    """All routed experts of a layer that live on this process, group by group.

    Tokens arrive sorted by local expert; experts of one group are contiguous, so each group runs
    on one contiguous slice.
    """

    def __init__(self, d_model: int, groups: list[ExpertGroupConfig], compute: str = "loop"):
        super().__init__()
        cls = EXPERT_GROUP_CLASSES[compute]
        self.groups = nn.ModuleList(cls(g.num_experts, d_model, g.ffn_hidden_size) for g in groups)

    def local_counts(self) -> list[int]:
        return [g.num_experts for g in self.groups]

    def forward(self, x_SD: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        counts = tokens_per_expert.tolist()  # one host sync per layer: slicing needs sizes
        outs, tok, exp = [], 0, 0
        for group in self.groups:
            group_counts = counts[exp : exp + group.num_experts]
            n = sum(group_counts)
            outs.append(group(x_SD[tok : tok + n], group_counts))
            tok += n
            exp += group.num_experts
        return torch.cat(outs, dim=0)
