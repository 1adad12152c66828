"""Sharded checkpoints with torch.distributed.checkpoint (DCP): save, keep the last K, resume.

Layout of `<out_dir>/checkpoints/`:
    step_00000100/            one checkpoint: DCP shards + .metadata, meta.json, rng/rank<r>.pt
    latest                    name of the newest complete checkpoint (written last)

A checkpoint is written into `step_N.partial` and renamed when every rank has finished,
then `latest` is replaced atomically: a crash mid-save leaves the previous checkpoint and pointer
intact, and a `.partial` directory is never loaded. meta.json (written last, before the rename)
lists every file's size and SHA-256; a load verifies them first, and `resume=auto` falls back to
the newest checkpoint that verifies (see docs/reliability.md).

Expert weights and their optimizer states are stored one expert per key
(`...experts.groups.1.w1/expert/5`), so a checkpoint loads under any expert-parallel size and
placement; dense and DTensor parameters are stored by name and DCP reshards them across data,
tensor and pipeline layouts. Pipeline stages save and load only the modules they hold.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

from mohge.train.checksums import compute_checksums, verify_checksums

from mohge.train.errors import CheckpointError  # re-exported from the one errors module


FORMAT_VERSION = 1
LATEST = "latest"
META = "meta.json"
# Fields of the model config that may change between save and resume (layout, not architecture).
LAYOUT_FIELDS = {"expert_compute", "allocation", "capacity_factor", "group_aux_coeff", "intra_aux_coeff",
                 "z_loss_coeff", "group_aux_start_fraction", "max_seq_len"}


class DamagedCheckpoint(CheckpointError):
    """A checkpoint whose files fail their checksums or cannot be read (resume=auto skips it)."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


@contextmanager
def quiet_single_process():
    """DCP warns that it assumes a single process when torch.distributed is not initialised."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# ---- what goes into a checkpoint ---------------------------------------------------------
def _owners(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, torch.Tensor]]:
    for mod_name, module in model.named_modules():
        for p_name, param in module.named_parameters(recurse=False):
            yield (f"{mod_name}.{p_name}" if mod_name else p_name), module, p_name, param


def split_entry(name: str, module: Optional[nn.Module], tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """A tensor's checkpoint entries: per expert row for expert weights (rows numbered by the
    owning module's `expert_rows` under expert parallel, else 0..N-1), else itself. A module
    with a packed layout (the expert stacks) names its own entries."""
    if hasattr(module, "checkpoint_entries"):
        return module.checkpoint_entries(name, tensor)
    rows = getattr(module, "expert_rows", None)
    if rows is None and not (tensor.dim() == 3 and ".experts." in name):
        return {name: tensor}
    rows = rows if rows is not None else range(tensor.shape[0])
    return {f"{name}/expert/{r}": tensor[i] for i, r in enumerate(rows)}


def model_entries(model: nn.Module) -> dict[str, torch.Tensor]:
    """Checkpoint keys -> views of this process's parameters (loading writes through them)."""
    entries: dict[str, torch.Tensor] = {}
    for name, module, _, param in _owners(model):
        entries.update(split_entry(name, module, param.data))
    for mod_name, module in model.named_modules():  # persistent buffers (e.g. the MoE selection bias)
        for b_name, buf in module.named_buffers(recurse=False):
            if buf is not None and b_name not in module._non_persistent_buffers_set:
                entries[f"{mod_name}.{b_name}" if mod_name else b_name] = buf
    return entries


