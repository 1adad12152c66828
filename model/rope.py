"""Rotary embedding tables with optional context scaling: none, linear (position interpolation) and
YaRN (NTK-by-parts interpolation + attention temperature), as DeepSeek-V2 / megatron-core compute
them.

Shape legend: S sequence, R rotary dim (the head dim RoPE rotates), R2 = R/2 frequencies.

The table is [S, R]: cos in the first half, sin in the second ("rotate half" convention). YaRN's
magnitude correction mscale(factor, mscale) / mscale(factor, mscale_all_dim) is folded into that
table; its attention-temperature term multiplies the softmax scale (`softmax_scale_factor`).
"""

from __future__ import annotations

import math

import torch

from mohge.model.config import RopeScalingConfig


def yarn_get_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude / temperature term 0.1 * mscale * ln(factor) + 1 (1 when not extending)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_correction_dim(num_rotations: float, dim: int, theta: float, original_len: int) -> float:
    """The (fractional) frequency index whose wavelength fits `num_rotations` times into the
    original context: dim * ln(L / (2 pi r)) / (2 ln theta)."""
    return dim * math.log(original_len / (num_rotations * 2 * math.pi)) / (2 * math.log(theta))


def yarn_correction_range(beta_fast: float, beta_slow: float, dim: int, theta: float, original_len: int):
    """Integer [low, high] frequency indices between which YaRN blends interpolation and
    extrapolation (floor/ceil, clamped to the table, as DeepSeek-V2 and megatron-core)."""
    low = math.floor(yarn_correction_dim(beta_fast, dim, theta, original_len))
    high = math.ceil(yarn_correction_dim(beta_slow, dim, theta, original_len))
    return max(low, 0), min(high, dim - 1)


def inverse_frequencies(dim: int, theta: float, scaling: RopeScalingConfig | None = None, device=None) -> torch.Tensor:
    """Rotation frequencies [R2] after the configured context scaling."""
    base_R2 = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
    kind = "none" if scaling is None else scaling.type
    if kind == "none":
        return base_R2
    if kind == "linear":
        return base_R2 / scaling.factor
    # yarn: high frequencies (index < low) keep their value (extrapolate), low frequencies
    # (index > high) are divided by the factor (interpolate), a linear ramp blends in between.
    low, high = yarn_correction_range(scaling.beta_fast, scaling.beta_slow, dim, theta, scaling.original_max_seq_len)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp_R2 = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    extrapolate_R2 = 1.0 - ramp_R2
    return base_R2 / scaling.factor * (1 - extrapolate_R2) + base_R2 * extrapolate_R2


def rope_cache(
    seq_len: int, dim: int, theta: float, scaling: RopeScalingConfig | None = None, device=None
) -> torch.Tensor:
    """cos/sin table [S, R] for positions 0..seq_len-1, YaRN's magnitude correction included."""
    inv_freq_R2 = inverse_frequencies(dim, theta, scaling, device)
    angles_SR2 = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq_R2)
    table_SR = torch.cat([angles_SR2.cos(), angles_SR2.sin()], dim=-1)
    if scaling is not None and scaling.type == "yarn":
        table_SR = table_SR * (
            yarn_get_mscale(scaling.factor, scaling.mscale) / yarn_get_mscale(scaling.factor, scaling.mscale_all_dim)
        )
    return table_SR


def softmax_scale_factor(scaling: RopeScalingConfig | None) -> float:
    """Multiplier of 1/sqrt(head dim) on the attention logits: YaRN's temperature
    mscale(factor, mscale_all_dim)^2 (DeepSeek-V2), 1 otherwise."""
    if scaling is None or scaling.type != "yarn" or not scaling.mscale_all_dim:
        return 1.0
    return yarn_get_mscale(scaling.factor, scaling.mscale_all_dim) ** 2


def apply_rope(x_BSHR: torch.Tensor, cache_SR: torch.Tensor) -> torch.Tensor:
    """Rotates the last dim of x [B, S, H, R] by positions 0..S-1 of the table (rotate half)."""
    seq_len, half = x_BSHR.shape[1], x_BSHR.shape[-1] // 2
    cos = cache_SR[:seq_len, :half].view(1, seq_len, 1, half)
    sin = cache_SR[:seq_len, half:].view(1, seq_len, 1, half)
    x1, x2 = x_BSHR.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).type_as(x_BSHR)
