"""Throughput accounting: FLOPs per token from the routing actually measured, TFLOP/s and MFU."""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

from mohge.model.config import ModelConfig

# Dense bf16 tensor-core peak per device, TFLOP/s (vendor datasheets, no sparsity).
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "GH200": 989.0, "A100": 312.0, "A800": 312.0,
                    "L40S": 362.0, "B200": 2250.0}


def device_peak_tflops(device: torch.device) -> Optional[float]:
    """bf16 peak of `device` (env MOHGE_PEAK_TFLOPS overrides); None on CPU or an unknown GPU."""
    if os.environ.get("MOHGE_PEAK_TFLOPS"):
        return float(os.environ["MOHGE_PEAK_TFLOPS"])
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in BF16_PEAK_TFLOPS.items():
        if key in name:
            return peak
    return None


def measured_group_fractions(moe_metrics: dict) -> Optional[list[float]]:
    """Mean over MoE layers of the share of routed slots per group (from the step's metrics)."""
    layers = [entry["group_fraction"] for entry in moe_metrics.values()]
    if not layers:
        return None
    return [sum(col) / len(layers) for col in zip(*layers)]


def throughput(cfg: ModelConfig, seq_len: int, tokens_per_s: float, group_fractions: Optional[Sequence[float]],
               peak_tflops: Optional[float], world_size: int = 1) -> dict:
    """tflops (per device) from the heterogeneous experts tokens really used, and MFU."""
    flops_per_token = cfg.flops_per_token(seq_len, group_fractions)
    tflops = flops_per_token * tokens_per_s / world_size / 1e12
    out = {"model_flops_per_token": flops_per_token, "tflops": tflops}
    if peak_tflops:
        out["mfu"] = tflops / peak_tflops
    return out
