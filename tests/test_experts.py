"""Routed experts stored unpadded per group: every compute path (grouped: transient padded stacks,
ragged: one ragged op per projection) == the loop reference, host syncs per path, zero-expert groups, and
checkpoints of the per-group and of the fused-stack layouts load."""

from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from conftest import init_module, make_moe

from mohge.model.config import ExpertGroupConfig
from mohge.model.moe.experts import EXPERT_CLASSES, LoopExperts
from mohge.model.moe.layer import MoHGELayer, moe_layers
from mohge.model.transformer import build_model
from mohge.parallel.host_syncs import count_host_syncs, read_on_host
from mohge.train.checkpoint import model_entries, quiet_single_process
from mohge.train.hydra_config import compose_config

D = 16
GROUPS = [ExpertGroupConfig(3, 8), ExpertGroupConfig(2, 16), ExpertGroupConfig(3, 24)]
PATHS = ["grouped", "ragged"]


def _pair(compute, keep=None):
    loop = LoopExperts(D, GROUPS)
    other = EXPERT_CLASSES[compute](D, GROUPS)
    if keep is not None:  # expert parallel's cut: only these global ids
        loop.keep_local(keep), other.keep_local(keep)
    init_module(loop, seed=3)
    other.load_state_dict(loop.state_dict())
    return loop, other


def _run_both(loop, other, counts, dtype):
    loop.to(dtype), other.to(dtype)
    x = torch.randn(sum(counts), D, generator=torch.Generator().manual_seed(4)).to(dtype)
    g = torch.randn(sum(counts), D, generator=torch.Generator().manual_seed(5)).to(dtype)
    results = []
    for experts in (loop, other):
        xi = x.clone().requires_grad_(True)
        out = experts(xi, torch.tensor(counts))
        (out * g).sum().backward()
        results.append([out, xi.grad] + [p.grad for p in experts.parameters()])
    return results


