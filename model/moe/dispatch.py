"""Token dispatch: sort (token, slot) pairs by expert, and put expert outputs back in place.

Shape legend: T tokens, K experts per token, D model dim, S dispatched rows (T*K here).

`LocalDispatcher` moves nothing between processes (expert parallel = 1). The all-to-all
dispatcher of parallel/ has the same two methods and swaps in from outside.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LocalHandle:
    rows_S: torch.Tensor  # dispatched row i is flattened (token, slot) rows_S[i]
    num_tokens: int
    top_k: int


def kept_slots(expert_idx_TK: torch.Tensor, keep_TK: torch.Tensor | None) -> torch.Tensor:
    """Flattened (token, slot) indices that are dispatched: all, or those a capacity limit kept."""
    if keep_TK is None:
        return torch.arange(expert_idx_TK.numel(), device=expert_idx_TK.device)
    return keep_TK.flatten().nonzero().squeeze(1)


def scatter_back(y_SD: torch.Tensor, rows_S: torch.Tensor, num_tokens: int, top_k: int) -> torch.Tensor:
    """Rows back to [T, K, D] at their (token, slot); dropped slots stay zero."""
    y_TKD = y_SD.new_zeros(num_tokens * top_k, y_SD.shape[-1])
    y_TKD[rows_S] = y_SD
    return y_TKD.view(num_tokens, top_k, -1)


class LocalDispatcher:
    """Permutes tokens into expert order on this process."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts

    def dispatch(self, x_TD: torch.Tensor, expert_idx_TK: torch.Tensor, keep_TK: torch.Tensor | None = None):
        """-> (x_SD sorted by expert, tokens per expert [E], handle for combine)."""
        T, K = expert_idx_TK.shape
        slots = kept_slots(expert_idx_TK, keep_TK)
        experts_S = expert_idx_TK.flatten()[slots]
        rows_S = slots[torch.argsort(experts_S, stable=True)]
        tokens_per_expert = torch.bincount(experts_S, minlength=self.num_experts)
        return x_TD[rows_S // K], tokens_per_expert, LocalHandle(rows_S, T, K)

    def combine(self, y_SD: torch.Tensor, handle: LocalHandle) -> torch.Tensor:
        """Expert outputs back to [T, K, D] in the tokens' original order."""
        return scatter_back(y_SD, handle.rows_S, handle.num_tokens, handle.top_k)
