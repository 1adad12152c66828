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
