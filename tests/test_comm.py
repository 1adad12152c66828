"""Autograd-aware collectives on gloo, each against a by-hand expectation."""

from __future__ import annotations

import pytest
import torch
from distributed import run_ranks


def _all_to_all_rank(rank, world):
    import torch.distributed as dist

    from mohge.parallel.comm import all_to_all_single

    # Rank r sends (r + d + 1) rows to rank d; each row holds [r, d, i].
    send_splits = [rank + d + 1 for d in range(world)]
    rows = [torch.tensor([rank, d, i], dtype=torch.float64) for d in range(world) for i in range(rank + d + 1)]
    x = torch.stack(rows).requires_grad_(True)
    recv_splits = [s + rank + 1 for s in range(world)]
    y = all_to_all_single(x, send_splits, recv_splits, dist.group.WORLD)
    weight = torch.arange(y.numel(), dtype=torch.float64).view_as(y)
    (y * weight).sum().backward()
    return x.detach(), y.detach(), x.grad, weight


@pytest.mark.multirank
def test_all_to_all_single_forward_and_backward():
    world = 3
    results = run_ranks(world, _all_to_all_rank)
    for rank, (_, y, _, _) in enumerate(results):
        expected = torch.stack(
            [torch.tensor([s, rank, i], dtype=torch.float64) for s in range(world) for i in range(s + rank + 1)]
        )
        torch.testing.assert_close(y, expected)
    # Backward: the gradient of x's row [r, d, i] is the weight of that row where rank d received it.
    for rank, (x, _, grad, _) in enumerate(results):
        for row, g in zip(x, grad):
            r, d, i = (int(v) for v in row)
            _, y_d, _, w_d = results[d]
            hit = ((y_d == row).all(-1)).nonzero().flatten()
            assert len(hit) == 1
            torch.testing.assert_close(g, w_d[hit[0]])
