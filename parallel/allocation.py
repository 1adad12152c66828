"""Expert placement over expert-parallel (EP) ranks.

`all_size` (all-size group decoupling, the default): every EP rank holds experts of every size in
equal measure, so parameters and expected expert FLOPs are equal on every rank. When EP divides a
group's expert count, each rank takes N_g / EP experts of that group. When EP is a multiple of
it (more ranks than experts in a group), ranks take blocks of experts whose widths sum to the same
total (the authors pair the narrowest group with the widest); the residual imbalance is reported.

`group_coupled`: the naive layout earlier heterogeneous MoEs used: experts in global order,
E / EP consecutive experts per rank, so whole groups of one size share a rank.

Global expert ids are numbered group by group. On each rank, local slots are ordered by global
id, so each group's local experts are contiguous (the experts module relies on it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from mohge.model.config import ConfigError, MoEConfig

STRATEGIES = ("all_size", "group_coupled")
FLOPS_PER_TOKEN_WIDTH = 18  # SwiGLU expert, 3 matmuls of D x F: 2 FLOPs x 3 (fwd + bwd) per weight


@dataclass(frozen=True)
class RankSummary:
    rank: int
    experts_per_group: list[int]
    params: int
    flops_share: float  # expected share of the layer's expert FLOPs under the given traffic
    a2a_bytes: Optional[float] = None  # per step, dispatch + combine, forward + backward

    def as_dict(self) -> dict:
        return {
            "rank": self.rank,
            "experts_per_group": self.experts_per_group,
            "params": self.params,
            "flops_share": self.flops_share,
            "a2a_bytes": self.a2a_bytes,
        }


@dataclass(frozen=True)
class Placement:
    ep_size: int
    strategy: str
    rank_of: tuple[int, ...]  # global expert id -> EP rank
    slot_of: tuple[int, ...]  # global expert id -> local slot on its rank
    group_of: tuple[int, ...]  # global expert id -> group
    widths: tuple[int, ...]  # ffn width of each group

    @property
    def num_groups(self) -> int:
        return len(self.widths)

    def group_sizes(self) -> list[int]:
        return [self.group_of.count(g) for g in range(self.num_groups)]

    def local_experts(self, rank: int) -> list[int]:
        """Global ids held by `rank`, in local-slot order (ascending global id)."""
        return sorted(e for e, r in enumerate(self.rank_of) if r == rank)

    def local_counts(self, rank: int) -> list[int]:
        counts = [0] * self.num_groups
        for e in self.local_experts(rank):
            counts[self.group_of[e]] += 1
        return counts

    def num_local(self, rank: int) -> int:
        return self.rank_of.count(rank)

    def expected_load(self, group_traffic: Optional[Sequence[float]] = None) -> list[float]:
        """Per rank: expected expert FLOPs in units of (routed slot x width); traffic t_g is the
        share of routed slots that go to group g, spread evenly over its experts."""
        traffic = _normalise_traffic(group_traffic, self.num_groups)
        sizes = self.group_sizes()
        load = [0.0] * self.ep_size
        for e, r in enumerate(self.rank_of):
            g = self.group_of[e]
            load[r] += traffic[g] / sizes[g] * self.widths[g]
        return load

    def imbalance(self, d_model: int = 1, group_traffic: Optional[Sequence[float]] = None) -> float:
        """max over ranks / mean of expected expert FLOPs (1.0 = perfectly balanced)."""
        return _max_over_mean(self.expected_load(group_traffic))

    def self_share(self, rank: int, group_traffic: Optional[Sequence[float]] = None) -> float:
        """Expected share of a token's routed slots that stay on its own rank."""
        traffic = _normalise_traffic(group_traffic, self.num_groups)
        sizes = self.group_sizes()
        return sum(traffic[self.group_of[e]] / sizes[self.group_of[e]] for e in self.local_experts(rank))

    def summary(
        self,
        d_model: int,
        group_traffic: Optional[Sequence[float]] = None,
        tokens_per_rank: Optional[int] = None,
        top_k: Optional[int] = None,
        bytes_per_elem: int = 2,
    ) -> list[RankSummary]:
        load = self.expected_load(group_traffic)
        total = sum(load) or 1.0
        rows = []
        for r in range(self.ep_size):
            counts = self.local_counts(r)
            params = sum(3 * d_model * self.widths[g] * n for g, n in enumerate(counts))
            a2a = None
            if tokens_per_rank is not None and top_k is not None:
                leaving = 1.0 - self.self_share(r, group_traffic)
                a2a = tokens_per_rank * top_k * d_model * bytes_per_elem * leaving * 2 * 2
            rows.append(RankSummary(r, counts, params, load[r] / total, a2a))
        return rows


def _normalise_traffic(group_traffic: Optional[Sequence[float]], num_groups: int) -> list[float]:
    if group_traffic is None:
        return [1.0 / num_groups] * num_groups
    if len(group_traffic) != num_groups:
        raise ConfigError(f"group_traffic: {len(group_traffic)} values for {num_groups} groups")
    total = float(sum(group_traffic))
    if total <= 0 or any(t < 0 for t in group_traffic):
        raise ConfigError("group_traffic: values must be >= 0 with a positive sum")
    return [t / total for t in group_traffic]