def ensure_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """AdamW creates its state lazily; create it (zeros, step 0) so it can be loaded into."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def optimizer_entries(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    ensure_optimizer_state(optimizer)
    entries: dict[str, torch.Tensor] = {}
    for name, module, _, param in _owners(model):
        state = optimizer.state[param]
        for key in ("exp_avg", "exp_avg_sq"):
            entries.update(split_entry(f"optim/{key}/{name}", module, state[key]))
        entries[f"optim/step/{name}"] = state["step"]
    return entries


# ---- paths --------------------------------------------------------------------------------
def checkpoint_root(out_dir: str) -> Path:
    return Path(out_dir) / "checkpoints"


def step_dir(out_dir: str, step: int) -> Path:
    return checkpoint_root(out_dir) / f"step_{step:08d}"


def is_complete(path: Path) -> bool:
    return ((path / META).is_file() and (path / ".metadata").is_file() and ".partial" not in path.name
            and not path.name.endswith(".damaged"))


def complete_steps(root: Path) -> list[Path]:
    """The complete checkpoints under a checkpoints/ directory, oldest first."""
    return sorted(p for p in root.glob("step_*") if is_complete(p)) if root.is_dir() else []


def find_latest(out_dir: str) -> Optional[Path]:
    """The newest complete checkpoint: the `latest` pointer, else the highest complete step dir."""
    root = checkpoint_root(out_dir)
    pointer = root / LATEST
    if pointer.is_file():
        try:  # a damaged pointer is only a hint: fall back to scanning
            candidate = root / pointer.read_text().strip()
        except (OSError, UnicodeDecodeError):
            candidate = None
        if candidate is not None and candidate.parent == root and is_complete(candidate):
            return candidate
    complete = complete_steps(root)
    return complete[-1] if complete else None


# ---- save ---------------------------------------------------------------------------------
class PendingSave:
    """A checkpoint whose shards are being written in the background (checkpoint.async_save).

    `finish()` waits for this rank's writes, then does what makes the checkpoint visible — the
    meta file, the rename and the `latest` pointer — exactly as a synchronous save does.
    """

    def __init__(self, future, partial: Path, final: Path, meta: dict, keep: int):
        self.future, self.partial, self.final, self.meta, self.keep = future, partial, final, meta, keep

    def finish(self) -> Path:
        if self.future is not None:
            try:
                self.future.result()
            except (Exception, CheckpointException) as err:
                raise _save_error(self.partial, err) from err
        _barrier()
        self.meta["checksums"] = compute_checksums(self.partial)  # collective: each rank hashes a share
        if _rank() == 0:
            root = self.partial.parent
            _write_meta(self.partial, self.meta)
            if self.final.exists():
                shutil.rmtree(self.final)
            os.replace(self.partial, self.final)
            tmp = root / f"{LATEST}.tmp"
            tmp.write_text(self.final.name)
            os.replace(tmp, root / LATEST)  # the pointer moves last
            _prune(root, self.keep)
        _barrier()
        return self.final


def save_checkpoint(out_dir: str, step: int, model: nn.Module, optimizer, data_state: dict, run_config,
                    keep: int = 2, extra: Optional[dict] = None, async_save: bool = False, process_group=None):
    """Writes step `step` atomically (all ranks call this), then prunes to the last `keep`.

    With `async_save`, returns a PendingSave once the state is staged in host memory; training
    goes on while the shards are written, and `finish()` (called before the next save and at the
    end of the run) makes the checkpoint visible; `process_group` (a gloo group of its own) keeps
    the background writer's collectives apart from training's. Otherwise returns the final
    directory.
    """
    root = checkpoint_root(out_dir)
    final = step_dir(out_dir, step)
    partial = root / f"{final.name}.partial"
    if _rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
        try:
            (partial / "rng").mkdir(parents=True)
        except OSError as err:  # other ranks then fail on their own write (or time out)
            raise _save_error(partial, err) from err
    _barrier()
    try:
        torch.save({"cpu": torch.get_rng_state()}, partial / "rng" / f"rank{_rank()}.pt")
    except (OSError, RuntimeError) as err:
        raise _save_error(partial, err) from err
    state = {**model_entries(model), **optimizer_entries(model, optimizer)}
    meta = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "data": data_state,
        "model": asdict(run_config.model),
        "parallel": asdict(run_config.parallel),
        "data_config": asdict(run_config.data),  # mohge-convert copies its tokenizer into exports
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "saved_at": time.time(),
        **(extra or {}),
    }
    with quiet_single_process():
        if async_save:
            future = dcp.async_save(state, checkpoint_id=str(partial), process_group=process_group)
            return PendingSave(future, partial, final, meta, keep)
        try:
            dcp.save(state, checkpoint_id=str(partial))
        except (Exception, CheckpointException) as err:
            raise _save_error(partial, err) from err
    return PendingSave(None, partial, final, meta, keep).finish()


def _save_error(partial: Path, err: BaseException) -> CheckpointError:
    """A failed write (disk full, permissions, a rank's I/O error) as one line that says what
    survived: the previous checkpoints are untouched because nothing is renamed or pruned."""
    previous = find_latest(str(partial.parent.parent))
    kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
    return CheckpointError(f"{partial}: writing the checkpoint failed ({_last_line(err)}); "
                           f"{kept}; free space or fix permissions under {partial.parent}")


def _write_meta(directory: Path, meta: dict) -> None:
    """meta.json through a temp file, so a crash never leaves a half-written one that looks complete."""
    tmp = directory / f"{META}.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, directory / META)


def is_healthy(path: Path) -> bool:
    """Saved with no unfinished run of skipped (non-finite / spiking) steps behind it."""
    try:
        return int(json.loads((path / META).read_text()).get("bad_streak", 0)) == 0
    except (OSError, ValueError):
        return False


def last_healthy(root: Path) -> Optional[Path]:
    """The newest complete checkpoint saved outside a run of skipped steps."""
    return next((p for p in reversed(complete_steps(root)) if is_healthy(p)), None)


def _prune(root: Path, keep: int) -> None:
    """Keeps the last `keep` complete checkpoints and, always, the newest healthy one: a run of
    non-finite steps saving every step must not push the last good checkpoint out."""
    if keep <= 0:
        return
    complete = complete_steps(root)
    protected = last_healthy(root)
    for old in complete[:-keep]:
        if old != protected:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob("step_*.partial"):  # left by a crash during an earlier save
        shutil.rmtree(stale, ignore_errors=True)


# ---- load ---------------------------------------------------------------------------------
def resolve_resume(setting: Optional[str], out_dir: str, flag: str = "checkpoint.resume") -> Optional[Path]:
    """`checkpoint.resume`: None -> fresh start; "auto" -> latest complete one in out_dir, if any;
    a path -> that checkpoint, which must be complete. `flag` is how errors name the setting
    (`--checkpoint` for mohge-convert / mohge-eval)."""
    if setting in (None, "", "none"):
        return None
    if setting == "auto":
        return find_latest(out_dir)
    path = Path(setting)
    if checkpoint_root(setting).is_dir():
        found = find_latest(str(path))
        if found is None:
            damaged = sorted(p.name for p in checkpoint_root(setting).glob("step_*.damaged"))
            why = f" (only quarantined damaged ones: {', '.join(damaged)})" if damaged else ""
            raise CheckpointError(f"{flag}={setting}: no complete checkpoint under {path}/checkpoints{why}")
        return found
    if not path.is_dir():
        raise CheckpointError(f"{flag}={setting}: {path} does not exist")
    if path.name.endswith(".damaged"):  # renamed by _quarantine after failing its checksum / read check
        good = find_latest(str(path.parent.parent)) if path.parent.name == "checkpoints" else None
        fix = (f"the last good checkpoint is {good}: use it (or the run dir {path.parent.parent})" if good else
               "no good checkpoint is left in this run; restore this one from a backup")
        raise CheckpointError(f"{flag}={setting}: {path} was quarantined as damaged (a file failed its checksum or "
                              f"could not be read on an earlier resume); {fix}")
    if not is_complete(path):
        if not (path / META).exists() and not (path / ".metadata").exists() and ".partial" not in path.name:
            raise CheckpointError(f"{flag}={setting}: {path} is not a checkpoint (no {META}, no .metadata, no "
                                  "checkpoints/); give a run dir or one of its checkpoints/step_* dirs")
        fix = "use checkpoint.resume=auto" if flag == "checkpoint.resume" else "give the run dir"
        raise CheckpointError(
            f"{flag}={setting}: {path} is incomplete (no {META} or .metadata; a save was "
            f"interrupted). Use an earlier step or {fix}"
        )
    return path


def read_meta(path: Path) -> dict:
    try:
        return json.loads((path / META).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DamagedCheckpoint(f"{path / META}: unreadable ({err}); the checkpoint is damaged") from err


def check_compatible(meta: dict, run_config, path: Path) -> None:
    """Same architecture (layout may differ); names every differing field."""
    from mohge.model.config import ModelConfig

    # A field the checkpoint does not name was added later: the checkpoint had its default.
    default = asdict(ModelConfig())
    saved, now = {**default, **meta["model"]}, asdict(run_config.model)
    saved["moe"] = {**default["moe"], **meta["model"].get("moe", {})}
    diffs = []
    for key in sorted(set(saved) | set(now)):
        if key == "moe":
            for sub in sorted(set(saved["moe"]) | set(now["moe"])):
                if sub not in LAYOUT_FIELDS and saved["moe"].get(sub) != now["moe"].get(sub):
                    diffs.append(f"model.moe.{sub}: checkpoint {saved['moe'].get(sub)} vs config {now['moe'].get(sub)}")
        elif key not in LAYOUT_FIELDS and saved.get(key) != now.get(key):
            diffs.append(f"model.{key}: checkpoint {saved.get(key)} vs config {now.get(key)}")
    if diffs:
        raise CheckpointError(f"{path}: checkpoint does not match the model config:\n  " + "\n  ".join(diffs))
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {meta.get('format_version')}, expected {FORMAT_VERSION}")


def verify_checkpoint(path: Path, meta: dict) -> None:
    """Checks every file against the checksums in meta.json (all ranks reach the same verdict).
    Checkpoints written before checksums existed (or by mohge-convert) are accepted as they are."""
    table = meta.get("checksums")
    if table is None:
        return
    problems = verify_checksums(path, table)
    if problems:
        raise DamagedCheckpoint(f"{problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
                                + "; the checkpoint is damaged: resume from an earlier step (checkpoint.resume=auto "
                                "falls back by itself) or delete it")


def resume_checkpoint(setting: Optional[str], out_dir: str, model: nn.Module, optimizer, run_config,
                      verify: bool = True, log=print) -> tuple[Optional[Path], Optional[dict]]:
    """Resolves `checkpoint.resume` and loads it; returns (path, meta) or (None, None).

    With "auto", a damaged checkpoint (failed checksum, unreadable shard) is reported and the
    next older one is tried; if every one is damaged the run stops rather than start afresh over
    them. An explicit path that is damaged is refused.
    """
    path = resolve_resume(setting, out_dir)
    root = checkpoint_root(out_dir)
    if path is None:
        quarantined = sorted(p.name for p in root.glob("step_*.damaged")) if setting == "auto" else []
        if quarantined:  # never start afresh over checkpoints that exist but are damaged
            raise CheckpointError(f"checkpoint.resume=auto: {root} holds only damaged checkpoints "
                                  f"({', '.join(quarantined)}); restore one from a backup, or move them away to "
                                  "start afresh")
        return None, None
    if setting != "auto":
        return path, load_checkpoint(path, model, optimizer, run_config, verify=verify)
    candidates = [path] + [p for p in reversed(complete_steps(root)) if p != path]
    damaged = []
    for candidate in candidates:
        try:
            return candidate, load_checkpoint(candidate, model, optimizer, run_config, verify=verify)
        except DamagedCheckpoint as err:
            damaged.append(candidate.name)
            log(f"checkpoint.resume=auto: skipping {err}")
            _quarantine(candidate, log)
    raise CheckpointError(f"checkpoint.resume=auto: every checkpoint under {root} is damaged ({', '.join(damaged)}); "
                          "restore one from a backup, or move them away to start afresh")


def _quarantine(path: Path, log) -> None:
    """Renames a damaged checkpoint to `<name>.damaged`: kept for inspection, but no longer counted
    among the last `keep` (so pruning cannot delete a good one in its favour) nor found again."""
    if _rank() != 0:
        return
    target = path.with_name(f"{path.name}.damaged")
    try:
        shutil.rmtree(target, ignore_errors=True)
        os.replace(path, target)
        log(f"checkpoint.resume=auto: moved the damaged checkpoint to {target}")
    except OSError as err:
        log(f"checkpoint.resume=auto: could not move {path} aside ({err}); it stays in place")


def load_checkpoint(path: Path, model: nn.Module, optimizer, run_config, verify: bool = True) -> dict:
    """Loads weights, optimizer state and this rank's RNG state in place; returns meta.json."""
    meta = read_meta(path)
    check_compatible(meta, run_config, path)
    if verify:
        verify_checkpoint(path, meta)
    state = model_entries(model)
    with_optimizer = optimizer is not None and not meta.get("weights_only", False)
    if with_optimizer:  # a converted (weights-only) checkpoint starts the optimizer afresh
        state.update(optimizer_entries(model, optimizer))
    try:
        available = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    except (Exception, CheckpointException) as err:
        raise DamagedCheckpoint(f"{path / '.metadata'}: unreadable ({type(err).__name__}: {err}); "
                                "the checkpoint is damaged") from err
    aliases = _legacy_expert_steps(state, available)
    missing = sorted(set(state) - set(available))
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} tensors missing, e.g. {missing[:3]}")
    targets = dict(state)
    try:
        with quiet_single_process():
            dcp.load(state, checkpoint_id=str(path))
    except (Exception, CheckpointException) as err:  # a truncated or damaged shard in a checkpoint without checksums
        raise DamagedCheckpoint(f"{path}: a shard cannot be read ({type(err).__name__}: "
                                f"{_last_line(err)}); the checkpoint is damaged") from err
    # DCP fills most targets in place but may hand back new tensors (0-d steps, some DTensor
    # states): copy those into the model's and optimizer's own tensors.
    for key, loaded in state.items():
        if loaded is not targets[key]:
            targets[key].copy_(loaded)
    for source, steps in aliases.items():
        for step in steps:
            step.copy_(state[source])
    rng = path / "rng" / f"rank{_rank()}.pt"
    if rng.is_file():
        try:
            torch.set_rng_state(torch.load(rng, weights_only=True)["cpu"])
        except (Exception, CheckpointException) as err:
            raise DamagedCheckpoint(f"{rng}: unreadable ({type(err).__name__}); the checkpoint is damaged") from err
    return meta


def _legacy_expert_steps(state: dict, available) -> dict[str, list]:
    """Checkpoints from before the unpadded per-group experts keyed the routed experts' AdamW step
    by the fused stacks' names (`optim/step/<layer>.experts.w13`, `.w2`); the step count is the
    same for every expert tensor, so a missing per-group step is read from the layer's old one.
    Rewrites `state` in place to load each old key once; returns {old key: step tensors to fill}."""
    aliases: dict[str, list] = {}
    for key in [k for k in state if k.startswith("optim/step/") and k not in available and ".experts." in k]:
        base = key[:key.index(".experts.") + len(".experts.")]
        old = sorted(a for a in available if a.startswith(base) and ".experts.groups." not in a)
        if old:
            aliases.setdefault(old[0], []).append(state.pop(key))
            state.setdefault(old[0], torch.zeros_like(aliases[old[0]][0]))
    return aliases


def _last_line(err: BaseException) -> str:
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return lines[-1] if lines else repr(err)
