"""The padded expert stack: grouped path == loop reference, padding stays zero, no host syncs,
checkpoints of the per-group layout load."""

from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from conftest import init_module, make_moe

from mohge.model.config import ExpertGroupConfig
from mohge.model.moe.experts import GroupedExperts, LoopExperts
from mohge.model.moe.layer import MoHGELayer, moe_layers
from mohge.model.transformer import build_model
from mohge.parallel.host_syncs import count_host_syncs
from mohge.train.checkpoint import model_entries, quiet_single_process
from mohge.train.hydra_config import compose_config

D = 16
GROUPS = [ExpertGroupConfig(3, 8), ExpertGroupConfig(2, 16), ExpertGroupConfig(3, 24)]


def _pair():
    loop = init_module(LoopExperts(D, GROUPS), seed=3)
    grouped = GroupedExperts(D, GROUPS)
    grouped.load_state_dict(loop.state_dict())
    return loop, grouped


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("counts", [[5, 0, 7, 0, 0, 1, 9, 2], [0, 0, 0, 3, 4, 0, 0, 0], [2, 1, 1, 6, 1, 3, 3, 1]],
                         ids=["zero_experts_and_zero_group", "one_group_only", "uneven"])
def test_grouped_matches_loop_outputs_and_grads(dtype, counts):
    loop, grouped = _pair()
    loop.to(dtype), grouped.to(dtype)
    x = torch.randn(sum(counts), D, generator=torch.Generator().manual_seed(4)).to(dtype)
    g = torch.randn(sum(counts), D, generator=torch.Generator().manual_seed(5)).to(dtype)
    results = []
    for experts in (loop, grouped):
        xi = x.clone().requires_grad_(True)
        out = experts(xi, torch.tensor(counts))
        (out * g).sum().backward()
        results.append([out, xi.grad, experts.w13.grad, experts.w2.grad])
    tol = {} if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for a, b in zip(*results):
        torch.testing.assert_close(a.float(), b.float(), **tol)
    assert results[1][2].abs().sum() > 0


def test_stack_layout_and_checkpoint_views():
    experts = init_module(GroupedExperts(D, GROUPS))
    assert experts.w13.shape == (8, 48, D) and experts.w2.shape == (8, D, 24)
    assert experts.full_numel(experts.w13) + experts.full_numel(experts.w2) == make_moe(
        groups=GROUPS).routed_expert_params(D)
    entries = experts.checkpoint_entries("layers.1.ffn.experts.w13", experts.w13.data)
    entries.update(experts.checkpoint_entries("layers.1.ffn.experts.w2", experts.w2.data))
    assert len(entries) == 3 * 8
    w3 = entries["layers.1.ffn.experts.groups.1.w3/expert/1"]  # local expert 4, width 16
    assert w3.shape == (16, D) and w3.data_ptr() == experts.w13[4, 24].data_ptr()
    assert entries["layers.1.ffn.experts.groups.2.w2/expert/0"].shape == (D, 24)
    with torch.no_grad():  # entries write through to the stack
        entries["layers.1.ffn.experts.groups.0.w1/expert/2"].fill_(7.0)
    assert (experts.w13[2, :8] == 7.0).all() and (experts.w13[2, 8:24] == 0).all()


def _padding_values(experts):
    vals = []
    for i in range(experts.num_experts):
        f, fm = experts.expert_width(i), experts.max_width
        vals += [experts.w13[i, f:fm], experts.w13[i, fm + f:], experts.w2[i, :, f:]]
    return torch.cat([v.flatten() for v in vals])


def test_padding_gets_zero_gradients_and_stays_zero():
    layer = init_module(MoHGELayer(D, make_moe(), "grouped"))
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(2):
        out = layer(torch.randn(2, 6, D, generator=torch.Generator().manual_seed(step)))
        out.square().sum().backward()
        grads = layer.experts.w13.grad.clone(), layer.experts.w2.grad.clone()
        opt.step()
        opt.zero_grad()
    assert _padding_values(layer.experts).abs().max() == 0
    experts = layer.experts
    experts.w13.grad, experts.w2.grad = grads
    assert _padding_values(experts).abs().max() == 0  # the padding's gradients are exact zeros


@pytest.mark.parametrize("mode, top_k", [("global", 3), ("per_group", 4)])
@pytest.mark.parametrize("capacity", [None, 0.75])
def test_layer_forward_backward_has_no_host_sync(mode, top_k, capacity):
    layer = init_module(MoHGELayer(D, make_moe(topk_mode=mode, top_k=top_k, capacity_factor=capacity), "grouped"))
    x = torch.randn(2, 7, D, requires_grad=True)
    with count_host_syncs() as syncs:
        out = layer(x)
        (out * torch.randn_like(out)).sum().backward()
    assert dict(syncs) == {}
    assert x.grad is not None and layer.router.group_gate.weight.grad is not None


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
    assert _padding_values(layer.experts).abs().max() == 0
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


def _ep_worker(rank, world, moe):
    """One EP rank with the grouped path: its output for its tokens, and the syncs of fwd + bwd."""
    from mohge.parallel.dims import ParallelDims
    from mohge.parallel.expert_parallel import apply_expert_parallel
    from mohge.parallel.parallelize import ParallelContext

    dims = ParallelDims(dp_replicate=1, dp_shard=world, tp=1, pp=1, ep=world, world_size=world)
    ctx = ParallelContext(dims=dims, rank=rank)
    ctx.dense_mesh, ctx.expert_mesh = dims.build_meshes("cpu")
    full = init_module(MoHGELayer(D, moe, "grouped"), seed=2)
    layer = MoHGELayer(D, moe, "grouped")

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
def test_ep2_grouped_path_matches_and_syncs_once_per_layer():
    """At EP=2 the layer reads only the all-to-all split sizes back to the host: one sync."""
    from distributed import run_ranks

    for out, expected, syncs in run_ranks(2, _ep_worker, make_moe(top_k=3, k_group=2)):
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
        assert syncs == {"Tensor.tolist": 1}