def _max_over_mean(values: Sequence[float]) -> float:
    mean = sum(values) / len(values)
    return max(values) / mean if mean > 0 else 1.0


def valid_ep_sizes(moe: MoEConfig) -> list[int]:
    """EP sizes the all_size allocator accepts for these groups."""
    return [ep for ep in range(1, moe.num_experts + 1) if _ep_problem(moe, ep) is None]


def _ep_problem(moe: MoEConfig, ep: int) -> Optional[str]:
    if moe.num_experts % ep:
        return f"{moe.num_experts} experts in all do not split evenly over {ep} ranks"
    for g, group in enumerate(moe.groups):
        n = group.num_experts
        if n % ep and ep % n:
            return f"group {g} has {n} experts: EP must divide it or be a multiple of it"
    return None


def _finish(moe: MoEConfig, ep: int, strategy: str, rank_of: list[int]) -> Placement:
    slot_of = [0] * len(rank_of)
    for r in range(ep):
        for slot, e in enumerate(sorted(e for e, owner in enumerate(rank_of) if owner == r)):
            slot_of[e] = slot
    return Placement(
        ep_size=ep,
        strategy=strategy,
        rank_of=tuple(rank_of),
        slot_of=tuple(slot_of),
        group_of=tuple(moe.expert_group_ids()),
        widths=tuple(moe.group_widths),
    )


def _all_size(moe: MoEConfig, ep: int) -> list[int]:
    if all(g.num_experts % ep == 0 for g in moe.groups):
        rank_of = []
        for g, group in enumerate(moe.groups):
            per_rank = group.num_experts // ep
            rank_of += [i // per_rank for i in range(group.num_experts)]
        return rank_of
    # More ranks than experts in some group: balance total width per rank with equal expert
    # counts. Widest experts first, each to the least-loaded rank that has room (ties: lowest
    # rank). For widths in arithmetic progression this reproduces the authors' small+large pairs.
    per_rank = moe.num_experts // ep
    widths = [moe.groups[g].ffn_hidden_size for g in moe.expert_group_ids()]
    load, count, rank_of = [0] * ep, [0] * ep, [0] * moe.num_experts
    for e in sorted(range(moe.num_experts), key=lambda e: (-widths[e], e)):
        r = min((r for r in range(ep) if count[r] < per_rank), key=lambda r: (load[r], r))
        rank_of[e] = r
        load[r] += widths[e]
        count[r] += 1
    _improve_by_swaps(rank_of, widths, load)
    return rank_of


def _improve_by_swaps(rank_of: list[int], widths: list[int], load: list[int], rounds: int = 1000) -> None:
    """Swaps one expert of the most- and least-loaded ranks while that lowers the maximum."""
    for _ in range(rounds):
        hi = max(range(len(load)), key=lambda r: (load[r], -r))
        lo = min(range(len(load)), key=lambda r: (load[r], r))
        gap = load[hi] - load[lo]
        best = None
        for a in (e for e, r in enumerate(rank_of) if r == hi):
            for b in (e for e, r in enumerate(rank_of) if r == lo):
                delta = widths[a] - widths[b]
                if 0 < delta < gap and (best is None or abs(gap - 2 * delta) < abs(gap - 2 * best[2])):
                    best = (a, b, delta)
        if best is None:
            return
        a, b, delta = best
        rank_of[a], rank_of[b] = lo, hi
        load[hi] -= delta
        load[lo] += delta


def allocate(moe: MoEConfig, ep_size: int, strategy: Optional[str] = None) -> Placement:
    """Places the layer's experts on `ep_size` ranks; `strategy` defaults to moe.allocation."""
    strategy = strategy or moe.allocation
    if strategy not in STRATEGIES:
        raise ConfigError(f"model.moe.allocation: must be one of {STRATEGIES}, got {strategy!r}")
    if ep_size < 1:
        raise ConfigError(f"parallel.ep: must be >= 1 (got {ep_size})")
    problem = _ep_problem(moe, ep_size)
    if strategy == "group_coupled" and moe.num_experts % ep_size == 0:
        problem = None
    if problem is not None:
        raise ConfigError(
            f"parallel.ep: {ep_size} cannot place the experts ({problem}); "
            f"EP sizes that work for these groups: {valid_ep_sizes(moe)}"
        )
    if strategy == "group_coupled":
        per_rank = moe.num_experts // ep_size
        rank_of = [e // per_rank for e in range(moe.num_experts)]
    else:
        rank_of = _all_size(moe, ep_size)
    return _finish(moe, ep_size, strategy, rank_of)


def rank_flops(placement: Placement, tokens_per_expert: Sequence[float], d_model: int) -> list[float]:
    """Training FLOPs each EP rank spent in its experts, from measured tokens per expert."""
    flops = [0.0] * placement.ep_size
    for e, r in enumerate(placement.rank_of):
        width = placement.widths[placement.group_of[e]]
        flops[r] += float(tokens_per_expert[e]) * FLOPS_PER_TOKEN_WIDTH * d_model * width
    return flops


def flop_imbalance(placement: Placement, tokens_per_expert: Sequence[float], d_model: int) -> float:
    """max over EP ranks / mean of measured expert FLOPs."""
    return _max_over_mean(rank_flops(placement, tokens_per_expert, d_model))
