"""The training loop: config -> mesh -> model (meta) -> parallelize -> init -> data -> steps.

One optimizer step = `grad_accum_steps` micro-batches per data-parallel rank. Each micro-batch
backpropagates its own mean loss; gradients are then divided by the number of micro-batches and
averaged over data-parallel ranks, so every layout computes the gradient of the same global batch.
"""

from __future__ import annotations

import os
import time
from functools import partial
from pathlib import Path
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mohge.model.moe.layer import recording_suspended, set_group_aux_active
from mohge.model.transformer import build_model
from mohge.parallel.data_parallel import reshard
from mohge.parallel.dims import ParallelDims
from mohge.parallel.tensor_parallel import loss_context
from mohge.parallel.reduce import reduce_scalars
from mohge.parallel.grads import clip_gradients, global_grad_norm, sync_gradients
from mohge.parallel.parallelize import ParallelContext, parallelize_model, scalar
from mohge.train.balancing import BalanceHook
from mohge.train.checkpoint import resume_checkpoint, save_checkpoint
from mohge.train.config import RunConfig
from mohge.train.errors import ConfigError
from mohge.train.metrics import MetricsLogger
from mohge.train.moe_metrics import collect_moe_metrics, weighted_aux_total
from mohge.train.numerics import DivergenceError, LossGuard, divergence_message
from mohge.train.optim import build_optimizer, lr_at, set_lr
from mohge.train.preemption import INTERRUPT_EXIT_CODE, REQUEUE_EXIT_CODE, PreemptionHandler
from mohge.train.runlock import acquire_run_lock
from mohge.train.watchdog import Watchdog, collective_timeout
from mohge.train.throughput import device_peak_tflops, measured_group_fractions, throughput


@dataclass
class TrainResult:
    steps: int
    losses: list[float] = field(default_factory=list)  # lm loss per step
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    skipped_steps: int = 0


def resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("train.device: cuda but no CUDA device is visible; use train.device=cpu")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """bf16 autocast on CUDA (precision=auto or bf16), none (fp32) otherwise."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def resolve_expert_compute(setting: str, device: torch.device, moe=None, d_model: int = 0) -> str:
    """`auto`: see mohge.model.moe.experts.resolve_auto (ragged on the CPU; elsewhere grouped where
    its alignment allows, else ragged)."""
    from mohge.model.moe.experts import resolve_auto

    if setting != "auto":
        return setting
    return resolve_auto(device.type, [g.ffn_hidden_size for g in moe.groups] if moe else None, d_model)


def lm_loss(logits_BSV: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits_BSV.float().flatten(0, 1), labels_BS.flatten())


def init_distributed(cfg: RunConfig) -> tuple[ParallelContext, torch.device]:
    """Starts torch.distributed when launched by torchrun and checks the layout before any work."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dims = ParallelDims.from_config(cfg.parallel, world)  # fails with a clear message first
    device = resolve_device(cfg.train.device, local_rank)
    ctx = ParallelContext(dims=dims, rank=rank, device=device)
    if world > 1:
        backend = cfg.parallel.backend
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None,
                                    timeout=collective_timeout(cfg.parallel.timeout_s))
        ctx.dense_mesh, ctx.expert_mesh = dims.build_meshes(device.type)
    return ctx, device


def build_parallel_model(cfg: RunConfig, ctx: ParallelContext, device: torch.device) -> nn.Module:
    compute = resolve_expert_compute(cfg.model.moe.expert_compute, device, cfg.model.moe, cfg.model.d_model)
    model = build_model(cfg.model, "meta", expert_compute=compute)
    model.loss_chunk_tokens = cfg.train.loss_chunk_tokens
    model = parallelize_model(model, ctx, cfg)
    if cfg.parallel.cp > 1:
        from mohge.parallel.context_parallel import apply_context_parallel, build_cp_group

        apply_context_parallel(model, build_cp_group(ctx.dims, ctx.rank, cfg.parallel.cp), cfg.train.seq_len,
                               cfg.parallel.cp_comm)
    model.to_empty(device=device)
    model.init_weights(cfg.train.seed)
    return model


def status_line(step: int, total: int, m: dict) -> str:
    groups = ""
    layers = list(m.get("moe", {}).values())
    if layers:
        last = layers[-1]["group_fraction"]
        groups = " groups[" + " ".join(f"{f:.2f}" for f in last) + "]"
    return (
        f"step {step:>5}/{total} loss {m['loss']:.4f} lm {m['lm_loss']:.4f} lr {m['lr']:.2e} "
        f"gnorm {m['grad_norm']:.3f} tok/s {m['tokens_per_s']:.0f}"
        + (f" mfu {m['mfu']:.1%}" if "mfu" in m else "") + groups
    )


