"""RoPE scaling (model/rope.py) against the published formulas, recomputed here per dimension."""

from __future__ import annotations

import math

import pytest
import torch

from mohge.model.config import ConfigError, RopeScalingConfig
from mohge.model.rope import rope_cache, softmax_scale_factor, yarn_get_mscale

POSITIONS = [0, 1, 7, 100, 1023, 4095, 8191]


def _reference_yarn_freq(d: int, dim: int, theta: float, s: float, L: int, beta_fast: float, beta_slow: float) -> float:
    """theta'_d of DeepSeek-V2's DeepseekV2YarnRotaryEmbedding, in float64 plain math:
    correction dims floor/ceil(dim * ln(L / (2 pi beta)) / (2 ln theta)), a linear ramp between
    them, inv = inter * (1 - mask) + extra * mask with mask = 1 - ramp."""
    def corr(rot):
        return dim * math.log(L / (rot * 2 * math.pi)) / (2 * math.log(theta))

    low, high = max(math.floor(corr(beta_fast)), 0), min(math.ceil(corr(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = min(max((d - low) / (high - low), 0.0), 1.0)
    extra = 1.0 / theta ** (2 * d / dim)
    return extra / s * ramp + extra * (1 - ramp)


def _paper_yarn_freq(d: int, dim: int, theta: float, s: float, L: int, alpha: float, beta: float):
    """The YaRN paper's NTK-by-parts h(theta_d) with r = L / lambda_d, continuous ramp gamma(r)."""
    base = 1.0 / theta ** (2 * d / dim)
    r = L / (2 * math.pi / base)
    gamma = 0.0 if r < alpha else 1.0 if r > beta else (r - alpha) / (beta - alpha)
    return (1 - gamma) * base / s + gamma * base


def _table(freqs: list[float], mscale: float) -> torch.Tensor:
    rows = []
    for p in POSITIONS:
        rows.append([math.cos(p * f) * mscale for f in freqs] + [math.sin(p * f) * mscale for f in freqs])
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize("dim,theta,factor,original,mscale,mscale_all", [
    (64, 10000.0, 40.0, 4096, 0.707, 0.707),  # the authors' A3B (MLA rope dim 64)
    (64, 10000.0, 40.0, 4096, 1.0, 0.0),  # megatron-core's current defaults
    (128, 500000.0, 8.0, 8192, 1.0, 1.0),
    (32, 10000.0, 4.0, 2048, 1.0, 0.0),
])
def test_yarn_table_matches_deepseek_formula(dim, theta, factor, original, mscale, mscale_all):
    sc = RopeScalingConfig(type="yarn", factor=factor, original_max_seq_len=original, mscale=mscale,
                           mscale_all_dim=mscale_all)
    got = rope_cache(max(POSITIONS) + 1, dim, theta, sc)[POSITIONS].double()
    freqs = [_reference_yarn_freq(d, dim, theta, factor, original, 32.0, 1.0) for d in range(dim // 2)]
    m = (0.1 * mscale * math.log(factor) + 1) / (0.1 * mscale_all * math.log(factor) + 1)
    torch.testing.assert_close(got, _table(freqs, m), atol=2e-3, rtol=0)
    # Away from the ramp the paper's continuous definition gives the same frequencies: the fastest
    # dims keep theta_d (extrapolation), the slowest are divided by the factor (interpolation).
    paper = [_paper_yarn_freq(d, dim, theta, factor, original, 1.0, 32.0) for d in range(dim // 2)]
    assert math.isclose(freqs[0], paper[0], rel_tol=1e-12) and math.isclose(freqs[0], 1.0)
    assert math.isclose(freqs[-1], paper[-1], rel_tol=1e-12)
    assert math.isclose(freqs[-1], 1.0 / theta ** ((dim - 2) / dim) / factor, rel_tol=1e-12)


def test_yarn_mscale_and_softmax_temperature():
    assert yarn_get_mscale(1.0, 0.707) == 1.0
    assert math.isclose(yarn_get_mscale(40.0, 0.707), 0.1 * 0.707 * math.log(40) + 1)
    sc = RopeScalingConfig(type="yarn", factor=40.0, mscale=0.707, mscale_all_dim=0.707)
    assert math.isclose(softmax_scale_factor(sc), (0.0707 * math.log(40) + 1) ** 2)
    assert softmax_scale_factor(RopeScalingConfig(type="yarn", factor=40.0)) == 1.0  # mscale_all_dim 0
    assert softmax_scale_factor(RopeScalingConfig(type="linear", factor=4.0)) == 1.0
    assert softmax_scale_factor(None) == 1.0


def test_linear_scaling_divides_positions():
    sc = RopeScalingConfig(type="linear", factor=4.0)
    got = rope_cache(max(POSITIONS) + 1, 16, 10000.0, sc)[POSITIONS].double()
    freqs = [1.0 / 10000.0 ** (2 * d / 16) / 4.0 for d in range(8)]
    torch.testing.assert_close(got, _table(freqs, 1.0), atol=2e-3, rtol=0)
    plain = rope_cache(100, 16, 10000.0)
    # position p under factor 4 rotates like position p/4 unscaled
    torch.testing.assert_close(rope_cache(400, 16, 10000.0, sc)[::4], plain[:100], atol=1e-5, rtol=0)


def test_no_scaling_is_plain_rope():
    got = rope_cache(max(POSITIONS) + 1, 16, 10000.0)[POSITIONS].double()
    freqs = [1.0 / 10000.0 ** (2 * d / 16) for d in range(8)]
    torch.testing.assert_close(got, _table(freqs, 1.0), atol=2e-3, rtol=0)


@pytest.mark.parametrize("fields,needle", [
    (dict(type="ntk"), "model.rope_scaling.type"),
    (dict(factor=4.0), "type=none"),
    (dict(type="yarn", factor=0.5), "model.rope_scaling.factor"),
    (dict(type="linear", factor=2.0, beta_fast=16.0), "only apply to type=yarn"),
    (dict(type="yarn", factor=4.0, beta_fast=1.0, beta_slow=2.0), "beta_fast"),
])
def test_bad_rope_scaling_names_the_field(fields, needle):
    with pytest.raises(ConfigError, match=needle):
        RopeScalingConfig(**fields).validate()
