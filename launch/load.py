"""`load_for_eval(checkpoint)`: the public way to get a model from a checkpoint for evaluation.

Accepts a training run directory (its latest complete checkpoint), one `step_*` directory, or a
`mohge-convert to-safetensors` export. Returns the plain single-device model (model/, no process
groups) in eval mode with every weight loaded, and its ModelConfig.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from mohge.model.config import ModelConfig
from mohge.train.errors import CheckpointError


def model_config_from_dict(values: dict) -> ModelConfig:
    """A ModelConfig (with its nested MoE and expert groups) from the dict a checkpoint stores."""
    from omegaconf import OmegaConf

    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), values)
    return OmegaConf.to_object(merged)


def read_weights(checkpoint: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(model config dict, full-size tensors by parameter name) from an export or a DCP checkpoint."""
    from mohge.launch.convert import _checkpoint_dir, load_consolidated, read_safetensors
    from mohge.train.checkpoint import read_meta

    if (Path(checkpoint) / "config.json").is_file():
        config, state = read_safetensors(checkpoint)
        return config["model"], state
    path = _checkpoint_dir(checkpoint)
    return read_meta(path)["model"], load_consolidated(path)


def load_for_eval(checkpoint: str, device: str | torch.device = "cpu", dtype: Optional[torch.dtype] = None,
                  expert_compute: str = "loop") -> tuple[nn.Module, ModelConfig]:
    """(model in eval mode on `device` with the checkpoint's weights, its config).

    `expert_compute="grouped"` uses the grouped-GEMM experts (CUDA); `dtype` casts floating weights.
    """
    from mohge.model.transformer import build_model

    values, state = read_weights(checkpoint)
    cfg = model_config_from_dict(values)
    model = build_model(cfg, "meta", expert_compute=expert_compute)
    model.to_empty(device=device)
    model.init_weights(0)  # buffers (e.g. the rope table); every parameter is overwritten below
    from mohge.launch.convert import split_experts
    from mohge.train.checkpoint import model_entries

    # Checkpoint keys -> views of the model's tensors (one entry per expert, also in the fused stacks).
    entries, state = model_entries(model), split_experts(state)
    missing, extra = sorted(entries.keys() - state.keys()), sorted(state.keys() - entries.keys())
    if missing or extra:
        raise CheckpointError(f"{checkpoint}: weights do not match the model its config describes (missing "
                              f"{missing[:3]}, unexpected {extra[:3]}); was it written by another mohge version?")
    with torch.no_grad():
        for key, view in entries.items():
            if view.shape != state[key].shape:
                raise CheckpointError(f"{checkpoint}: {key} has shape {tuple(state[key].shape)}, the config "
                                      f"gives {tuple(view.shape)}")
            view.copy_(state[key])
    if dtype is not None:
        model.to(dtype)
    return model.eval(), cfg
