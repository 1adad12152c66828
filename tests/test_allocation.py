"""The all-size group-decoupling allocator, the group-coupled baseline and mohge-plan."""

from __future__ import annotations

import json

import pytest
from conftest import make_moe

from mohge.model.config import ConfigError, ExpertGroupConfig
from mohge.parallel.allocation import allocate, flop_imbalance, rank_flops
from mohge.parallel.plan_cli import main as plan_main
from mohge.train.hydra_config import compose_config


@pytest.fixture(scope="module")
def moe_3b():
    return compose_config("mohge_3b").model.moe


@pytest.mark.parametrize("ep", [1, 2, 4, 8])
def test_all_size_gives_every_rank_every_size(moe_3b, ep):
    p = allocate(moe_3b, ep, "all_size")
    for r in range(ep):
        assert p.local_counts(r) == [8 // ep] * 8
    params = [row.params for row in p.summary(1024)]
    assert len(set(params)) == 1
    assert p.imbalance() == pytest.approx(1.0)
    # Balanced whatever the group traffic, since every rank holds every group alike.
    assert p.imbalance(group_traffic=[0.3, 0.2, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05]) == pytest.approx(1.0)


@pytest.mark.parametrize("ep", [16, 32])
def test_all_size_pairs_narrow_with_wide_when_ep_exceeds_group(moe_3b, ep):
    p = allocate(moe_3b, ep, "all_size")
    totals = {sum(p.widths[g] * n for g, n in enumerate(p.local_counts(r))) for r in range(ep)}
    assert totals == {8 * sum(p.widths) // ep}  # every rank's total width equal
    assert all(p.num_local(r) == 64 // ep for r in range(ep))


def test_one_expert_per_rank_reports_residual_imbalance(moe_3b):
    p = allocate(moe_3b, 64, "all_size")
    assert p.imbalance() == pytest.approx(1280 / (sum(p.widths) / 8))  # widest / mean width


def test_group_coupled_shows_the_imbalance(moe_3b):
    p = allocate(moe_3b, 8, "group_coupled")
    assert [p.local_counts(r) for r in range(2)] == [[8, 0, 0, 0, 0, 0, 0, 0], [0, 8, 0, 0, 0, 0, 0, 0]]
    assert p.imbalance() == pytest.approx(1280 / 832)
    assert p.imbalance() > 1.3


def test_odd_group_count_and_uneven_widths():
    moe = make_moe(groups=[ExpertGroupConfig(2, 100), ExpertGroupConfig(2, 300), ExpertGroupConfig(2, 200)])
    p = allocate(moe, 2, "all_size")
    assert p.local_counts(0) == p.local_counts(1) == [1, 1, 1]
    q = allocate(moe, 6, "all_size")  # one expert per rank: only the widths differ
    assert q.imbalance() == pytest.approx(300 / 200)


def test_impossible_ep_names_working_sizes():
    moe = make_moe()  # 3 groups x 4 experts
    with pytest.raises(ConfigError, match=r"parallel.ep: 5 .* EP sizes that work for these groups: \[1, 2, 4, 12\]"):
        allocate(moe, 5)
    with pytest.raises(ConfigError, match="group 0 has 4 experts"):
        allocate(moe, 6)


def test_local_slots_are_ordered_by_global_id(moe_3b):
    for strategy in ("all_size", "group_coupled"):
        p = allocate(moe_3b, 16, strategy)
        for r in range(16):
            local = p.local_experts(r)
            assert local == sorted(local)
            assert [p.slot_of[e] for e in local] == list(range(len(local)))
        assert sorted(e for r in range(16) for e in p.local_experts(r)) == list(range(64))


def test_measured_rank_flops():
    moe = make_moe()  # widths 8/16/24, 4 experts each
    p = allocate(moe, 2, "group_coupled")  # rank 0: experts 0-5, rank 1: 6-11
    tokens = [1] * 12
    flops = rank_flops(p, tokens, d_model=2)
    assert flops == [18 * 2 * (4 * 8 + 2 * 16), 18 * 2 * (2 * 16 + 4 * 24)]
    assert flop_imbalance(p, tokens, 2) == pytest.approx(max(flops) / (sum(flops) / 2))


def test_plan_cli_json_for_3b(capsys):
    assert plan_main(["--config-name", "mohge_3b", "--json", *sum((["--ep", str(e)] for e in (4, 8, 16, 32, 64)), [])]) == 0
    out = json.loads(capsys.readouterr().out)
    plans = {(p["ep"], p["allocation"]): p for p in out["plans"]}
    assert len(plans) == 10
    assert plans[(8, "all_size")]["traffic"]["uniform"]["flop_imbalance"] == pytest.approx(1.0)
    assert plans[(8, "group_coupled")]["traffic"]["uniform"]["flop_imbalance"] > 1.5
    ranks = plans[(16, "all_size")]["traffic"]["uniform"]["ranks"]
    assert len(ranks) == 16 and all(r["a2a_bytes"] > 0 for r in ranks)


def test_plan_cli_table_and_bad_args(capsys):
    assert plan_main(["--config-name", "tiny_mohge", "--ep", "2", "--group-traffic", "0.5,0.3,0.2"]) == 0
    assert "skewed group traffic" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        plan_main(["--ep", "8", "--group-traffic", "0.5,0.1"])  # does not sum to 1
    assert plan_main(["--config-name", "tiny_mohge", "--ep", "2", "--group-traffic", "0.5,0.5"]) == 2
    assert "3 groups" in capsys.readouterr().err
    assert plan_main(["--config-name", "mohge_3b", "--ep", "3"]) == 2
