"""Global rank allocation: spend one budget (parameters or MACs) across all layers.

Uniform policies are hostage to a few sensitive layers: halving every layer costs the layers
with flat spectra most of their energy while layers with steep spectra could give up far more.
Here each layer offers "rank units": going from rank ``r`` to ``r + 1`` costs
``cost(r + 1) - cost(r)`` and recovers ``sigma_{r+1}^2 / ||W||_F^2`` of its normalized
(whitened, when calibration data is given) energy. Starting every layer at rank 1, the unit with
the largest gain per cost anywhere in the model is bought while it fits the budget. A layer whose
next unit would reach its break-even rank offers "go dense" instead: all its remaining energy
for the rest of its dense cost. Since singular values decrease, each layer's gains per unit
decrease, so the greedy choice is the optimum of the convex relaxation (ties and the dense
step aside). Numpy only.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["AllocationLayer", "Allocation", "allocate"]

logger = logging.getLogger(__name__)


@dataclass
class AllocationLayer:
    """One weight to allocate a rank to.

    Parameters
    ----------
    key : hashable
        Identifies the layer in the result.
    energies : ndarray
        Squared singular values, descending, at least up to ``break_even - 1`` where known.
    total_energy : float
        ``||W||_F^2`` (of the whitened matrix when whitening): the normalizer.
    cost : callable
        Budget used at rank ``r`` (parameters, or MACs).
    dense_cost : float
        Budget used when the layer stays dense.
    break_even : int
        Ranks ``>= break_even`` do not pay: the layer goes dense instead.
    weight : float
        Importance of the layer's normalized error (1 for the energy allocation; the measured
        output sensitivity for ``--allocation weighted``).
    """

    key: Hashable
    energies: np.ndarray
    total_energy: float
    cost: Callable[[int], float]
    dense_cost: float
    break_even: int
    weight: float = 1.0

    def gain(self, rank: int) -> float:
        """Weighted normalized energy recovered by unit ``rank`` (1-based)."""
        if self.total_energy <= 0 or rank > len(self.energies):
            return 0.0
        return self.weight * float(self.energies[rank - 1]) / self.total_energy

    def tail(self, rank: int) -> float:
        """Weighted normalized energy lost at ``rank``: the relative squared truncation error."""
        if self.total_energy <= 0:
            return 0.0
        return self.weight * max(0.0, 1.0 - float(np.sum(self.energies[:rank])) / self.total_energy)


@dataclass
class Allocation:
    """Chosen ranks (``None`` = dense), the budget used, and the total normalized error."""

    ranks: dict[Hashable, int | None]
    budget: float
    used: float
    total_error: float
    reachable: bool


def allocate(layers: Sequence[AllocationLayer], budget: float) -> Allocation:
    """Choose each layer's rank to minimize the summed normalized truncation error within ``budget``.

    Parameters
    ----------
    layers : sequence of AllocationLayer
    budget : float
        Total budget (same unit as the layers' costs).

    Returns
    -------
    Allocation
        ``reachable`` is False when even rank 1 everywhere exceeds the budget (every layer
        then gets rank 1, the smallest model possible).

    Notes
    -----
    Each unit is a heap entry keyed by gain per cost; popping one whose cost no longer fits
    skips that layer for good (its later units cost at least as much per gain), but cheaper units
    of other layers are still bought, so the budget is filled as far as the unit sizes allow.
    """
    ranks: dict[Hashable, int | None] = {}
    used = 0.0
    heap: list[tuple[float, int, int]] = []
    for i, layer in enumerate(layers):
        ranks[layer.key] = 1
        used += layer.cost(1)
    reachable = used <= budget
    for i, layer in enumerate(layers):
        _push(heap, layers, i, 1)
    while heap:
        _, i, rank = heapq.heappop(heap)
        layer = layers[i]
        if ranks[layer.key] != rank:
            continue  # stale entry
        step, _ = _next_unit(layer, rank)
        if used + step > budget:
            continue
        used += step
        if rank + 1 >= layer.break_even:
            ranks[layer.key] = None  # dense: no further units
        else:
            ranks[layer.key] = rank + 1
            _push(heap, layers, i, rank + 1)
    total = sum(0.0 if ranks[l.key] is None else l.tail(ranks[l.key]) for l in layers)  # type: ignore[arg-type]
    return Allocation(ranks=ranks, budget=budget, used=used, total_error=total, reachable=reachable)


def _next_unit(layer: AllocationLayer, rank: int) -> tuple[float, float]:
    """(cost, gain) of the step after ``rank``: one more rank, or dense at break-even."""
    if rank + 1 >= layer.break_even:
        return layer.dense_cost - layer.cost(rank), layer.tail(rank)
    return layer.cost(rank + 1) - layer.cost(rank), layer.gain(rank + 1)


def _push(heap: list[tuple[float, int, int]], layers: Sequence[AllocationLayer], i: int, rank: int) -> None:
    cost, gain = _next_unit(layers[i], rank)
    if gain <= 0.0:
        return  # nothing left to recover (an exactly low-rank layer): never pay for it
    if cost <= 0:
        priority = float("inf")
    else:
        priority = gain / cost
    # heapq is a min-heap: negate; the layer index breaks ties deterministically.
    heapq.heappush(heap, (-priority, i, rank))
