"""Metrics sinks: JSON lines (always), TensorBoard and wandb (offline unless configured), and a
readable status line / progress bar on rank 0."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from mohge.train.config import LoggingConfig


def flatten(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested dicts and lists -> {"a/b/0": 1.0, ...} of scalars (TensorBoard and wandb want scalars)."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}/"))
        elif isinstance(value, (list, tuple)):
            flat.update(flatten({str(i): v for i, v in enumerate(value)}, f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep the line parseable and the fact visible
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


class MetricsLogger:
    """Writes each log step to every enabled sink. Only rank 0 constructs one with `enabled=True`."""

    def __init__(self, cfg: LoggingConfig, out_dir: str, total_steps: int, run_config: dict, enabled: bool = True):
        self.enabled = enabled
        self.out_dir = Path(out_dir)
        self._jsonl = None
        self._tb = None
        self._wandb = None
        self._bar = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if cfg.jsonl:
            self._jsonl = open(self.out_dir / "metrics.jsonl", "a", buffering=1)
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"))
        if cfg.wandb:
            try:
                import wandb
            except ImportError as err:
                raise RuntimeError("logging.wandb=true needs wandb: pip install 'mohge[wandb]'") from err
            os.environ.setdefault("WANDB_MODE", cfg.wandb_mode)
            self._wandb = wandb.init(
                project=cfg.wandb_project, dir=str(self.out_dir), config=run_config, mode=cfg.wandb_mode
            )
        if cfg.progress and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, desc="train", dynamic_ncols=True)

    def log(self, metrics: dict[str, Any], status: str | None = None) -> None:
        if not self.enabled:
            return
        step = int(metrics["step"])
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(_json_safe(metrics)) + "\n")
        scalars = flatten({k: v for k, v in metrics.items() if k != "step"})
        if self._tb is not None:
            for name, value in scalars.items():
                self._tb.add_scalar(name, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)
        if status:
            if self._bar is not None:
                self._bar.write(status)
            else:
                print(status, flush=True)

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
