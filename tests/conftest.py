"""Shared fixtures: tiny configs composed from the real presets."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture
def tiny_cfg():
    from mohge.train.hydra_config import compose_config

    return compose_config("tiny_mohge")


def make_moe(**overrides):
    """A small MoEConfig: three groups of widths 8/16/24 with 4 experts each, unless overridden."""
    from mohge.model.config import ExpertGroupConfig, MoEConfig

    base = dict(
        groups=[ExpertGroupConfig(4, 8), ExpertGroupConfig(4, 16), ExpertGroupConfig(4, 24)],
        k_group=2,
        top_k=3,
        group_aux_coeff=1e-2,
        group_aux_start_fraction=0.0,
        group_aux_width_interval=16,
        intra_aux_coeff=1e-2,
        z_loss_coeff=1e-3,
    )
    base.update(overrides)
    return MoEConfig(**base)


def init_module(module: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return module
