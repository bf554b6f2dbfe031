"""Rank policies and the break-even guard, on known answers."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_lowrank.config import ConfigError, LowRankConfig
from onnx_lowrank.core.ranks import break_even_rank, linear_factored_params, select_rank


def _select(config, m, n, sigma=None, default_multiple_of=1):
    sigma = np.ones(min(m, n)) if sigma is None else np.asarray(sigma, dtype=float)
    return select_rank(
        config, params_before=m * n, max_rank=min(m, n), factored_params=linear_factored_params(m, n),
        spectrum=lambda k: (sigma, float(np.sum(sigma**2))), default_multiple_of=default_multiple_of,
    )


@pytest.mark.parametrize("m,n,expected", [(384, 384, 192), (384, 1536, 308), (64, 48, 28), (10, 1, 1), (256, 10, 10)])
def test_break_even_rank(m, n, expected):
    # ceil(m n / (m + n)); 256x10 never pays: 10 * 266 > 2560, so the break-even is min(m, n) = 10
    assert break_even_rank(m * n, linear_factored_params(m, n), min(m, n)) == expected


def test_ratio_keeps_that_fraction_of_parameters():
    choice = _select(LowRankConfig(ratio=0.5), 384, 384)
    assert choice.rank == 96 and choice.break_even == 192  # 96 * 768 = 0.5 * 384^2
    assert _select(LowRankConfig(ratio=0.25), 768, 3072).rank == int(0.25 * 768 * 3072 / 3840)


def test_fixed_rank_and_break_even_guard():
    assert _select(LowRankConfig(rank=50), 384, 384).rank == 50
    skipped = _select(LowRankConfig(rank=192), 384, 384)
    assert skipped.rank is None and skipped.reason.startswith("unprofitable: rank 192 >= break-even 192")
    forced = _select(LowRankConfig(rank=100000, force=True), 384, 200)
    assert forced.rank == 200 and "clamped to min(m, n) = 200" in forced.note


def test_energy_policy_known_spectrum():
    sigma = np.array([4.0, 2.0, 1.0, 1.0] + [0.0] * 60)  # energies 16, 4, 1, 1 of 22
    assert _select(LowRankConfig(energy=0.7), 64, 64, sigma).rank == 1
    assert _select(LowRankConfig(energy=0.9), 64, 64, sigma).rank == 2  # 20/22 = 0.909
    assert _select(LowRankConfig(energy=0.95), 64, 64, sigma).rank == 3
    assert _select(LowRankConfig(energy=1.0), 64, 64, sigma).rank == 4
    flat = _select(LowRankConfig(energy=0.9), 64, 64)  # flat spectrum: needs 58 > break-even 32
    assert flat.rank is None and "0.9 of the energy needs rank > 32" in flat.reason


def test_multiple_of_rounds_up_unless_that_reaches_break_even():
    assert _select(LowRankConfig(rank=50, multiple_of=16), 384, 384).rank == 64
    assert _select(LowRankConfig(rank=185, multiple_of=16), 384, 384).rank == 176  # 192 is break-even
    # The conv default (16) only applies where it stays profitable, and never rounds down.
    assert _select(LowRankConfig(rank=5), 40, 40, default_multiple_of=16).rank == 16
    assert _select(LowRankConfig(rank=5), 24, 24, default_multiple_of=16).rank == 5


def test_min_rank_is_one():
    assert _select(LowRankConfig(ratio=0.001), 64, 64).rank == 1


@pytest.mark.parametrize("kwargs,message", [
    ({"ratio": 1.5}, "--ratio must be in (0, 1]"),
    ({"ratio": 0.0}, "--ratio must be in (0, 1]"),
    ({"rank": -3}, "--rank must be a positive integer"),
    ({"rank": 2, "energy": 0.9}, "choose one rank policy"),
    ({"energy": float("nan")}, "--energy must be in (0, 1]"),
    ({"method": "lu"}, "--method must be one of rsi, rsvd, svd"),
    ({"conv_scheme": "cp"}, "--conv-scheme must be one of"),
    ({"power_iters": -1}, "--power-iters must be an integer >= 0"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(ConfigError, match=None) as info:
        LowRankConfig(**kwargs)
    assert message in str(info.value)


def test_config_is_frozen_and_default_policy():
    config = LowRankConfig(include=["a.*"])
    assert config.include == ("a.*",) and config.policy == ("ratio", 0.5)
    with pytest.raises(AttributeError):
        config.rank = 3  # type: ignore[misc]
