"""The root run config and the training loop's own configs; registered with Hydra as the schema."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from mohge.data.config import DataConfig
from mohge.model.config import ConfigError, ModelConfig
from mohge.parallel.config import ParallelConfig
from mohge.train.numerics import validate_loss_spike
from mohge.train.watchdog import validate_timeouts

PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
DATA_SOURCES = ("embedded", "megatron", "synthetic")
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
    loss_spike_factor: float = 3.0  # report a loss above this x the running mean (0: off); see train/numerics.py
    loss_spike_window: int = 50  # steps in the running mean of the loss
    loss_spike_skip: bool = False  # also skip a spiking step's update, like a non-finite one
    watchdog_s: float = 1800.0  # end this rank if no step/save/eval finishes for this long (0: off); train/watchdog.py


@dataclass
class CheckpointConfig:
    every: int = 0  # save every N steps (0: only at the end)
    keep: int = 2  # keep the last K checkpoints
    resume: Optional[str] = None  # None: fresh start; "auto": latest in out_dir; or a path
    save_final: bool = True
    async_save: bool = False
    verify: bool = True  # check every file's SHA-256 (stored in meta.json) before loading


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
        """Fail at start-up, naming the field, on any combination that cannot run. An inferred
        parallel.dp_shard (-1) is resolved first from WORLD_SIZE (set by torchrun; 1 otherwise)."""
        if self.parallel.dp_shard == -1:
            self.parallel = self.parallel.resolved(int(os.environ.get("WORLD_SIZE", "1")))
        self.model.validate()
        self.parallel.validate()
        from mohge.parallel.context_parallel import validate_context_parallel

        validate_context_parallel(self)
        p = self.parallel
        if p.pp > 1:
            n_micro = self.grad_accum_steps if self.train.global_batch_size % (
                self.train.micro_batch_size * p.dp_replicate * p.dp_shard // p.cp) == 0 else 0  # cp: same data
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
        dp = self.parallel.dp_replicate * self.parallel.dp_shard // self.parallel.cp  # ranks reading distinct data
        if t.global_batch_size % (t.micro_batch_size * dp) != 0:
            fits = [m for m in range(t.micro_batch_size, 0, -1) if t.global_batch_size % (m * dp) == 0]
            hint = (f"e.g. train.micro_batch_size={fits[0]}" if fits else
                    f"e.g. train.global_batch_size={t.micro_batch_size * dp}")
            raise ConfigError(
                f"train.global_batch_size: {t.global_batch_size} must be a multiple of "
                f"train.micro_batch_size ({t.micro_batch_size}) x data-parallel degree ({dp}); {hint}"
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
                              "(a graph break); use model.moe.expert_compute=auto, ragged or grouped")
        if t.loss_chunk_tokens < 0:
            raise ConfigError("train.loss_chunk_tokens: must be >= 0 (0: whole logits)")
        if t.loss_chunk_tokens and (self.parallel.tp > 1 or self.parallel.pp > 1):
            raise ConfigError("train.loss_chunk_tokens: not supported with parallel.tp > 1 or parallel.pp > 1 yet; "
                              "set it to 0")
        ac = self.parallel.activation_checkpoint
        if t.compile and ac == "selective" and t.compile_backend != "eager":
            # The attention's checkpoint sits inside the compiled block, where aot autograd wants its
            # context_fn (the routing statistics' replay while recomputing) to return TorchDispatchModes.
            # `full` compiles what the checkpoint runs instead (parallel/compile.py).
            raise ConfigError("train.compile=true: not supported with parallel.activation_checkpoint=selective "
                              "yet (torch.compile refuses the checkpointed region); use "
                              "parallel.activation_checkpoint=full or none")
        if t.compile_backend not in ("inductor", "aot_eager", "eager"):
            raise ConfigError("train.compile_backend: must be one of inductor, aot_eager, eager")
        if t.warmup_steps < 0:
            raise ConfigError("train.warmup_steps: must be >= 0")
        if not 0.0 <= t.min_lr_ratio <= 1.0:
            raise ConfigError("train.min_lr_ratio: must lie in [0, 1]")
        if t.log_every < 1:
            raise ConfigError("train.log_every: must be >= 1")
        validate_loss_spike(t)
        validate_timeouts(self.parallel.timeout_s, t.watchdog_s)
        self.validate_more()

    def validate_more(self) -> None:
        """Numbers that must be positive, names that must exist, and options that would do nothing."""
        t, d = self.train, self.data
        checks = [
            (t.global_batch_size >= 1, "train.global_batch_size", f"must be >= 1 (got {t.global_batch_size})"),
            (t.lr > 0, "train.lr", f"must be > 0 (got {t.lr})"),
            (t.weight_decay >= 0, "train.weight_decay", f"must be >= 0 (got {t.weight_decay})"),
            (0 <= t.beta1 < 1 and 0 <= t.beta2 < 1, "train.beta1/beta2", f"must lie in [0, 1) (got {t.beta1}, {t.beta2})"),
            (t.eps > 0, "train.eps", f"must be > 0 (got {t.eps})"),
            (t.grad_clip >= 0, "train.grad_clip", f"must be >= 0, 0 disables clipping (got {t.grad_clip})"),
            (t.eval_every >= 0, "train.eval_every", f"must be >= 0, 0 disables validation (got {t.eval_every})"),
            (t.eval_iters >= 1 or t.eval_every == 0, "train.eval_iters",
             f"must be >= 1 when train.eval_every > 0 (got {t.eval_iters}); or set train.eval_every=0"),
            (t.max_bad_steps >= 1, "train.max_bad_steps", f"must be >= 1 (got {t.max_bad_steps})"),
            (t.lr_decay_steps is None or t.lr_decay_steps >= 1, "train.lr_decay_steps",
             f"must be >= 1 or null (got {t.lr_decay_steps})"),
            (t.device in DEVICES, "train.device", f"unknown device {t.device!r}; use one of {DEVICES}"),
            (bool(str(self.out_dir).strip()), "out_dir", "is empty; give out_dir=PATH"),
            (d.source in DATA_SOURCES, "data.source", f"unknown source {d.source!r}; use data=embedded|megatron|synthetic"),
            (d.num_workers >= 0, "data.num_workers", f"must be >= 0 (got {d.num_workers})"),
        ]
        for ok, name, problem in checks:
            if not ok:
                raise ConfigError(f"{name}: {problem}")
        if d.source != "megatron":  # these would be silently ignored
            for name, value in (("tokenizer", d.tokenizer), ("prefixes", d.prefixes), ("weights", d.weights)):
                if value:
                    raise ConfigError(f"data.{name}: only read with data=megatron (this run uses data={d.source}); "
                                      f"add data=megatron to the command line or drop data.{name}")
        else:
            if not d.prefixes:
                raise ConfigError("data.prefixes: empty; give data.prefixes=[PREFIX,...] (see mohge-preprocess)")
            if d.weights and len(d.weights) != len(d.prefixes):
                raise ConfigError(f"data.weights: {len(d.weights)} weights for {len(d.prefixes)} prefixes; give one "
                                  "per prefix")
            if any(w < 0 for w in d.weights) or (d.weights and sum(d.weights) <= 0):
                raise ConfigError(f"data.weights: {list(d.weights)} must be >= 0 with a positive sum")
        if d.source == "embedded":
            from mohge.data.embedded import VOCAB_SIZE

            if self.model.vocab_size < VOCAB_SIZE:
                raise ConfigError(f"model.vocab_size: {self.model.vocab_size} is smaller than the embedded corpus's "
                                  f"tokenizer ({VOCAB_SIZE} tokens); set model.vocab_size={VOCAB_SIZE} or use "
                                  "data=synthetic")
        if d.source != "embedded" and d.embedded_dir:
            raise ConfigError(f"data.embedded_dir: only read with data=embedded (this run uses data={d.source}); drop it")
        split = str(d.split).split(",")
        if len(split) != 3 or not all(x.strip().replace(".", "", 1).isdigit() for x in split) or \
                sum(float(x) for x in split) <= 0:
            raise ConfigError(f"data.split: {d.split!r} must be three non-negative shares, e.g. data.split=969,30,1")

    def layout_line(self) -> str:
        """The resolved layout in one line (for --print-config and the start-up banner)."""
        p, t = self.parallel, self.train
        return (f"world {p.world_size} = dp_replicate {p.dp_replicate} x dp_shard {p.dp_shard} x tp {p.tp} x pp {p.pp}; "
                f"ep {p.ep}; global batch {t.global_batch_size} = micro {t.micro_batch_size} x dp "
                f"{p.dp_replicate * p.dp_shard}{f' / cp {p.cp}' if p.cp > 1 else ''} x accumulation "
                f"{self.grad_accum_steps}")  # cp ranks of a group read the same sequences

    @property
    def grad_accum_steps(self) -> int:
        dp = self.parallel.dp_replicate * self.parallel.dp_shard // self.parallel.cp  # ranks reading distinct data
        return self.train.global_batch_size // (self.train.micro_batch_size * dp)