@pytest.mark.parametrize("compute", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("counts", [[5, 0, 7, 0, 0, 1, 9, 2], [0, 0, 0, 3, 4, 0, 0, 0], [2, 1, 1, 6, 1, 3, 3, 1]],
                         ids=["zero_experts_and_zero_group", "one_group_only", "uneven"])
def test_path_matches_loop_outputs_and_all_grads(compute, dtype, counts):
    loop, other = _pair(compute)
    results = _run_both(loop, other, counts, dtype)
    assert len(results[1]) == 2 + 3 * len(GROUPS)  # output, input grad, w1/w3/w2 of every group
    tol = {} if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for a, b in zip(*results):
        assert b is not None
        torch.testing.assert_close(a.float(), b.float(), **tol)
    assert sum(float(t.abs().sum()) for t in results[1][2:]) > 0


@pytest.mark.parametrize("compute", PATHS)
def test_group_with_no_local_expert(compute):
    """Expert parallel may leave a group without local experts: zero-row tensors, skipped."""
    loop, other = _pair(compute, keep=[0, 2, 5, 6])  # group 1 (ids 3, 4) not held here
    assert [grp.w1.shape[0] for grp in other.groups] == [2, 0, 2]
    assert [grp.expert_rows for grp in other.groups] == [[0, 2], [], [0, 1]]
    for a, b in zip(*_run_both(loop, other, [3, 0, 4, 2], torch.float32)):
        if a.numel() == 0 and b is None:  # ragged leaves the empty group out of the graph
            continue
        torch.testing.assert_close(a, b)


def test_storage_is_unpadded_and_checkpoint_entries_are_row_views():
    experts = init_module(EXPERT_CLASSES["grouped"](D, GROUPS))
    shapes = {n: tuple(p.shape) for n, p in experts.named_parameters()}
    assert shapes == {"groups.0.w1": (3, 8, D), "groups.0.w3": (3, 8, D), "groups.0.w2": (3, D, 8),
                      "groups.1.w1": (2, 16, D), "groups.1.w3": (2, 16, D), "groups.1.w2": (2, D, 16),
                      "groups.2.w1": (3, 24, D), "groups.2.w3": (3, 24, D), "groups.2.w2": (3, D, 24)}
    assert sum(p.numel() for p in experts.parameters()) == make_moe(groups=GROUPS).routed_expert_params(D)
    holder = torch.nn.Module()
    holder.experts = experts
    entries = model_entries(holder)
    assert len(entries) == 3 * 8
    w3 = entries["experts.groups.1.w3/expert/1"]
    assert w3.shape == (16, D) and w3.data_ptr() == experts.groups[1].w3[1].data_ptr()
    assert entries["experts.groups.2.w2/expert/0"].shape == (D, 24)
    with torch.no_grad():  # entries write through to the parameters
        entries["experts.groups.0.w1/expert/2"].fill_(7.0)
    assert (experts.groups[0].w1[2] == 7.0).all()


def test_padded_stacks_hold_every_expert_with_zero_padding():
    experts = init_module(EXPERT_CLASSES["grouped"](D, GROUPS))
    w13, w2 = experts.padded_stacks(torch.float32)
    assert w13.shape == (8, 48, D) and w2.shape == (8, D, 24)
    for i in range(experts.num_experts):
        f, fm = experts.expert_width(i), experts.max_width
        w1, w3, w2_i = experts.expert_weights(i)
        assert torch.equal(w13[i, :f], w1) and torch.equal(w13[i, fm:fm + f], w3) and torch.equal(w2[i, :, :f], w2_i)
        assert not w13[i, f:fm].any() and not w13[i, fm + f:].any() and not w2[i, :, f:].any()


@pytest.mark.parametrize("compute", PATHS)
@pytest.mark.parametrize("mode, top_k", [("global", 3), ("per_group", 4)])
@pytest.mark.parametrize("capacity", [None, 0.75])
def test_layer_forward_backward_has_no_host_sync(mode, top_k, capacity, compute):
    layer = init_module(MoHGELayer(D, make_moe(topk_mode=mode, top_k=top_k, capacity_factor=capacity), compute))
    x = torch.randn(2, 7, D, requires_grad=True)
    with count_host_syncs() as syncs:
        out = layer(x)
        (out * torch.randn_like(out)).sum().backward()
    assert dict(syncs) == {}
    assert x.grad is not None and layer.router.group_gate.weight.grad is not None


def test_kernels_read_offsets_where_they_live_and_count_elsewhere(monkeypatch):
    """The ragged op's CPU kernel reads its offsets on the host, where they live: no device to wait
    for, not counted. The same read of a tensor on any other device is a sync, and counted."""
    offs = torch.tensor([2, 5])
    with count_host_syncs() as syncs:
        assert read_on_host(offs) == [2, 5]
    assert dict(syncs) == {}
    monkeypatch.setattr(torch.Tensor, "device", property(lambda self: torch.device("meta")))
    with count_host_syncs() as syncs:
        assert read_on_host(offs) == [2, 5]
    assert dict(syncs) == {"Tensor.tolist": 1}


def test_sync_counter_sees_syncs():
    """The counter catches what the grouped path avoids: the loop reference reads counts back."""
    layer = init_module(MoHGELayer(D, make_moe(), "loop"))
    x = torch.randn(8, D)
    with count_host_syncs() as syncs:
        layer(x.view(1, 8, D))
        x.nonzero()
        torch.bincount(torch.tensor([1, 2]))
        x[x > 0]
        torch.arange(3).repeat_interleave(torch.tensor([1, 2, 3]))
    assert syncs == {"Tensor.tolist": 1, "aten.nonzero.default": 1, "aten.bincount.default": 1,
                     "aten.index.Tensor": 1, "aten.repeat_interleave.Tensor": 1}


def test_per_group_layout_checkpoint_loads(tmp_path):
    """A checkpoint written by the per-group layout (params `...experts.groups.<g>.w1` [N, F, D],
    one entry per expert row) loads into the stacks, and the layer computes what those per-group
    weights compute."""
    cfg = compose_config("tiny_mohge").model
    source = build_model(cfg, "cpu")
    source.init_weights(0)
    gen = torch.Generator().manual_seed(1)
    old, per_group = {}, {}
    for name, p in source.named_parameters():
        if ".experts." not in name:
            old[name] = torch.randn(p.shape, generator=gen)
    for lname, _ in moe_layers(source):
        for g, grp in enumerate(cfg.moe.groups):
            for part in ("w1", "w3", "w2"):
                shape = (grp.num_experts, cfg.d_model, grp.ffn_hidden_size) if part == "w2" else (
                    grp.num_experts, grp.ffn_hidden_size, cfg.d_model)
                full = torch.randn(shape, generator=gen) * 0.1
                per_group[f"{lname}.experts.groups.{g}.{part}"] = full
                old.update({f"{lname}.experts.groups.{g}.{part}/expert/{r}": full[r] for r in range(shape[0])})
    with quiet_single_process():
        dcp.save(old, checkpoint_id=str(tmp_path))

    model = build_model(cfg, "cpu", expert_compute="grouped")
    model.init_weights(5)
    entries = model_entries(model)
    assert set(entries) == set(old)  # the same keys and shapes as the per-group layout wrote
    assert all(entries[k].shape == old[k].shape for k in old)
    with quiet_single_process():
        dcp.load(entries, checkpoint_id=str(tmp_path))
    params = dict(model.named_parameters())
    for name, value in old.items():
        if "/expert/" not in name:
            assert torch.equal(params[name], value), name
    lname, layer = next(moe_layers(model))
    # Reference: each expert with the per-group tensors, tokens through a loop.
    x = torch.randn(10, cfg.d_model, generator=gen)
    counts = torch.randint(0, 4, (layer.experts.num_experts,), generator=gen)
    xs = x[: int(counts.sum())] if counts.sum() <= 10 else torch.randn(int(counts.sum()), cfg.d_model)
    expected, start = [], 0
    for i, (g, r) in enumerate(layer.experts.expert_ids):
        w = {p: per_group[f"{lname}.experts.groups.{g}.{p}"][r] for p in ("w1", "w3", "w2")}
        xe = xs[start: start + int(counts[i])]
        expected.append((F.silu(xe @ w["w1"].t()) * (xe @ w["w3"].t())) @ w["w2"].t())
        start += int(counts[i])
    torch.testing.assert_close(layer.experts(xs, counts), torch.cat(expected), rtol=1e-5, atol=1e-5)


def test_fused_stack_checkpoint_loads(tmp_path):
    """A checkpoint written by the fused padded stacks (w13 [L, 2*Fm, D], w2 [L, D, Fm]; one entry
    per expert as a view of the stack, as that layout's checkpoint_entries wrote them) loads, and
    the layer computes what those stacks computed (padded GEMMs, written out here)."""
    cfg = compose_config("tiny_mohge").model
    source = build_model(cfg, "cpu")
    source.init_weights(0)
    gen = torch.Generator().manual_seed(2)
    widths, sizes = [g.ffn_hidden_size for g in cfg.moe.groups], [g.num_experts for g in cfg.moe.groups]
    ids, fm = [(g, r) for g, n in enumerate(sizes) for r in range(n)], max(widths)
    saved, stacks = {}, {}
    for name, p in source.named_parameters():
        if ".experts." not in name:
            saved[name] = p.detach().clone()
    for lname, _ in moe_layers(source):
        w13 = torch.zeros(len(ids), 2 * fm, cfg.d_model)
        w2 = torch.zeros(len(ids), cfg.d_model, fm)
        for i, (g, r) in enumerate(ids):
            f = widths[g]
            w13[i, :f], w13[i, fm:fm + f] = torch.randn(f, cfg.d_model, generator=gen), torch.randn(
                f, cfg.d_model, generator=gen)
            w2[i, :, :f] = torch.randn(cfg.d_model, f, generator=gen)
            prefix = f"{lname}.experts.groups.{g}"
            saved.update({f"{prefix}.w1/expert/{r}": w13[i, :f], f"{prefix}.w3/expert/{r}": w13[i, fm:fm + f],
                          f"{prefix}.w2/expert/{r}": w2[i, :, :f]})
        stacks[lname] = (w13, w2)
    with quiet_single_process():
        dcp.save(saved, checkpoint_id=str(tmp_path))
    model = build_model(cfg, "cpu", expert_compute="ragged")
    model.init_weights(5)
    with quiet_single_process():
        dcp.load(model_entries(model), checkpoint_id=str(tmp_path))
    lname, layer = next(moe_layers(model))
    w13, w2 = stacks[lname]
    counts = torch.tensor([1, 0, 2, 3] * (len(ids) // 4) + [1] * (len(ids) % 4))
    x = torch.randn(int(counts.sum()), cfg.d_model, generator=gen)
    offs = counts.cumsum(0).to(torch.int32)  # the fused layout's computation on its own stacks
    gate, up = F.grouped_mm(x, w13.transpose(-2, -1), offs=offs).chunk(2, dim=-1)
    expected = F.grouped_mm(F.silu(gate) * up, w2.transpose(-2, -1), offs=offs)
    torch.testing.assert_close(layer.experts(x, counts), expected, rtol=1e-5, atol=1e-5)


def _ep_worker(rank, world, moe, compute):
    """One EP rank: its output for its tokens, and the syncs of fwd + bwd."""
    from mohge.parallel.dims import ParallelDims
    from mohge.parallel.expert_parallel import apply_expert_parallel
    from mohge.parallel.parallelize import ParallelContext

    dims = ParallelDims(dp_replicate=1, dp_shard=world, tp=1, pp=1, ep=world, world_size=world)
    ctx = ParallelContext(dims=dims, rank=rank)
    ctx.dense_mesh, ctx.expert_mesh = dims.build_meshes("cpu")
    full = init_module(MoHGELayer(D, moe, compute), seed=2)
    layer = MoHGELayer(D, moe, compute)

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ffn = layer

    apply_expert_parallel(Holder(), ctx, moe)
    with torch.no_grad():
        full_params = dict(full.named_parameters())
        for name, p in layer.named_parameters():
            rows = getattr(layer.get_submodule(name.rsplit(".", 1)[0]), "expert_rows", None)
            p.copy_(full_params[name] if rows is None else full_params[name][rows])
    x = torch.randn(1, 9, D, generator=torch.Generator().manual_seed(rank))
    with count_host_syncs() as syncs:
        out = layer(x)
        out.square().sum().backward()
    return out.detach(), full(x).detach(), dict(syncs)


@pytest.mark.multirank
@pytest.mark.parametrize("compute", PATHS)
def test_ep2_path_matches_and_syncs_once_per_layer(compute):
    """At EP=2 the layer reads only the all-to-all split sizes back to the host: one sync."""
    from distributed import run_ranks

    for out, expected, syncs in run_ranks(2, _ep_worker, make_moe(top_k=3, k_group=2), compute):
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
        assert syncs == {"Tensor.tolist": 1}
