"""Rank policies: fixed rank, parameter ratio, spectral energy, rounding and the break-even guard.

A layer with weight W (m x n) costs ``m * n`` parameters dense and ``r * (m + n)`` as two
factors, so factorizing only pays below the break-even rank ``m * n / (m + n)``. Op families
whose factored form costs something else (Tucker-2 convs, grouped convs) pass their own
``factored_params`` function; everything here works on that function, never on the formula.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from onnx_lowrank.config import LowRankConfig

__all__ = ["RankChoice", "break_even_rank", "select_rank", "linear_factored_params"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankChoice:
    """The outcome of a rank policy for one layer.

    ``rank`` is ``None`` when the layer stays dense; ``reason`` then says why. ``note`` explains
    adjustments (clamping, rounding) of a chosen rank.
    """

    rank: int | None
    break_even: int
    reason: str | None = None
    note: str | None = None


def linear_factored_params(m: int, n: int) -> Callable[[int], int]:
    """Parameter count of ``A (m x r) @ B (r x n)`` as a function of ``r``."""
    return lambda r: r * (m + n)


def break_even_rank(
    params_before: int, factored_params: Callable[[int], int], max_rank: int
) -> int:
    """Smallest rank at which the factored form stops saving parameters.

    Parameters
    ----------
    params_before : int
        Dense parameter count of the weight.
    factored_params : callable
        Parameters of the factored form at rank ``r``; non-decreasing in ``r``.
    max_rank : int
        Largest meaningful rank (``min(m, n)`` for a matrix).

    Returns
    -------
    int
        The break-even rank ``r_be``: ranks ``r < r_be`` reduce parameters, ranks ``>= r_be``
        do not. ``max_rank + 1`` when every rank up to ``max_rank`` saves parameters.

    Notes
    -----
    For a plain matrix this is ``ceil(m * n / (m + n))``; e.g. 384 x 384 gives 192.
    """
    lo, hi = 1, max_rank + 1
    while lo < hi:  # binary search: factored_params is monotone in r
        mid = (lo + hi) // 2
        if factored_params(mid) >= params_before:
            hi = mid
        else:
            lo = mid + 1
    return lo


def select_rank(
    config: LowRankConfig,
    *,
    params_before: int,
    max_rank: int,
    factored_params: Callable[[int], int],
    spectrum: Callable[[int], tuple[np.ndarray, float]],
    default_multiple_of: int = 1,
) -> RankChoice:
    """Apply the configured rank policy to one layer.

    Parameters
    ----------
    config : LowRankConfig
        Holds the policy (``rank``, ``ratio`` or ``energy``), ``multiple_of`` and ``force``.
    params_before : int
        Dense parameter count of the weight.
    max_rank : int
        ``min(m, n)`` of the matrix view; ranks are clamped to it.
    factored_params : callable
        Parameters of the factored form at rank ``r``.
    spectrum : callable
        ``spectrum(k)`` returns the leading ``k`` (or more) singular values, descending, and the
        total energy ``||W||_F^2``; only called by the energy policy.
    default_multiple_of : int
        Rounding used when ``config.multiple_of`` is ``None``; applied only where it keeps the
        layer profitable (conv ranks default to 16 because onnxruntime pads channels to 16).

    Returns
    -------
    RankChoice
        The rank, or ``None`` with the reason the layer stays dense.
    """
    be = break_even_rank(params_before, factored_params, max_rank)
    policy, value = config.policy
    notes: list[str] = []

    if policy == "rank":
        rank = int(value)
    elif policy == "ratio":
        budget = float(value) * params_before
        # Largest rank whose factored form fits the budget; at least 1 so tiny ratios still act.
        rank = max(1, _largest_rank_within(budget, factored_params, max_rank))
    else:
        # Without --force nothing at or above break-even is used, so the spectrum is only needed
        # up to there (an RSI estimate of a few hundred values instead of the full SVD).
        limit = max_rank if config.force else min(be, max_rank)
        rank = _energy_rank(spectrum, float(value), limit)
        if rank is None:
            rank = max(limit, 1)
            notes.append(f"{value:g} of the energy needs rank > {limit}")

    multiple = config.multiple_of if config.multiple_of is not None else default_multiple_of
    if multiple > 1 and rank % multiple:
        up = -(-rank // multiple) * multiple
        down = (rank // multiple) * multiple
        if up < be and up <= max_rank:
            notes.append(f"rounded {rank} up to a multiple of {multiple}")
            rank = up
        elif config.multiple_of is not None and down >= 1:
            notes.append(f"rounded {rank} down to a multiple of {multiple} (up reaches break-even)")
            rank = down

    if rank > max_rank:
        notes.append(f"rank {rank} clamped to min(m, n) = {max_rank}")
        rank = max_rank

    if factored_params(rank) >= params_before and not config.force:
        reason = (
            f"unprofitable: rank {rank} >= break-even {be} "
            f"({factored_params(rank)} >= {params_before} parameters; --force factorizes anyway)"
        )
        if notes:
            reason += f"; {'; '.join(notes)}"
        return RankChoice(rank=None, break_even=be, reason=reason)
    return RankChoice(rank=rank, break_even=be, note="; ".join(notes) or None)


def _largest_rank_within(budget: float, factored_params: Callable[[int], int], max_rank: int) -> int:
    lo, hi = 0, max_rank
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if factored_params(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _energy_rank(
    spectrum: Callable[[int], tuple[np.ndarray, float]], energy: float, limit: int
) -> int | None:
    """Smallest rank keeping ``energy`` of ``||W||_F^2``, or None when it exceeds ``limit``."""
    sigma, total = spectrum(limit)
    if total <= 0.0:
        return 1
    kept = np.cumsum(np.asarray(sigma, dtype=np.float64) ** 2)
    # A tiny relative tolerance so that energy=1.0 is reachable despite rounding in the sum.
    target = energy * total * (1.0 - 1e-12)
    hits = np.nonzero(kept >= target)[0]
    if hits.size == 0 or hits[0] + 1 > limit:
        return None
    return int(hits[0]) + 1
