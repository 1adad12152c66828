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

from mohge.model.moe.layer import moe_layers, recording_suspended, set_group_aux_active
from mohge.model.transformer import build_model
from mohge.parallel.data_parallel import reshard
from mohge.parallel.dims import ParallelDims
from mohge.parallel.tensor_parallel import loss_context
from mohge.parallel.parallelize import ParallelContext, global_grad_norm, parallelize_model, scalar, sync_gradients
from mohge.model.moe.balance import balance_metrics
from mohge.train.balancing import BalanceHook
from mohge.train.checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from mohge.train.config import RunConfig
from mohge.train.metrics import MetricsLogger
from mohge.train.optim import build_optimizer, lr_at, set_lr
from mohge.train.preemption import REQUEUE_EXIT_CODE, PreemptionHandler
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
            raise RuntimeError("train.device=cuda but no CUDA device is visible; use train.device=cpu")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """bf16 autocast on CUDA (precision=auto or bf16), none (fp32) otherwise."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def resolve_expert_compute(setting: str, device: torch.device) -> str:
    """`auto`: grouped GEMM on CUDA, the per-expert loop on CPU."""
    if setting == "auto":
        return "grouped" if device.type == "cuda" else "loop"
    return setting


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
            dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
        ctx.dense_mesh, ctx.expert_mesh = dims.build_meshes(device.type)
    return ctx, device


def build_parallel_model(cfg: RunConfig, ctx: ParallelContext, device: torch.device) -> nn.Module:
    compute = resolve_expert_compute(cfg.model.moe.expert_compute, device)
    model = build_model(cfg.model, "meta", expert_compute=compute)
    model = parallelize_model(model, ctx, cfg)
    model.to_empty(device=device)
    model.init_weights(cfg.train.seed)
    return model


def collect_moe_metrics(model: nn.Module, ctx: ParallelContext) -> dict:
    """Per MoE layer: group token fractions, expert loads and aux losses since the last call.

    With expert parallel, also the tokens and expert FLOPs each EP rank received and their
    imbalance ratio (max / mean). Counts are summed over data-parallel ranks.
    """
    per_layer, totals = {}, {"group_aux_loss": 0.0, "intra_group_aux_loss": 0.0, "z_loss": 0.0}
    for name, layer in moe_layers(model):
        stats = layer.stats.pop()
        if not stats["forwards"]:
            continue
        # Counts are summed and loss values averaged over data-parallel ranks, in one reduction.
        losses = [stats[k] for k in totals]
        packed = torch.cat([stats["tokens_per_expert"], torch.tensor([stats.get("dropped_slots", 0.0), *losses]).double()])
        if ctx.distributed and ctx.dims.dp > 1:
            packed = packed.to(next(model.parameters()).device)
            dist.all_reduce(packed, group=ctx.group("dp"))
            packed = packed.cpu()
            packed[-len(losses):] /= ctx.dims.dp
        n = len(losses) + 1
        tokens_per_expert, dropped = packed[:-n], float(packed[-n])
        stats.update({k: float(v) for k, v in zip(totals, packed[-len(losses):])})
        offsets = layer.cfg.group_offsets()
        slots = float(tokens_per_expert.sum()) or 1.0
        group_slots = [float(tokens_per_expert[offsets[g] : offsets[g + 1]].sum()) for g in range(len(offsets) - 1)]
        entry = {
            "group_fraction": [s / slots for s in group_slots],
            "expert_load": [float(c) / slots for c in tokens_per_expert],
            **{k: stats[k] for k in totals},
        }
        entry.update(balance_metrics(layer))  # the last step's global batch; bias ranges
        if layer.cfg.capacity_factor is not None:
            entry["dropped_fraction"] = dropped / (dropped + slots)
        placement = getattr(layer, "placement", None)
        if placement is not None:
            from mohge.parallel.allocation import flop_imbalance

            d_model = next(layer.router.parameters()).shape[-1]
            entry["ep_rank_tokens"] = [
                float(sum(tokens_per_expert[e] for e in placement.local_experts(r))) for r in range(placement.ep_size)
            ]
            entry["ep_flop_imbalance"] = flop_imbalance(placement, tokens_per_expert.tolist(), d_model)
        per_layer[name] = entry
    if ctx.distributed and ctx.dims.pp > 1:  # every stage reports its own layers
        gathered: list = [None] * ctx.dims.pp
        dist.all_gather_object(gathered, per_layer, group=ctx.group("pp"))
        per_layer = {name: entry for part in gathered for name, entry in sorted(part.items())}
    for k in totals:
        totals[k] = sum(e[k] for e in per_layer.values()) / max(len(per_layer), 1)
    return {"moe": per_layer, **totals}


def weighted_aux_total(moe_cfg, metrics: dict, group_aux_active: bool) -> float:
    """The auxiliary terms' contribution to the objective, from the per-layer mean values."""
    group_coeff = moe_cfg.group_aux_coeff if group_aux_active else 0.0
    return sum(
        group_coeff * entry["group_aux_loss"]
        + moe_cfg.intra_aux_coeff * entry["intra_group_aux_loss"]
        + moe_cfg.z_loss_coeff * entry["z_loss"]
        for entry in metrics["moe"].values()
    )


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
    t = cfg.train
    if cfg.data.source == "synthetic":
        from mohge.data.synthetic import SyntheticData

        return SyntheticData(cfg.model.vocab_size, t.seq_len, t.micro_batch_size, t.seed, ctx.dp_rank, ctx.dims.dp)
    from mohge.data.loader import build_data

    return build_data(
        cfg.data,
        seq_len=t.seq_len,
        micro_batch_size=t.micro_batch_size,
        seed=t.seed,
        out_dir=cfg.out_dir,
        model_vocab_size=cfg.model.vocab_size,
        dp_rank=ctx.dp_rank,
        dp_size=ctx.dims.dp,
        train_samples=t.steps * t.global_batch_size,
        valid_samples=max(t.eval_iters, 1) * t.global_batch_size,
    )


