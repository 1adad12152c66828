"""MoE parallel folding pieces on their own: the sequence gather (a comm op) and the dispatcher
that sends only this tp rank's tokens. End-to-end parity: tests/test_train_parallel.py (fold)."""

from __future__ import annotations

import pytest
import torch
from distributed import run_ranks


def _gather_rank(rank, world):
    import warnings

    import torch.distributed as dist

    from mohge.parallel.comm import gather_sequence

    x_BSlD = torch.full((2, 3, 4), float(rank), dtype=torch.float64) + torch.arange(24.0).view(2, 3, 4)
    x_BSlD.requires_grad_(True)
    with warnings.catch_warnings():  # a deprecated collective would warn on every rank, every layer
        warnings.simplefilter("error", FutureWarning)
        y_BSD = gather_sequence(x_BSlD, dist.group.WORLD)
        weight_BSD = torch.arange(y_BSD.numel(), dtype=torch.float64).view_as(y_BSD) * (rank + 1)
        (y_BSD * weight_BSD).sum().backward()
    return x_BSlD.detach(), y_BSD.detach(), x_BSlD.grad, weight_BSD


@pytest.mark.multirank
def test_gather_sequence_forward_and_backward():
    """Forward: the shards joined along the sequence in rank order. Backward: each shard's
    gradient sums every rank's gradient of its chunk (reduce-scatter)."""
    world = 2
    results = run_ranks(world, _gather_rank)
    full = torch.cat([x for x, _, _, _ in results], dim=1)
    for rank, (x, y, grad, _) in enumerate(results):
        torch.testing.assert_close(y, full)
        Sl = x.shape[1]
        expected = sum(w[:, rank * Sl : (rank + 1) * Sl] for _, _, _, w in results)
        torch.testing.assert_close(grad, expected)


def test_folded_dispatcher_sends_only_its_shard():
    """With tp 2, rank r's dispatcher hands the experts only the tokens of its sequence shard
    (in the local dispatcher's order) and returns zeros on the other shard's tokens."""
    from mohge.model.moe.dispatch import LocalDispatcher
    from mohge.parallel.moe_folding import FoldedDispatcher

    torch.manual_seed(0)
    B, S, K, D, E = 2, 6, 2, 3, 4
    x_TD = torch.randn(B * S, D)
    idx_TK = torch.randint(0, E, (B * S, K))
    for r in range(2):
        folded = FoldedDispatcher(LocalDispatcher(E), tp_rank=r, tp_size=2)
        folded.batch = B
        x_disp, counts, handle = folded.dispatch(x_TD, idx_TK)
        local_rows = torch.arange(B * S).view(B, 2, S // 2)[:, r].flatten()
        want_disp, want_counts, _ = LocalDispatcher(E).dispatch(x_TD[local_rows], idx_TK[local_rows])
        torch.testing.assert_close(x_disp, want_disp)
        assert counts.tolist() == want_counts.tolist()
        y_TKD = folded.combine(2 * x_disp, handle)
        assert y_TKD.shape == (B * S, K, D)
        torch.testing.assert_close(y_TKD[local_rows], 2 * x_TD[local_rows, None].expand(-1, K, -1))
        other = torch.ones(B * S, dtype=torch.bool)
        other[local_rows] = False
        assert (y_TKD[other] == 0).all()


@pytest.mark.slow
@pytest.mark.multirank
def test_planner_equals_folded_shards(tmp_path):
    """mohge-plan --memory under folding (fsdp2 x tp2 with ep2 folded on 4 ranks: each expert's
    two holders are a dp pair, edp_shard 2): planned parameter, gradient and optimizer bytes equal
    the shards a real training step holds (the check of tests/test_memory.py)."""
    from test_memory import _check

    measured = _check(tmp_path, ["parallel.dp_shard=2", "parallel.tp=2", "parallel.ep=2", "parallel.moe_fold=true"], 4)
    assert all(m["experts_fsdp"] for m in measured)  # routed experts FSDP-sharded over the folded edp_shard
