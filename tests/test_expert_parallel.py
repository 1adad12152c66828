"""Expert parallel on gloo: EP=k equals EP=1 (outputs and every gradient), both placements."""

from __future__ import annotations

import pytest
import torch
from conftest import make_moe
from distributed import run_ranks

from mohge.model.moe.layer import MoHGELayer

D = 16
TOKENS_PER_RANK = 10


def _build_reference(moe, seed=0):
    from conftest import init_module

    return init_module(MoHGELayer(D, moe, "loop"), seed=seed)


def _inputs(rank: int):
    gen = torch.Generator().manual_seed(100 + rank)
    return torch.randn(1, TOKENS_PER_RANK, D, generator=gen), torch.randn(1, TOKENS_PER_RANK, D, generator=gen)


def _reference(moe, world):
    """Every rank's tokens through the one-process layer, as micro-batches of one step: backward
    each, then divide the gradients by their number (as the trainer does; it scales the attached
    auxiliary losses' gradients too)."""
    layer = _build_reference(moe)
    outs = []
    total = 0.0
    for rank in range(world):
        x, g = _inputs(rank)
        out = layer(x)
        outs.append(out.detach())
        total = total + (out * g).sum()
    total.backward()
    return outs, {n: p.grad / world for n, p in layer.named_parameters()}


def _ep_rank(rank, world, moe, allocation):
    """EP layer on this rank with the reference's weights: its output, grads and expert rows."""
    from mohge.parallel.dims import ParallelDims
    from mohge.parallel.expert_parallel import apply_expert_parallel
    from mohge.parallel.grads import sync_gradients
    from mohge.parallel.parallelize import ParallelContext

    moe.allocation = allocation
    dims = ParallelDims(dp_replicate=1, dp_shard=world, tp=1, pp=1, ep=world, world_size=world)
    ctx = ParallelContext(dims=dims, rank=rank)
    ctx.dense_mesh, ctx.expert_mesh = dims.build_meshes("cpu")
    full = _build_reference(moe)
    layer = MoHGELayer(D, moe, "loop")

    class Holder(torch.nn.Module):  # moe_layers() walks a model
        def __init__(self):
            super().__init__()
            self.ffn = layer

    holder = Holder()
    apply_expert_parallel(holder, ctx, moe)
    with torch.no_grad():  # same weights as the reference: dense params whole, experts by rows
        full_params = dict(full.named_parameters())
        for name, p in layer.named_parameters():
            src = full_params[name]
            module = layer.get_submodule(name.rsplit(".", 1)[0])
            rows = getattr(module, "expert_rows", None)
            p.copy_(src if rows is None else src[rows])
    x, g = _inputs(rank)
    out = layer(x)
    (out * g).sum().backward()
    sync_gradients(holder, ctx)  # also gives unused parameters (no local experts) zero grads
    rows = {
        name: getattr(layer.get_submodule(name.rsplit(".", 1)[0]), "expert_rows", None)
        for name, _ in layer.named_parameters()
    }
    return out.detach(), {n: p.grad.clone() for n, p in layer.named_parameters()}, rows


@pytest.mark.multirank
@pytest.mark.parametrize(
    "world, allocation, capacity",
    [(2, "all_size", None), (4, "all_size", None), (2, "group_coupled", None), (4, "group_coupled", None),
     (4, "all_size", 0.75)],
)
def test_ep_matches_single_process(world, allocation, capacity):
    """Dropless, and with a capacity factor: tokens are dropped on the sending rank, in token
    order, so EP drops exactly the slots the one-process layer drops for the same tokens."""
    moe = make_moe(top_k=3, k_group=2, capacity_factor=capacity)
    ref_outs, ref_grads = _reference(moe, world)
    results = run_ranks(world, _ep_rank, moe, allocation)
    for rank, (out, grads, rows) in enumerate(results):
        torch.testing.assert_close(out, ref_outs[rank], rtol=1e-5, atol=1e-6)
        for name, grad in grads.items():
            expected = ref_grads[name] if rows[name] is None else ref_grads[name][rows[name]]
            torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6, msg=f"rank {rank} {name}")
    # Every expert row lives on exactly one rank.
    for name in ref_grads:
        if results[0][2][name] is not None:
            held = sorted(r for res in results for r in res[2][name])
            assert held == list(range(ref_grads[name].shape[0])), name