class Trainer:
    """Owns the run's state (model, optimizer, data, step) and runs optimizer steps."""

    def __init__(self, cfg: RunConfig):
        cfg.validate()
        self.cfg, t = cfg, cfg.train
        self.ctx, self.device = init_distributed(cfg)
        torch.manual_seed(t.seed)
        self.model = build_parallel_model(cfg, self.ctx, self.device)
        self.model.train()
        self.optimizer = build_optimizer(self.model, t, self.device)
        self.amp = autocast_dtype(t.precision, self.device)
        self.n_micro = cfg.grad_accum_steps
        self.data = build_data_source(cfg, self.ctx)
        self.step = 0
        self.result = TrainResult(steps=t.steps)
        self.bad_streak = 0
        self.pending_save = None
        self.checkpoint_group = (dist.new_group(backend="gloo")
                                 if cfg.checkpoint.async_save and self.ctx.distributed else None)
        self.group_aux_start = int(cfg.model.moe.group_aux_start_fraction * t.steps)
        self.balance_hook = BalanceHook(self.model, self.ctx)
        resume = resolve_resume(cfg.checkpoint.resume, cfg.out_dir)
        if resume is not None:
            meta = load_checkpoint(resume, self.model, self.optimizer, cfg)
            self.step = int(meta["step"])
            self.data.load_state_dict(meta["data"])
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
        value = torch.tensor([total, len(batches)], dtype=torch.float64, device=device)
        if self.ctx.distributed and self.ctx.dims.dp > 1:
            dist.all_reduce(value, group=self.ctx.group("dp"))
        return float(value[0] / value[1].clamp_min(1))

    def optimizer_step(self) -> torch.Tensor:
        """Average, clip and apply gradients; a non-finite norm skips the update on every rank."""
        t = self.cfg.train
        for param in self.model.parameters():
            if param.grad is not None:
                param.grad.div_(self.n_micro)
        sync_gradients(self.model, self.ctx)
        grad_norm = global_grad_norm(self.model, self.ctx)
        if torch.isfinite(grad_norm):
            self.bad_streak = 0
            if t.grad_clip > 0:
                clip = min(1.0, t.grad_clip / (float(grad_norm) + 1e-6))
                if clip < 1.0:
                    for param in self.model.parameters():
                        if param.grad is not None:
                            param.grad.mul_(clip)
            self.optimizer.step()
        else:  # the norm is global, so every rank skips together
            self.bad_streak += 1
            self.result.skipped_steps += 1
            self._print(f"step {self.step + 1}: non-finite gradient norm, update skipped")
            if self.bad_streak >= t.max_bad_steps:
                raise RuntimeError(
                    f"step {self.step + 1}: {self.bad_streak} consecutive steps with a non-finite loss or "
                    f"gradient norm (train.max_bad_steps={t.max_bad_steps}); stopping with the last good "
                    "checkpoint untouched. Lower train.lr or inspect the data."
                )
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def train_step(self) -> tuple[float, torch.Tensor, float]:
        set_group_aux_active(self.model, self.step >= self.group_aux_start)
        lr = lr_at(self.step, self.cfg.train)
        set_lr(self.optimizer, lr)
        loss = self.forward_backward()
        grad_norm = self.optimizer_step()
        self.balance_hook.after_step()  # global counts -> global-batch loss slots, selection bias
        if self.ctx.distributed and self.ctx.dims.dp > 1:
            reduced = torch.tensor(loss, dtype=torch.float64, device=self.device)
            dist.all_reduce(reduced, group=self.ctx.group("dp"))
            loss = float(reduced) / self.ctx.dims.dp
        self.step += 1
        return loss, grad_norm, lr

    # ---- checkpoints -------------------------------------------------------------------
    def save(self) -> None:
        c = self.cfg.checkpoint
        self.finish_pending_save()
        result = save_checkpoint(self.cfg.out_dir, self.step, self.model, self.optimizer, self.data.state_dict(),
                                 self.cfg, keep=c.keep, async_save=c.async_save, process_group=self.checkpoint_group)
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
        with PreemptionHandler() as preemption:
            while self.step < t.steps:
                loss, grad_norm, lr = self.train_step()
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
                if not last and preemption.should_stop(self.ctx.group("world"), self.device):
                    if not (c.every and self.step % c.every == 0):
                        self.save()
                    self.finish_pending_save()
                    if self.ctx.is_log_rank:  # the SLURM template requeues when it finds this
                        (Path(self.cfg.out_dir) / "REQUEUE").write_text(
                            f"saved step {self.step} on {preemption.signal_name}\n")
                    self._print(f"stopping at step {self.step} on {preemption.signal_name}: "
                                f"exit {REQUEUE_EXIT_CODE} asks the scheduler to requeue")
                    self.logger.close()
                    raise SystemExit(REQUEUE_EXIT_CODE)
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
    return Trainer(cfg).run()
