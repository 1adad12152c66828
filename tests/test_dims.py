"""ParallelDims: layouts checked against the world size before any work, with the fix named."""

from __future__ import annotations

import pytest

from mohge.model.config import ConfigError
from mohge.parallel.config import ParallelConfig
from mohge.parallel.dims import ParallelDims


def test_degrees_must_multiply_to_world_size():
    with pytest.raises(ConfigError, match=r"= 2, but the job has 4 processes; e.g. parallel.dp_shard=2"):
        ParallelDims.from_config(ParallelConfig(dp_shard=1, tp=2), 4)


def test_ep_must_divide_data_parallel_degree():
    with pytest.raises(ConfigError, match=r"parallel.ep: 4 must divide .* = 2 .* valid: \[1, 2\]"):
        ParallelDims.from_config(ParallelConfig(dp_shard=2, tp=2, ep=4), 4)


def test_bad_degree_and_schedule_named():
    with pytest.raises(ConfigError, match="parallel.tp"):
        ParallelDims.from_config(ParallelConfig(tp=0), 1)
    with pytest.raises(ConfigError, match="parallel.pp_schedule"):
        ParallelDims.from_config(ParallelConfig(pp_schedule="zigzag"), 1)


def test_coords_cover_every_rank_once():
    dims = ParallelDims.from_config(ParallelConfig(dp_replicate=2, dp_shard=2, tp=2, pp=2, ep=2), 16)
    seen = {tuple(dims.coords(r)[k] for k in ("pp", "dp_replicate", "dp_shard", "tp")) for r in range(16)}
    assert len(seen) == 16
    c = dims.coords(13)  # 13 = pp 1, dp 2 (replicate 1, shard 0), tp 1
    assert (c["pp"], c["dp"], c["dp_replicate"], c["dp_shard"], c["tp"]) == (1, 2, 1, 0, 1)
    assert (c["ep"], c["edp"]) == (0, 1)


def test_expert_shard_degrees_and_mesh_order():
    """Routed experts shard over edp_shard (dp_shard / ep when ep divides it, else all edp
    replicas; 1 without dp_shard), and the expert mesh (pp, edp_replicate, edp_shard, ep, tp)
    enumerates ranks in the same order as the coordinates."""
    cases = {(1, 4, 2): (2, 1), (2, 4, 2): (2, 2), (4, 2, 4): (2, 1), (2, 2, 2): (1, 2), (4, 1, 2): (1, 2),
             (1, 4, 1): (4, 1)}
    for (rep, shard, ep), (edp_shard, edp_replicate) in cases.items():
        for tp, pp in ((1, 1), (2, 2)):
            world = rep * shard * tp * pp
            dims = ParallelDims.from_config(ParallelConfig(dp_replicate=rep, dp_shard=shard, ep=ep, tp=tp, pp=pp), world)
            assert (dims.edp_shard, dims.edp_replicate) == (edp_shard, edp_replicate)
            for rank in range(world):
                c = dims.coords(rank)
                flat = (((c["pp"] * edp_replicate + c["edp_replicate"]) * edp_shard + c["edp_shard"]) * ep + c["ep"]) * tp
                assert flat + c["tp"] == rank


def test_moe_fold_lets_ep_exceed_data_parallel_degree():
    """Folded, ep spreads over tp x dp ranks (tp2 x dp2 with ep4): each rank holds distinct
    experts, the expert mesh (pp, edp_replicate, edp_shard, ep, etp=1) enumerates ranks in order,
    and the unfolded error names the fold as a fix."""
    with pytest.raises(ConfigError, match=r"valid: \[1, 2\], or set parallel.moe_fold=true"):
        ParallelDims.from_config(ParallelConfig(dp_shard=2, tp=2, ep=4), 4)
    cases = {(1, 2, 2, 4): (1, 1), (1, 1, 2, 2): (1, 1), (1, 2, 2, 2): (2, 1), (2, 2, 2, 2): (2, 2),
             (2, 1, 2, 2): (1, 2), (2, 2, 2, 8): (1, 1)}
    for (rep, shard, tp, ep), (edp_shard, edp_replicate) in cases.items():
        for pp in (1, 2):
            world = rep * shard * tp * pp
            dims = ParallelDims.from_config(
                ParallelConfig(dp_replicate=rep, dp_shard=shard, tp=tp, pp=pp, ep=ep, moe_fold=True), world)
            assert (dims.etp, dims.edp_shard, dims.edp_replicate) == (1, edp_shard, edp_replicate)
            seen = set()
            for rank in range(world):
                c = dims.coords(rank)
                flat = ((c["pp"] * edp_replicate + c["edp_replicate"]) * edp_shard + c["edp_shard"]) * ep + c["ep"]
                assert flat == rank
                seen.add((c["pp"], c["ep"], c["edp"]))
            assert len(seen) == world
    with pytest.raises(ConfigError,  # ep=1 is no fold, so not offered
                       match=r"parallel.ep: 3 must divide dp_replicate x dp_shard x tp = 4 .*valid: \[2, 4\]$"):
        ParallelDims.from_config(ParallelConfig(dp_shard=2, tp=2, ep=3, moe_fold=True), 4)


@pytest.mark.parametrize("overrides, message", [
    (dict(tp=1, ep=2), "does nothing with parallel.tp=1"),
    (dict(tp=2, ep=2, sequence_parallel=False), "needs parallel.sequence_parallel=true"),
    (dict(tp=2, ep=1), "needs parallel.ep > 1"),
    (dict(tp=2, ep=2, cp=2), "not supported with parallel.cp > 1"),
])
def test_moe_fold_bad_combinations_named(overrides, message):
    with pytest.raises(ConfigError, match=r"parallel.moe_fold=true: .*" + message + r".*moe_fold=false"):
        ParallelConfig(dp_shard=2, moe_fold=True, **overrides).validate()
