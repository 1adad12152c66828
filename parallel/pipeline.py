"""Pipeline parallel through torch.distributed.pipelining (1F1B, interleaved 1F1B, GPipe).

The layers are split into pp x virtual_stages consecutive stages; pipeline rank r runs stages
r, r + pp, r + 2pp, ... (the looped placement interleaved schedules expect). Each rank keeps one
pruned model holding every module its stages need — under the original parameter names, so
initialisation, checkpoints and the other parallel dimensions see an ordinary model — and
`StageModule` views of it that the schedule drives. MoE auxiliary losses are attached to each
stage's outputs through autograd, so their gradients flow exactly as without pipelining.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mohge.model.config import ConfigError
from mohge.parallel.parallelize import scalar

SCHEDULES = {"1f1b": "Schedule1F1B", "gpipe": "ScheduleGPipe", "interleaved_1f1b": "ScheduleInterleaved1F1B"}


def layer_split(n_layers: int, num_stages: int, split: list[int] | None = None) -> list[range]:
    """Layer ids of every stage: `split` (layers per stage) or as even as possible, earlier
    stages taking the remainder's extra layers last (the first stage also embeds)."""
    if split is None:
        base, extra = divmod(n_layers, num_stages)
        split = [base + (1 if s >= num_stages - extra else 0) for s in range(num_stages)]
    if len(split) != num_stages or sum(split) != n_layers or min(split) < 1:
        raise ConfigError(f"parallel.pp_layer_split: {split} must give each of the {num_stages} stages >= 1 layer "
                          f"and sum to model.n_layers={n_layers}")
    starts = [sum(split[:s]) for s in range(num_stages)]
    return [range(start, start + n) for start, n in zip(starts, split)]


def stage_ids(pp_rank: int, pp: int, virtual: int) -> list[int]:
    return [pp_rank + k * pp for k in range(virtual)]


def prune_for_stages(model: nn.Module, keep_layers: set[int], first: bool, last: bool) -> None:
    """Deletes what this rank's stages never run; names of the rest do not change."""
    for key in list(model.layers.keys()):
        if int(key) not in keep_layers:
            del model.layers[key]
    if not first:
        model.tok_embeddings = None
    if not last:
        model.norm = None
        model.output = None


class StageModule(nn.Module):
    """Pipeline stage `index`: a view of the pruned model's modules (parameters are shared).
    Under FSDP each view is the root unit of its stage (see data_parallel.apply_fsdp)."""

    def __init__(self, model: nn.Module, index: int, layers: range, first: bool, last: bool):
        super().__init__()
        object.__setattr__(self, "_model", model)  # for the rope table; not a registered child
        self.index, self.first, self.last = index, first, last
        self.tok_embeddings = model.tok_embeddings if first else None
        self.layers = nn.ModuleList(model.layers[str(i)] for i in layers)
        self.norm = model.norm if last else None
        self.output = model.output if last else None
        self.tied = last and model.output is None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(x) if self.tok_embeddings is not None else x
        m = self._model  # context parallel: the rope rows of this rank's positions
        rope = m.rope if getattr(m, "positions", None) is None else m.rope[m.positions]
        for layer in self.layers:
            h = layer(h, rope)
        if self.norm is None:
            return h
        h = self.norm(h)
        return self.output(h) if self.output is not None else F.linear(h, self._model.tok_embeddings.weight)


def split_model(model: nn.Module, pp_rank: int, pp: int, virtual: int, split: list[int] | None):
    """Prunes `model` for this rank; returns its stages as (index, layers, first, last), for
    `build_stages` once every module swap (FP8, activation checkpointing) has been done."""
    num_stages = pp * virtual
    ranges = layer_split(len(model.layers), num_stages, split)
    mine = stage_ids(pp_rank, pp, virtual)
    keep = {i for s in mine for i in ranges[s]}
    prune_for_stages(model, keep, first=0 in mine, last=num_stages - 1 in mine)
    return [(s, ranges[s], s == 0, s == num_stages - 1) for s in mine]


def build_stages(model: nn.Module, specs: list[tuple[int, range, bool, bool]]) -> list[StageModule]:
    """The StageModule views of this rank's stages; they must see the final modules."""
    return [StageModule(model, index, layers, first, last) for index, layers, first, last in specs]


def quiet_inference_stage(base: type) -> type:
    """`base` whose shape-inference forward records no MoE routing statistics: it runs on the
    first micro-batch (first stage) or on uninitialised tensors (later stages), so counting it
    would skew group fractions and could make the logged aux losses NaN."""
    from mohge.model.moe.layer import recording_suspended

    def wrap(name):
        def method(self, *args, **kwargs):
            with recording_suspended(self.submod):
                return getattr(base, name)(self, *args, **kwargs)
        return method

    names = [n for n in ("_forward_metadata_inference", "_shape_inference") if hasattr(base, n)]
    return type("QuietInferenceStage", (base,), {n: wrap(n) for n in names})


class Pipeline:
    """The schedule over this rank's stages; `step` runs one optimizer step's micro-batches."""

    def __init__(self, stages: list[StageModule], pp: int, group, device, n_micro: int, schedule: str, loss_fn):
        from torch.distributed import pipelining

        self.group, self.device = group, device
        num_stages = pp * len(stages)
        stage_cls = quiet_inference_stage(pipelining.PipelineStage)
        pipeline_stages = [stage_cls(m, m.index, num_stages, device, group=group) for m in stages]
        self.has_first = any(m.first for m in stages)
        self.has_last = any(m.last for m in stages)
        cls = getattr(pipelining, SCHEDULES[schedule])
        if schedule == "interleaved_1f1b":
            self.schedule = cls(pipeline_stages, n_microbatches=n_micro, loss_fn=loss_fn, scale_grads=False)
        else:
            # one stage per rank (ParallelConfig.validate refuses virtual stages here)
            self.schedule = cls(pipeline_stages[0], n_microbatches=n_micro, loss_fn=loss_fn, scale_grads=False)

    def step(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        """Forward + backward of one step's (tokens, labels) micro-batches; the sum of their
        losses, the same on every stage."""
        return self._run(self.schedule.step, batches)

    def evaluate(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        """Forward only over the micro-batches; the sum of their losses, on every stage."""
        return self._run(self.schedule.eval, batches)

    def _run(self, run, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        tokens = torch.cat([b[0] for b in batches]).to(self.device)
        labels = torch.cat([b[1] for b in batches]).to(self.device)
        args = (tokens,) if self.has_first else ()
        losses: list[torch.Tensor] = []
        if self.has_last:
            run(*args, target=labels, losses=losses)
        else:
            run(*args)
        # The last stage has the losses; the others add zero, so every stage returns the sum.
        total = torch.tensor(sum(scalar(x) for x in losses), dtype=torch.float64, device=self.device)
        dist.all_reduce(total, group=self.group)
        return float(total)
