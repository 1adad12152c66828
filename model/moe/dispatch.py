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


class TokenRows(torch.autograd.Function):
    """x_TD -> x_TD[rows_S // K], with a deterministic backward.

    Autograd's own backward of that indexing accumulates the K slot gradients of each token with
    index_put_(accumulate=True), which on a multi-threaded CPU adds them atomically in whatever
    order the threads reach them: two identical runs then drift apart in the last bits (in the 4th
    digit of the loss after ~50 steps). Here each token's K gradients are brought back to [T, K, D]
    by the inverse permutation and summed in slot order.
    """

    @staticmethod
    def forward(ctx, x_TD: torch.Tensor, rows_S: torch.Tensor, inverse_S: torch.Tensor, top_k: int) -> torch.Tensor:
        ctx.save_for_backward(inverse_S)
        ctx.top_k = top_k
        return x_TD.index_select(0, rows_S // top_k)

    @staticmethod
    def backward(ctx, grad_SD: torch.Tensor):
        (inverse_S,) = ctx.saved_tensors
        grad_TKD = grad_SD.index_select(0, inverse_S).view(-1, ctx.top_k, grad_SD.shape[-1])
        return grad_TKD.sum(1), None, None, None


def token_rows(x_TD: torch.Tensor, rows_S: torch.Tensor, inverse_S: torch.Tensor, top_k: int) -> torch.Tensor:
    """Dispatched row i is x_TD[rows_S[i] // top_k] (inverse_S: the inverse permutation of rows_S)."""
    return TokenRows.apply(x_TD, rows_S, inverse_S, top_k)


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
        inverse_S = inverse_permutation(rows_S)
        return token_rows(x_TD, rows_S, inverse_S, K), tokens_per_expert, LocalHandle(inverse_S, T, K)

    def combine(self, y_SD: torch.Tensor, handle: LocalHandle) -> torch.Tensor:
        """Expert outputs back to [T, K, D] in the tokens' original order."""
        return y_SD[handle.inverse_S].view(handle.num_tokens, handle.top_k, -1)
