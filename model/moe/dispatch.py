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
    order_S: torch.Tensor  # dispatched row i came from flattened (token, slot) order_S[i]
    num_tokens: int
    top_k: int


class LocalDispatcher:
    """Permutes tokens into expert order on this process."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts

    def dispatch(self, x_TD: torch.Tensor, expert_idx_TK: torch.Tensor):
        """-> (x_SD sorted by expert, tokens per expert [E], handle for combine)."""
        T, K = expert_idx_TK.shape
        flat_S = expert_idx_TK.flatten()
        order_S = torch.argsort(flat_S, stable=True)
        tokens_per_expert = torch.bincount(flat_S, minlength=self.num_experts)
        return x_TD[order_S // K], tokens_per_expert, LocalHandle(order_S, T, K)

    def combine(self, y_SD: torch.Tensor, handle: LocalHandle) -> torch.Tensor:
        """Expert outputs back to [T, K, D] in the tokens' original order."""
        y_TKD = torch.empty_like(y_SD)
        y_TKD[handle.order_S] = y_SD
        return y_TKD.view(handle.num_tokens, handle.top_k, -1)
