"""Initialisation by shard (model/init.py): each process generates only the elements it holds, with
the values they have in the whole tensor."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from mohge.model.init import _mix_scalar, _s64, normal_at, param_key, splitmix64
from mohge.model.transformer import build_model, initial_value
from mohge.parallel.dims import ParallelDims


def test_hash_is_splitmix64():
    """The tensor hash equals a plain-integer splitmix64 (wrapping int64 arithmetic is exact)."""
    xs = [0, 1, 12345, 2**40 + 7, 2**63 - 1, 2**63 + 5]
    got = splitmix64(torch.tensor([_s64(x) for x in xs])).tolist()
    assert [g & (2**64 - 1) for g in got] == [_mix_scalar(x) for x in xs]


def test_values_are_normal_and_index_addressed():
    v = normal_at(param_key("w", 0), torch.arange(200_000), 0.02)
    assert abs(float(v.mean())) < 2e-4 and float(v.std()) == pytest.approx(0.02, rel=0.01)
    idx = torch.tensor([7, 199_999, 3])  # any subset, in any order, has the same values
    assert torch.equal(normal_at(param_key("w", 0), idx, 0.02), v[idx])
    assert not torch.equal(normal_at(param_key("w", 1), idx, 0.02), v[idx])


def test_expert_rows_get_their_rows_of_the_whole_tensor(tiny_cfg):
    """Expert parallel rank 1 of 2 generates only its experts, equal to those rows of the whole."""
    from mohge.model.moe.layer import moe_layers
    from mohge.parallel.allocation import allocate
    from mohge.parallel.expert_parallel import shard_experts

    model = build_model(tiny_cfg.model, "meta")
    for _, layer in moe_layers(model):
        shard_experts(layer, allocate(tiny_cfg.model.moe, 2), 1)
    model.to_empty(device="cpu")
    generated = model.init_weights(5)
    cfg, d = tiny_cfg.model, tiny_cfg.model.d_model
    stacks = [layer.experts for _, layer in moe_layers(model)]
    real_expert_elements = sum(3 * d * s.widths[g] for s in stacks for g, _ in s.expert_ids)
    dense = sum(p.numel() for n, p in model.named_parameters() if ".experts." not in n)
    assert generated == dense + real_expert_elements < cfg.num_params()
    experts = model.layers["1"].ffn.experts
    assert len(experts.expert_ids) < sum(experts.full_group_sizes)
    assert [grp.expert_rows for grp in experts.groups] == [
        [r for gi, r in experts.expert_ids if gi == g] for g in range(len(experts.groups))]
    for i, (g, r) in enumerate(experts.expert_ids):  # each expert = its rows of the per-group tensors
        n, f = experts.full_group_sizes[g], experts.widths[g]
        w1, w3, w2 = experts.expert_weights(i)
        for part, got in (("w1", w1), ("w3", w3)):
            whole = initial_value(f"layers.1.ffn.experts.groups.{g}.{part}", (n, f, d), cfg, 5)
            assert torch.equal(got, whole[r])
        assert torch.equal(w2, initial_value(f"layers.1.ffn.experts.groups.{g}.w2", (n, d, f), cfg, 5)[r])


def _generated_on_meta(overrides: list[str], world: int, rank: int) -> tuple[int, int]:
    """mohge_3b parallelized on meta as `rank` of `world` (a fake process group: no peers needed);
    the elements init_weights generates there and the planner's count of what the rank holds."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from mohge.parallel.memory import plan_memory
    from mohge.parallel.parallelize import ParallelContext, parallelize_model
    from mohge.train.hydra_config import compose_config

    cfg = compose_config("mohge_3b", overrides)
    dims = ParallelDims.from_config(cfg.parallel, world)
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        ctx = ParallelContext(dims, rank=rank)
        ctx.dense_mesh, ctx.expert_mesh = dims.build_meshes("cpu")
        model = parallelize_model(build_model(cfg.model, "meta"), ctx, cfg)
        generated = model.init_weights(cfg.train.seed)
    finally:
        dist.destroy_process_group()
    (planned,) = plan_memory(cfg, dims, ranks=[rank])
    return generated, planned


@pytest.mark.slow
@pytest.mark.parametrize("dp_shard, rank", [(8, 5), (64, 37)])
def test_mohge_3b_rank_generates_its_share(dp_shard, rank):
    """ep=8: a rank generates at most 1/8 of the expert elements plus its share of the dense ones
    (exactly the elements it holds, as the planner counts them)."""
    from mohge.train.hydra_config import compose_config

    generated, planned = _generated_on_meta([f"parallel.dp_shard={dp_shard}", "parallel.ep=8"], dp_shard, rank)
    model = compose_config("mohge_3b").model
    experts = sum(3 * model.d_model * g.ffn_hidden_size * g.num_experts for g in model.moe.groups) * model.num_moe_layers
    dense = model.num_params() - experts
    # Experts are stored unpadded: init generates exactly the elements the planner counts.
    assert generated == planned.param_elems
    dense_held = planned.param_elems - planned.expert_elems
    assert 0 < planned.expert_elems <= experts / 8 / (dp_shard // 8)
    assert dense_held <= dense / dp_shard * 1.01
    assert generated < model.num_params() / dp_shard * 1.01


def test_fill_indexed_writes_any_sub_block():
    """A block of a tensor (rows 1 and 3, columns 0, 2, 4 of a 4 x 5 tensor) drawn on its own,
    e.g. one expert's slice of a packed stack, equals that block of the whole tensor."""
    from mohge.model.init import fill_indexed

    key, whole = param_key("layers.0.ffn.experts.groups.1.w1", 7), torch.empty(4, 5)
    fill_indexed(whole, key, 0.02, (4, 5), [torch.arange(4), torch.arange(5)])
    block = torch.empty(2, 3)
    assert fill_indexed(block, key, 0.02, (4, 5), [torch.tensor([1, 3]), torch.tensor([0, 2, 4])]) == 6
    assert torch.equal(block, whole[[1, 3]][:, [0, 2, 4]])