def build_data_source(cfg: RunConfig, ctx: ParallelContext):
    """The configured token source, reading only this data-parallel rank's share."""
    t, cp = cfg.train, cfg.parallel.cp  # the ranks of a cp group read the same sequences
    if cfg.data.source == "synthetic":
        from mohge.data.synthetic import SyntheticData

        return SyntheticData(cfg.model.vocab_size, t.seq_len, t.micro_batch_size, t.seed, ctx.dp_rank // cp,
                             ctx.dims.dp // cp)
    from mohge.data.loader import build_data

    return build_data(
        cfg.data,
        seq_len=t.seq_len,
        micro_batch_size=t.micro_batch_size,
        seed=t.seed,
        out_dir=cfg.out_dir,
        model_vocab_size=cfg.model.vocab_size,
        dp_rank=ctx.dp_rank // cp,
        dp_size=ctx.dims.dp // cp,
        train_samples=t.steps * t.global_batch_size,
        valid_samples=max(t.eval_iters, 1) * t.global_batch_size if t.eval_every else 0,  # 0: no valid split
    )


class Trainer:
    """Owns the run's state (model, optimizer, data, step) and runs optimizer steps."""

    def __init__(self, cfg: RunConfig):
        cfg.validate()
        self.cfg, t = cfg, cfg.train
        self.ctx, self.device = init_distributed(cfg)
        self.run_lock = acquire_run_lock(cfg.out_dir, self.ctx.rank == 0, self.device)  # one job per out_dir
        torch.manual_seed(t.seed)
        self.model = build_parallel_model(cfg, self.ctx, self.device)
        self.model.train()
        self.optimizer = build_optimizer(self.model, t, self.device)
        self.amp = autocast_dtype(t.precision, self.device)
        self.n_micro = cfg.grad_accum_steps
        self.data = build_data_source(cfg, self.ctx)
        if cfg.parallel.cp > 1:  # each rank of a cp group keeps its share of every sequence
            from mohge.parallel.context_parallel import ContextParallelData

            self.data = ContextParallelData(self.data, self.model.positions)
        self.step = 0
        self.result = TrainResult(steps=t.steps)
        self.bad_streak = 0
        self.loss_guard = LossGuard(t.loss_spike_factor, t.loss_spike_window, t.loss_spike_skip)
        self.pending_save = None
        self.checkpoint_group = (dist.new_group(backend="gloo", timeout=collective_timeout(cfg.parallel.timeout_s))
                                 if cfg.checkpoint.async_save and self.ctx.distributed else None)
        self.group_aux_start = int(cfg.model.moe.group_aux_start_fraction * t.steps)
        self.balance_hook = BalanceHook(self.model, self.ctx)
        resume, meta = resume_checkpoint(cfg.checkpoint.resume, cfg.out_dir, self.model, self.optimizer, cfg,
                                         verify=cfg.checkpoint.verify, log=self._print)
        if resume is not None:
            self.step = int(meta["step"])
            self.data.load_state_dict(meta["data"])
            self.loss_guard.history.extend(meta.get("loss_history", []))
            self._print(f"resumed from {resume} at step {self.step}")
        self.logger = MetricsLogger(cfg.logging, cfg.out_dir, t.steps, run_config=asdict(cfg), enabled=self.ctx.is_log_rank)
        self.logger.advance(self.step)
        self.peak_tflops = device_peak_tflops(self.device)
        self.loss_context = partial(loss_context, self.ctx.dims.tp > 1)
        self.pipeline = None
        if self.ctx.dims.pp > 1:
            from mohge.parallel.pipeline import Pipeline

            self.pipeline = Pipeline(self.model.pipeline_stages, self.ctx.dims.pp, self.ctx.group("pp"),
                                     self.device, self.n_micro, cfg.parallel.pp_schedule, lm_loss)
        d = self.ctx.dims
        self._print(
            f"mohge: {cfg.model.num_params() / 1e6:.2f}M params, "
            f"{cfg.model.active_params_per_token() / 1e6:.2f}M active/token, world {d.world_size} "
            f"(dp {d.dp}, ep {d.ep}, tp {d.tp}, pp {d.pp}), device {self.device}, {self.n_micro} micro-batch(es)/step"
            + (f", blocks compiled ({cfg.train.compile_backend}; the first step compiles them)" if cfg.train.compile else "")
        )

    def _print(self, message: str) -> None:
        if self.ctx.is_log_rank:
            print(message, flush=True)

    def autocast(self):
        """The forward's precision: bf16 autocast on CUDA (train.precision), none in fp32."""
        return torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None)

    # ---- one step ----------------------------------------------------------------------
    def forward_backward(self) -> float:
        """All micro-batches of one step; returns the mean LM loss of this rank's data."""
        if self.pipeline is not None:
            return self.pipeline_forward_backward()
        total = 0.0
        for _ in range(self.n_micro):
            tokens, labels = self.data.next_train_batch()
            tokens, labels = tokens.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
            with self.loss_context():
                with self.autocast():
                    if self.cfg.train.loss_chunk_tokens:  # the model returns the loss (model/loss.py)
                        loss = self.model(tokens, labels)
                    else:
                        loss = lm_loss(self.model(tokens), labels)
                loss.backward()
            total += scalar(loss) / self.n_micro
        return total

    def pipeline_forward_backward(self) -> float:
        batches = [self.data.next_train_batch() for _ in range(self.n_micro)]
        with self.loss_context(), self.autocast():
            return self.pipeline.step(batches) / self.n_micro

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over `train.eval_iters` global batches: each data-parallel rank
        reads its `grad_accum_steps` micro-batches of each, so the held-out set (and the value) is
        the same in every layout. Routing statistics are not recorded."""
        model, device = self.model, self.device
        model.eval()
        total = 0.0
        batches = list(self.data.valid_batches(self.cfg.train.eval_iters * self.n_micro))
        with recording_suspended(model), self.loss_context(), self.autocast():
            if self.pipeline is None:
                for tokens, labels in batches:
                    total += scalar(lm_loss(model(tokens.to(device)), labels.to(device)))
            else:
                for i in range(0, len(batches), self.n_micro):
                    total += self.pipeline.evaluate(batches[i : i + self.n_micro])
        reshard(model)
        model.train()
        total, count = reduce_scalars([total, len(batches)], self.ctx, "dp", device)
        return total / max(count, 1)

    def optimizer_step(self, skip: bool = False) -> torch.Tensor:
        """Average, clip and apply gradients; a non-finite norm (or `skip`, the loss guard's
        verdict, the same on every rank) skips the update on every rank."""
        t = self.cfg.train
        sync_gradients(self.model, self.ctx, micro_batches=self.n_micro)
        grad_norm = global_grad_norm(self.model, self.ctx)
        if torch.isfinite(grad_norm) and not skip:
            self.bad_streak = 0
            clip_gradients(self.model, grad_norm, t.grad_clip)
            self.optimizer.step()
        else:  # the norm is global, so every rank skips together
            self.bad_streak += 1
            self.result.skipped_steps += 1
            if not skip:
                self._print(f"step {self.step + 1}: non-finite gradient norm, update skipped")
            if self.bad_streak >= t.max_bad_steps:
                self.finish_pending_save()
                from mohge.train.checkpoint import checkpoint_root, last_healthy

                raise DivergenceError(divergence_message(self.step + 1, self.bad_streak, t.max_bad_steps,
                                                         last_healthy(checkpoint_root(self.cfg.out_dir))))
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def train_step(self) -> tuple[float, torch.Tensor, float]:
        set_group_aux_active(self.model, self.step >= self.group_aux_start)
        lr = lr_at(self.step, self.cfg.train)
        set_lr(self.optimizer, lr)
        loss = self.forward_backward()
        # The data-parallel mean loss first: the loss guard judges it, the same on every rank.
        loss = reduce_scalars([loss], self.ctx, "dp", self.device, mean=True)[0]
        skip, report = self.loss_guard.judge(self.step + 1, loss)
        if report:
            self._print(report)
        grad_norm = self.optimizer_step(skip)
        self.balance_hook.after_step()  # global counts -> global-batch loss slots, selection bias
        self.step += 1
        return loss, grad_norm, lr

    # ---- checkpoints -------------------------------------------------------------------
    def save(self) -> None:
        c = self.cfg.checkpoint
        self.finish_pending_save()
        result = save_checkpoint(self.cfg.out_dir, self.step, self.model, self.optimizer, self.data.state_dict(),
                                 self.cfg, keep=c.keep, async_save=c.async_save, process_group=self.checkpoint_group,
                                 extra={"bad_streak": self.bad_streak,  # > 0: pruning keeps an older healthy one
                                        "loss_history": list(self.loss_guard.history)})
        if c.async_save:
            self.pending_save = result
            self._print(f"writing checkpoint for step {self.step} in the background")
        else:
            self._print(f"saved checkpoint {result}")

    def finish_pending_save(self) -> None:
        if self.pending_save is not None:
            path = self.pending_save.finish()
            self.pending_save = None
            self._print(f"saved checkpoint {path}")

    # ---- the loop ----------------------------------------------------------------------
    def run(self) -> TrainResult:
        t, c = self.cfg.train, self.cfg.checkpoint
        tokens_per_step = t.global_batch_size * t.seq_len
        window = {"start": time.perf_counter(), "tokens": 0, "loss": 0.0, "steps": 0}
        with PreemptionHandler() as preemption, Watchdog(t.watchdog_s, self.ctx.rank) as watchdog:
            while self.step < t.steps:
                loss, grad_norm, lr = self.train_step()
                watchdog.beat(f"step {self.step}")
                self.result.losses.append(loss)
                window["tokens"] += tokens_per_step
                window["loss"] += loss
                window["steps"] += 1
                self.logger.advance()
                last = self.step == t.steps
                if self.step % t.log_every == 0 or last:
                    self.log(window, grad_norm, lr, last)
                    window = {"start": time.perf_counter(), "tokens": 0, "loss": 0.0, "steps": 0}
                if (c.every and self.step % c.every == 0) or (last and c.save_final):
                    self.save()
                watchdog.beat(f"step {self.step} (log, eval, save)")
                if not last and preemption.should_stop(self.ctx.group("world"), self.device):
                    saves = not preemption.interrupted or bool(c.every) or c.save_final  # Ctrl-C: as configured
                    if saves and not (c.every and self.step % c.every == 0):
                        self.save()
                    self.finish_pending_save()
                    if preemption.interrupted:
                        self._print(f"stopping at step {self.step} on Ctrl-C (exit {INTERRUPT_EXIT_CODE}): " + (
                            "resume with checkpoint.resume=auto" if saves else
                            "nothing saved (checkpoint.every=0, checkpoint.save_final=false)"))
                    else:
                        if self.ctx.is_log_rank:  # the SLURM template requeues when it finds this
                            (Path(self.cfg.out_dir) / "REQUEUE").write_text(
                                f"saved step {self.step} on {preemption.signal_name}\n")
                        self._print(f"stopping at step {self.step} on {preemption.signal_name}: "
                                    f"exit {REQUEUE_EXIT_CODE} asks the scheduler to requeue")
                    self.logger.close()
                    raise SystemExit(preemption.exit_code)
            self.finish_pending_save()
        self.logger.close()
        return self.result

    def log(self, window: dict, grad_norm: torch.Tensor, lr: float, last: bool) -> None:
        t = self.cfg.train
        elapsed = time.perf_counter() - window["start"]
        moe = collect_moe_metrics(self.model, self.ctx)
        lm = window["loss"] / window["steps"]
        group_aux_active = self.step - 1 >= self.group_aux_start  # during the step just taken
        metrics = {
            "step": self.step,
            "loss": lm + weighted_aux_total(self.cfg.model.moe, moe, group_aux_active),
            "lm_loss": lm,
            "group_aux_loss": moe["group_aux_loss"],
            "intra_group_aux_loss": moe["intra_group_aux_loss"],
            "z_loss": moe["z_loss"],
            "lr": lr,
            "grad_norm": float(grad_norm),
            "tokens_per_s": window["tokens"] / max(elapsed, 1e-9),
            "skipped_steps": self.result.skipped_steps,
            "loss_spikes": self.loss_guard.spikes,
            "group_aux_active": group_aux_active,
            "moe": moe["moe"],
        }
        metrics.update(throughput(self.cfg.model, t.seq_len, metrics["tokens_per_s"],
                                  measured_group_fractions(moe["moe"]), self.peak_tflops, self.ctx.dims.world_size))
        if t.eval_every and (self.step % t.eval_every == 0 or last):
            metrics["val_loss"] = self.evaluate()
            self.result.val_losses.append((self.step, metrics["val_loss"]))
        self.logger.log(metrics, status=status_line(self.step, t.steps, metrics))


def train(cfg: RunConfig) -> TrainResult:
    """Runs (or resumes) training to `cfg.train.steps` and returns the loss history."""
    trainer = Trainer(cfg)
    try:
        return trainer.run()
    finally:
        if trainer.run_lock is not None:
            trainer.run_lock.release()
