"""ParallelDims: the degrees of every dimension, checked against the world size up front, and the
named DeviceMeshes built from them.

Rank layout, outermost to innermost: pp, dp_replicate, dp_shard, tp. Expert parallel is carved
out of the data-parallel ranks: the flattened dp index d = dp_replicate_i * dp_shard + dp_shard_i
splits as d = edp_i * ep + ep_i, so the expert mesh is (pp, edp, ep, tp) over the same ranks.
The edp dimension is itself split as (edp_replicate, edp_shard): routed experts are sharded (FSDP)
over edp_shard and replicated over edp_replicate, see `edp_shard`.

MoE parallel folding (`moe_fold`, arXiv 2504.14960; megatron-core's expert_tensor_parallel_size=1
with its expert RankGenerator): the routed experts use expert-tp 1 and the folded index
f = d * tp + tp_i (contiguous ranks of a pipeline stage) splits as f = edp_i * ep + ep_i, so ep
may exceed the data-parallel degree. The expert mesh is (pp, edp_replicate, edp_shard, ep, etp)
with etp = tp unfolded (experts replicated over tp) and 1 folded.
"""

from __future__ import annotations

from dataclasses import dataclass

from mohge.model.config import ConfigError
from mohge.parallel.config import ParallelConfig


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    tp: int
    pp: int
    ep: int
    world_size: int
    moe_fold: bool = False  # ep over tp x dp ranks (expert tp = 1), see the module docstring

    @classmethod
    def from_config(cls, cfg: ParallelConfig, world_size: int) -> "ParallelDims":
        cfg = cfg.resolved(world_size)
        cfg.validate()
        dims = cls(cfg.dp_replicate, cfg.dp_shard, cfg.tp, cfg.pp, cfg.ep, world_size, cfg.moe_fold)
        dims.validate()
        return dims

    def validate(self) -> None:
        product = self.dp_replicate * self.dp_shard * self.tp * self.pp
        if product != self.world_size:
            others = self.world_size // (self.tp * self.pp) if self.world_size % (self.tp * self.pp) == 0 else None
            hint = (
                f"; e.g. parallel.dp_shard={others // self.dp_replicate}"
                if others and others % self.dp_replicate == 0
                else f"; the world size {self.world_size} must be divisible by tp*pp={self.tp * self.pp}"
            )
            raise ConfigError(
                f"parallel: dp_replicate({self.dp_replicate}) x dp_shard({self.dp_shard}) x tp({self.tp}) x "
                f"pp({self.pp}) = {product}, but the job has {self.world_size} processes{hint}"
            )
        if self.moe_fold and self.expert_width % self.ep != 0:
            raise ConfigError(
                f"parallel.ep: {self.ep} must divide dp_replicate x dp_shard x tp = {self.expert_width} with "
                f"parallel.moe_fold=true (experts are spread over tp x dp ranks); valid: "
                f"{[d for d in _divisors(self.expert_width) if d > 1]}"  # folding needs ep > 1
            )
        if self.dp % self.ep != 0 and not self.moe_fold:
            fold = (f", or set parallel.moe_fold=true to spread experts over tp x dp = {self.dp * self.tp} ranks"
                    if self.tp > 1 and (self.dp * self.tp) % self.ep == 0 else "")
            raise ConfigError(
                f"parallel.ep: {self.ep} must divide the data-parallel degree dp_replicate x dp_shard = "
                f"{self.dp} (experts are spread over data-parallel ranks); valid: {_divisors(self.dp)}{fold}"
            )

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def etp(self) -> int:
        """Expert tensor parallel: tp unfolded (each tp rank computes the same experts), 1 folded."""
        return 1 if self.moe_fold else self.tp

    @property
    def expert_width(self) -> int:
        """Ranks of one pipeline stage the expert layout (edp x ep) spreads over: dp, or dp x tp folded."""
        return self.dp * self.tp // self.etp

    @property
    def edp(self) -> int:
        """Data-parallel replicas of each expert."""
        return self.expert_width // self.ep

    @property
    def edp_shard(self) -> int:
        """Ranks each routed expert's weights, gradients and optimizer states are sharded over.

        Like the dense weights they are sharded only when dp_shard > 1: over the dp_shard ranks
        that hold the same experts (dp_shard / ep, replicated over dp_replicate: HSDP) when ep
        divides dp_shard, else over all their replicas (ep then spans dp_replicate groups).
        Folded, dp_shard x tp takes the place of dp_shard."""
        if self.dp_shard == 1:
            return 1
        shard_width = self.dp_shard * self.tp // self.etp  # folded: the dp_shard x tp ranks of a replica
        return shard_width // self.ep if shard_width % self.ep == 0 else self.edp

    @property
    def edp_replicate(self) -> int:
        """Whole-expert replicas left over edp_shard (their gradients are all-reduced)."""
        return self.edp // self.edp_shard

    def coords(self, rank: int) -> dict[str, int]:
        """This rank's index along every named dimension."""
        tp_i = rank % self.tp
        dp_i = (rank // self.tp) % self.dp
        pp_i = rank // (self.tp * self.dp)
        f = dp_i * self.tp + tp_i if self.moe_fold else dp_i  # index over the expert layout's ranks
        edp_i = f // self.ep
        return {
            "pp": pp_i,
            "dp": dp_i,
            "dp_replicate": dp_i // self.dp_shard,
            "dp_shard": dp_i % self.dp_shard,
            "tp": tp_i,
            "ep": f % self.ep,
            "edp": edp_i,
            "edp_replicate": edp_i // self.edp_shard,
            "edp_shard": edp_i % self.edp_shard,
        }

    def build_meshes(self, device_type: str):
        """(dense mesh (pp, dp_replicate, dp_shard, tp), expert mesh (pp, edp_replicate, edp_shard,
        ep, etp)); flatten (edp_replicate, edp_shard) for the whole edp group."""
        from torch.distributed.device_mesh import init_device_mesh

        dense = init_device_mesh(
            device_type,
            (self.pp, self.dp_replicate, self.dp_shard, self.tp),
            mesh_dim_names=("pp", "dp_replicate", "dp_shard", "tp"),
        )
        expert = init_device_mesh(
            device_type,
            (self.pp, self.edp_replicate, self.edp_shard, self.ep, self.etp),
            mesh_dim_names=("pp", "edp_replicate", "edp_shard", "ep", "etp"),
        )
        return dense, expert
