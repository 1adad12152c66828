"""One helper for the host-side scalar reductions the loop repeats (loss, eval sums, metrics)."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist


def reduce_scalars(values: Sequence[float], ctx, dim: str, device: torch.device, mean: bool = False) -> list[float]:
    """Sums (or averages, `mean=True`) Python numbers over mesh dimension `dim` ("dp", "pp", ...)
    in one float64 all-reduce; a no-op when that dimension has one rank."""
    size = getattr(ctx.dims, dim) if dim != "world" else ctx.dims.world_size
    if not ctx.distributed or size == 1:
        return [float(v) for v in values]
    packed = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(packed, group=ctx.group(dim))
    if mean:
        packed /= size
    return packed.tolist()
