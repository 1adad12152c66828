"""All-to-all token dispatch over the expert-parallel group.

Shape legend: T tokens, K experts per token, D model dim, R EP ranks, L local experts (most on any
rank), S rows sent by this rank, Q rows received.

Three phases each way, so compute can later overlap communication:
  preprocess  sort (token, slot) rows by destination rank, then local expert; count them
  communicate exchange counts, then rows (autograd-aware all_to_all_single); the split sizes
              are read back to the host once per layer forward (the only sync of the MoE layer)
  postprocess regroup received rows by local expert, whichever rank sent them
`combine` runs the same phases in reverse.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from mohge.model.moe.dispatch import count_per_expert, inverse_permutation, token_rows
from mohge.parallel.comm import all_to_all_single


@dataclass
class AllToAllHandle:
    inverse_S: torch.Tensor  # flattened (token, slot) i was sent as row inverse_S[i]
    local_order_Q: torch.Tensor  # local row j is received row local_order_Q[j]
    send_splits: list[int]
    recv_splits: list[int]
    num_tokens: int
    top_k: int


class AllToAllDispatcher:
    """Sends each (token, slot) to the EP rank that owns its expert and brings the outputs back."""

    def __init__(self, rank_of: list[int], slot_of: list[int], ep_rank: int, ep_size: int, group):
        self.ep_rank, self.ep_size, self.group = ep_rank, ep_size, group
        self.num_local = [sum(1 for r in rank_of if r == rank) for rank in range(ep_size)]
        self.max_local = max(self.num_local)
        # Sorting by key = rank * L + slot orders rows by destination rank, then local expert.
        self.key_of = [r * self.max_local + s for r, s in zip(rank_of, slot_of)]
        self._key_cache: dict[torch.device, torch.Tensor] = {}

    def _keys(self, device: torch.device) -> torch.Tensor:
        if device not in self._key_cache:
            self._key_cache[device] = torch.tensor(self.key_of, dtype=torch.long, device=device)
        return self._key_cache[device]

    # ---- dispatch ----------------------------------------------------------------------
    def preprocess(self, x_TD: torch.Tensor, expert_idx_TK: torch.Tensor):
        K = expert_idx_TK.shape[1]
        key_S = self._keys(x_TD.device)[expert_idx_TK.flatten()]
        rows_S = torch.argsort(key_S, stable=True)
        counts_RL = count_per_expert(key_S, self.ep_size * self.max_local).view(self.ep_size, self.max_local)
        inverse_S = inverse_permutation(rows_S)
        return token_rows(x_TD, rows_S, inverse_S, K), inverse_S, counts_RL

    def communicate_counts(self, counts_RL: torch.Tensor) -> torch.Tensor:
        """counts_RL[r, l]: rows for rank r's local expert l -> recv_RL[r, l]: rows from rank r."""
        recv_RL = torch.empty_like(counts_RL)
        dist.all_to_all_single(recv_RL, counts_RL.contiguous(), group=self.group)
        return recv_RL

    def postprocess(self, recv_RL: torch.Tensor, num_recv: int):
        local = self.num_local[self.ep_rank]
        slot_Q = torch.arange(self.max_local, device=recv_RL.device).repeat(self.ep_size)
        slot_Q = slot_Q.repeat_interleave(recv_RL.flatten(), output_size=num_recv)  # size known: no sync
        local_order_Q = torch.argsort(slot_Q, stable=True)
        tokens_per_local_expert = recv_RL.sum(0)[:local]
        return local_order_Q, tokens_per_local_expert

    def dispatch(self, x_TD: torch.Tensor, expert_idx_TK: torch.Tensor):
        """-> (rows for this rank's experts sorted by local expert, tokens per local expert, handle)."""
        x_send, inverse_S, counts_RL = self.preprocess(x_TD, expert_idx_TK)
        recv_RL = self.communicate_counts(counts_RL)
        # The one host sync of the layer: all_to_all_single needs its split sizes on the host.
        splits = torch.stack([counts_RL.sum(1), recv_RL.sum(1)]).tolist()
        send_splits, recv_splits = splits[0], splits[1]
        x_recv = all_to_all_single(x_send, send_splits, recv_splits, self.group)
        local_order_Q, tokens_per_local_expert = self.postprocess(recv_RL, sum(recv_splits))
        handle = AllToAllHandle(
            inverse_S, local_order_Q, send_splits, recv_splits,
            expert_idx_TK.shape[0], expert_idx_TK.shape[1],
        )
        return x_recv[local_order_Q], tokens_per_local_expert, handle

    # ---- combine -----------------------------------------------------------------------
    def combine(self, y_local: torch.Tensor, handle: AllToAllHandle) -> torch.Tensor:
        """Expert outputs back to the ranks and places their tokens came from -> [T, K, D]."""
        y_recv = torch.empty_like(y_local)
        y_recv[handle.local_order_Q] = y_local
        y_send = all_to_all_single(y_recv, handle.recv_splits, handle.send_splits, self.group)
        return y_send[handle.inverse_S].view(handle.num_tokens, handle.top_k, -1)
