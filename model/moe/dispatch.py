"""Token dispatch: sort (token, slot) pairs by expert, and put expert outputs back in place.

Shape legend: T tokens, K experts per token, D model dim, S dispatched rows (T*K: dropless, and
with a capacity factor the dropped slots are dispatched too and weighted 0 by the layer).

Every shape here is static (T*K rows whatever the routing) and nothing is read back to the host:
counts come from a scatter-add (bincount sizes its output from the data), the inverse permutation
from a scatter, so the layer runs under torch.compile(fullgraph=True) and syncs nothing on a GPU.

`LocalDispatcher` moves nothing between processes (expert parallel = 1). The all-to-all
dispatcher of parallel/ has the same two methods and swaps in from outside.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def count_per_expert(expert_idx: torch.Tensor, num_experts: int, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Slots per expert [E] (int64), optionally counting only where `weight` (bool) is set.

    A scatter-add into a fixed-size buffer: unlike bincount, no data-dependent size, no sync.
    """
    flat = expert_idx.flatten()
    ones = torch.ones_like(flat) if weight is None else weight.flatten().to(flat.dtype)
    return torch.zeros(num_experts, dtype=flat.dtype, device=flat.device).scatter_add_(0, flat, ones)


def inverse_permutation(perm_S: torch.Tensor) -> torch.Tensor:
    """inv with inv[perm[i]] = i (a scatter; no sort, no sync)."""
    inv = torch.empty_like(perm_S)
    return inv.scatter_(0, perm_S, torch.arange(perm_S.numel(), device=perm_S.device))


@dataclass
class LocalHandle:
    inverse_S: torch.Tensor  # flattened (token, slot) i was dispatched as row inverse_S[i]
    num_tokens: int
    top_k: int


class LocalDispatcher:
    """Permutes tokens into expert order on this process."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts

    def dispatch(self, x_TD: torch.Tensor, expert_idx_TK: torch.Tensor):
        """-> (x_SD sorted by expert, tokens per expert [E], handle for combine)."""
        T, K = expert_idx_TK.shape
        experts_S = expert_idx_TK.flatten()
        rows_S = torch.argsort(experts_S, stable=True)  # dispatched row i is (token, slot) rows_S[i]
        tokens_per_expert = count_per_expert(experts_S, self.num_experts)
        return x_TD[rows_S // K], tokens_per_expert, LocalHandle(inverse_permutation(rows_S), T, K)

    def combine(self, y_SD: torch.Tensor, handle: LocalHandle) -> torch.Tensor:
        """Expert outputs back to [T, K, D] in the tokens' original order."""
        return y_SD[handle.inverse_S].view(handle.num_tokens, handle.top_k, -1)
