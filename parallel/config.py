"""Parallel layout config: the degrees of each dimension. Runtime objects (meshes) live elsewhere."""

from __future__ import annotations

from dataclasses import dataclass, replace

from mohge.model.config import ConfigError

PP_SCHEDULES = ("1f1b", "interleaved_1f1b", "gpipe")
ACTIVATION_CHECKPOINT = ("none", "selective", "full")


@dataclass
class ParallelConfig:
    """Degrees multiply to the world size: dp_replicate * dp_shard * tp * pp.

    `dp_shard=-1` (the default) is inferred from the world size, as torchtitan does and as
    Megatron infers its data-parallel degree; every other degree is given.

    Expert parallel (ep) is carved out of the data-parallel ranks (ep divides dp_replicate x
    dp_shard, see ParallelDims), as large MoE frameworks do; with `moe_fold` out of the tensor- and
    data-parallel ranks together (ep divides dp x tp; MoE parallel folding, arXiv 2504.14960).
    """

    dp_replicate: int = 1
    dp_shard: int = -1  # -1: what is left of the world size after dp_replicate x tp x pp (see resolved)
    tp: int = 1
    sequence_parallel: bool = True  # with tp > 1, also shard norms/dropout regions over sequence
    pp: int = 1
    pp_schedule: str = "1f1b"
    pp_virtual_stages: int = 1  # stages per pp rank (interleaved schedules use > 1)
    pp_layer_split: list[int] | None = None  # layers per stage; None: as even as possible
    ep: int = 1
    activation_checkpoint: str = "none"
    backend: str = "auto"  # "auto": nccl on CUDA, gloo on CPU
    timeout_s: float = 600.0  # collective timeout of mohge's process groups (train/watchdog.py)
    cp: int = 1  # context parallel: data-parallel ranks that split each sequence between them
    moe_fold: bool = False  # MoE parallel folding: ep spans tp x dp ranks, expert tp = 1 (parallel/moe_folding.py)
    cp_comm: str = "ring"  # context parallel attention: "ring" (p2p key/value blocks) | "all_gather"

    def resolved(self, world_size: int) -> "ParallelConfig":
        """A copy with dp_shard=-1 replaced by world_size / (dp_replicate x tp x pp)."""
        if self.dp_shard != -1:
            return self
        self.validate()
        others = self.dp_replicate * self.tp * self.pp
        if world_size % others:
            raise ConfigError(f"parallel.dp_shard=-1: the world size {world_size} is not divisible by dp_replicate "
                              f"x tp x pp = {others}; change those degrees or the number of processes")
        return replace(self, dp_shard=world_size // others)

    def validate(self) -> None:
        if self.dp_shard == 0 or self.dp_shard < -1:
            raise ConfigError(f"parallel.dp_shard: must be >= 1, or -1 to infer it (got {self.dp_shard})")
        for name in ("dp_replicate", "tp", "pp", "ep", "pp_virtual_stages"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel.{name}: must be >= 1 (got {getattr(self, name)})")
        if self.pp_schedule not in PP_SCHEDULES:
            raise ConfigError(f"parallel.pp_schedule: must be one of {PP_SCHEDULES}")
        if self.pp_virtual_stages > 1 and self.pp_schedule != "interleaved_1f1b":
            raise ConfigError(f"parallel.pp_virtual_stages: {self.pp_schedule} runs one stage per rank; use "
                              "parallel.pp_schedule=interleaved_1f1b for virtual stages")
        if self.activation_checkpoint not in ACTIVATION_CHECKPOINT:
            raise ConfigError(f"parallel.activation_checkpoint: must be one of {ACTIVATION_CHECKPOINT}")
        if self.moe_fold:
            self.validate_moe_fold()

    def validate_moe_fold(self) -> None:
        """Folding spreads experts over the tensor-parallel ranks' distinct sequence shards."""
        fix = "or set parallel.moe_fold=false"
        if self.tp == 1:
            raise ConfigError(f"parallel.moe_fold=true: folds expert parallel over tensor-parallel ranks and does "
                              f"nothing with parallel.tp=1; set parallel.tp > 1 {fix}")
        if not self.sequence_parallel:
            raise ConfigError(f"parallel.moe_fold=true: needs parallel.sequence_parallel=true (each tp rank must hold "
                              f"distinct tokens at the MoE layer); set it {fix}")
        if self.ep == 1:
            raise ConfigError(f"parallel.moe_fold=true: needs parallel.ep > 1 (experts spread over tp x dp ranks); "
                              f"set parallel.ep {fix}")
        if self.cp > 1:
            raise ConfigError(f"parallel.moe_fold=true: not supported with parallel.cp > 1 yet; "
                              f"set parallel.cp=1 {fix}")

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.tp * self.pp
