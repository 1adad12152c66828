"""The root run config and the training loop's own configs; registered with Hydra as the schema."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from mohge.data.config import DataConfig
from mohge.model.config import ConfigError, ModelConfig
from mohge.parallel.config import ParallelConfig

PRECISIONS = ("auto", "fp32", "bf16")
FP8_BACKENDS = ("none", "te", "torchao")


@dataclass
class TrainConfig:
    steps: int = 100
    seed: int = 1234
    seq_len: int = 128
    micro_batch_size: int = 8  # sequences per micro-batch per data-parallel rank
    global_batch_size: int = 8  # sequences per optimizer step over all data-parallel ranks
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 10
    lr_decay_steps: Optional[int] = None  # cosine reaches its floor here; None: train.steps
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    fp8: str = "none"  # "none" | "te" | "torchao"
    fp8_recipe: str = "delayed"  # TE recipe: delayed | current | block | mxfp8
    fp8_experts: bool = False  # torchao: routed experts' grouped GEMMs in float8 too (prototype)
    device: str = "auto"  # auto | cpu | cuda
    eval_every: int = 50  # 0 disables validation
    eval_iters: int = 4  # validation steps of global_batch_size sequences each (same set in every layout)
    log_every: int = 10
    compile: bool = False
    max_bad_steps: int = 3  # consecutive non-finite steps before the run stops
    compile_backend: str = "inductor"  # torch.compile backend of train.compile (aot_eager / eager: debugging)
    loss_chunk_tokens: int = 0  # > 0: output projection + CE this many tokens at a time (no whole logits)


@dataclass
class CheckpointConfig:
    every: int = 0  # save every N steps (0: only at the end)
    keep: int = 2  # keep the last K checkpoints
    resume: Optional[str] = None  # None: fresh start; "auto": latest in out_dir; or a path
    save_final: bool = True
    async_save: bool = False


@dataclass
class LoggingConfig:
    jsonl: bool = True  # metrics.jsonl in out_dir, always on by default
    tensorboard: bool = False
    wandb: bool = False
    wandb_mode: str = "offline"
    wandb_project: str = "mohge"
    progress: bool = True  # progress bar on rank 0


@dataclass
class RunConfig:
    out_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self) -> None:
        """Fail at start-up, naming the field, on any combination that cannot run."""
        self.model.validate()
        self.parallel.validate()
        p = self.parallel
        if p.pp > 1:
            n_micro = self.grad_accum_steps if self.train.global_batch_size % (
                self.train.micro_batch_size * p.dp_replicate * p.dp_shard) == 0 else 0
            if self.model.tie_embeddings:
                raise ConfigError("model.tie_embeddings: not supported with parallel.pp > 1; set it to false")
            if n_micro and n_micro < p.pp * p.pp_virtual_stages and p.pp_schedule != "gpipe":
                raise ConfigError(f"train.global_batch_size: {n_micro} micro-batches per step is fewer than the "
                                  f"{p.pp * p.pp_virtual_stages} pipeline stages; raise global_batch_size or lower "
                                  "micro_batch_size")
            if self.model.n_layers < p.pp * p.pp_virtual_stages:
                raise ConfigError(f"parallel.pp: {p.pp} x {p.pp_virtual_stages} virtual stages need at least as many "
                                  f"layers (model.n_layers={self.model.n_layers})")
        tp, m = self.parallel.tp, self.model
        if tp > 1:
            for name, value in (("model.n_heads", m.n_heads), ("model.n_kv_heads", m.n_kv_heads),
                                ("model.ffn_hidden_size", m.ffn_hidden_size), ("model.vocab_size", m.vocab_size)):
                if value % tp:
                    raise ConfigError(f"{name}: {value} must be divisible by parallel.tp={tp}")
            if m.tie_embeddings:
                raise ConfigError("model.tie_embeddings: not supported with parallel.tp > 1; set it to false")
            if self.parallel.sequence_parallel and self.train.seq_len % tp:
                raise ConfigError(f"train.seq_len: {self.train.seq_len} must be divisible by parallel.tp={tp} "
                                  "with sequence parallel (or set parallel.sequence_parallel=false)")
        t = self.train
        if t.steps < 1:
            raise ConfigError("train.steps: must be >= 1")
        if t.seq_len < 1 or t.seq_len > self.model.max_seq_len:
            raise ConfigError(
                f"train.seq_len: {t.seq_len} must lie in 1..model.max_seq_len ({self.model.max_seq_len})"
            )
        if t.micro_batch_size < 1:
            raise ConfigError("train.micro_batch_size: must be >= 1")
        dp = self.parallel.dp_replicate * self.parallel.dp_shard
        if t.global_batch_size % (t.micro_batch_size * dp) != 0:
            raise ConfigError(
                f"train.global_batch_size: {t.global_batch_size} must be a multiple of "
                f"train.micro_batch_size ({t.micro_batch_size}) x data-parallel degree ({dp})"
            )
        if t.precision not in PRECISIONS:
            raise ConfigError(f"train.precision: must be one of {PRECISIONS}")
        if t.fp8 not in FP8_BACKENDS:
            raise ConfigError(f"train.fp8: must be one of {FP8_BACKENDS}")
        if t.fp8 == "te":
            raise ConfigError("train.fp8=te: the Transformer Engine path is not implemented yet; use train.fp8=torchao")
        if t.fp8_experts and t.fp8 != "torchao":
            raise ConfigError(f"train.fp8_experts=true: needs train.fp8=torchao (got train.fp8={t.fp8})")
        if self.checkpoint.keep < 0 or self.checkpoint.every < 0:
            raise ConfigError("checkpoint.every / checkpoint.keep: must be >= 0")
        if t.compile and self.model.moe is not None and self.model.moe.expert_compute == "loop":
            raise ConfigError("train.compile=true: model.moe.expert_compute=loop reads expert counts on the host "
                              "(a graph break); use model.moe.expert_compute=grouped or auto")
        if t.loss_chunk_tokens < 0:
            raise ConfigError("train.loss_chunk_tokens: must be >= 0 (0: whole logits)")
        if t.loss_chunk_tokens and (self.parallel.tp > 1 or self.parallel.pp > 1):
            raise ConfigError("train.loss_chunk_tokens: not supported with parallel.tp > 1 or parallel.pp > 1 yet; "
                              "set it to 0")
        if t.compile and self.parallel.tp > 1:
            raise ConfigError("train.compile=true: not supported with parallel.tp > 1 yet (a DTensor gradient "
                              "leaves the compiled block as a plain tensor); set train.compile=false")
        if t.compile_backend not in ("inductor", "aot_eager", "eager"):
            raise ConfigError("train.compile_backend: must be one of inductor, aot_eager, eager")
        if t.warmup_steps < 0:
            raise ConfigError("train.warmup_steps: must be >= 0")
        if not 0.0 <= t.min_lr_ratio <= 1.0:
            raise ConfigError("train.min_lr_ratio: must lie in [0, 1]")
        if t.log_every < 1:
            raise ConfigError("train.log_every: must be >= 1")

    @property
    def grad_accum_steps(self) -> int:
        dp = self.parallel.dp_replicate * self.parallel.dp_shard
        return self.train.global_batch_size // (self.train.micro_batch_size * dp)
