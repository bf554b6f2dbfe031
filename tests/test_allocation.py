"""Global rank allocation: within budget, better than uniform ranks, dense where worth it."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_lowrank.core.allocation import AllocationLayer, allocate
from onnx_lowrank.core.ranks import break_even_rank, linear_factored_params


def _layer(key, m, n, decay):
    s = np.arange(1, min(m, n) + 1, dtype=float) ** -decay
    cost = linear_factored_params(m, n)
    return AllocationLayer(key=key, energies=s**2, total_energy=float(np.sum(s**2)), cost=cost,
                           dense_cost=m * n, break_even=break_even_rank(m * n, cost, min(m, n)))


LAYERS = [_layer("steep", 256, 256, 1.5), _layer("flat", 256, 256, 0.1), _layer("mid", 128, 512, 0.5),
          _layer("small", 64, 64, 1.0)]
DENSE = sum(layer.dense_cost for layer in LAYERS)


@pytest.mark.parametrize("fraction", [0.2, 0.35, 0.5])
def test_budget_is_met_and_filled(fraction):
    budget = fraction * DENSE
    result = allocate(LAYERS, budget)
    used = sum(l.dense_cost if result.ranks[l.key] is None else l.cost(result.ranks[l.key]) for l in LAYERS)
    assert used == pytest.approx(result.used) and used <= budget
    # filled up to less than one unit of the widest layer (m + n = 640)
    assert budget - used < 640


@pytest.mark.parametrize("fraction", [0.2, 0.35, 0.5])
def test_beats_uniform_ratio_at_equal_budget(fraction):
    result = allocate(LAYERS, fraction * DENSE)
    uniform = {l.key: max(1, int(fraction * l.dense_cost / l.cost(1))) for l in LAYERS}
    uniform_error = sum(l.tail(uniform[l.key]) for l in LAYERS)
    assert sum(l.cost(uniform[l.key]) for l in LAYERS) <= fraction * DENSE
    assert result.total_error < 0.9 * uniform_error
    # the flat spectrum gets more rank than the steep one
    flat, steep = result.ranks["flat"], result.ranks["steep"]
    assert flat is None or (steep is not None and flat > steep)


def test_flat_layer_goes_dense_when_budget_allows():
    result = allocate(LAYERS, 0.9 * DENSE)
    assert result.ranks["flat"] is None  # dense: below break-even it would keep losing energy


def test_unreachable_budget_gives_rank_one_everywhere():
    result = allocate(LAYERS, 10)
    assert not result.reachable and all(r == 1 for r in result.ranks.values())


def test_exactly_low_rank_layer_never_buys_more_than_needed():
    m = n = 64
    energies = np.array([4.0, 1.0] + [0.0] * 62)
    cost = linear_factored_params(m, n)
    layer = AllocationLayer("lowrank", energies, 5.0, cost, m * n, break_even_rank(m * n, cost, 64))
    assert allocate([layer], 10 * m * n).ranks["lowrank"] == 2


def test_measured_allocation_on_a_synthetic_table():
    from onnx_lowrank.search.sensitivity import LayerOptions, SensitivityTable, allocate_measured

    table = SensitivityTable(
        layers=[
            LayerOptions(["a"], [(1, 100, 0.9), (10, 1000, 0.1), (None, 4000, 0.0)]),
            LayerOptions(["b1", "b2"], [(1, 100, 0.05), (10, 1000, 0.01), (None, 4000, 0.0)]),
        ],
        dense_total=8000, unit="parameters", seconds=0.0,
    )
    ranks, loss = allocate_measured(table, 1100 / 8000)  # room for one upgrade: the sensitive layer
    assert ranks == {"a": 10, "b1": 1, "b2": 1} and loss == pytest.approx(0.15)
    ranks, _ = allocate_measured(table, 1.0)
    assert ranks == {"a": None, "b1": None, "b2": None}
    ranks, _ = allocate_measured(table, 0.01)  # below rank 1 everywhere: the smallest model
    assert ranks == {"a": 1, "b1": 1, "b2": 1}


def test_layer_weights_are_the_geometric_mean_of_loss_squared_over_tail():
    from onnx_lowrank.search.sensitivity import LayerOptions, SensitivityTable, layer_weights

    table = SensitivityTable(
        layers=[
            # probes at rank 1 and 5: losses 0.4 and 0.1, normalized energy lost 0.8 and 0.05
            LayerOptions(["a"], [(1, 10, 0.4), (5, 50, 0.1), (None, 100, 0.0)], tails=[0.8, 0.05]),
            LayerOptions(["b1", "b2"], [(1, 10, 0.0), (None, 100, 0.0)], tails=[0.0]),  # exactly rank 1
        ],
        dense_total=200, unit="parameters", seconds=0.0,
    )
    w = layer_weights(table)
    assert w["a"] == pytest.approx(np.sqrt((0.4 ** 2 / 0.8) * (0.1 ** 2 / 0.05)))  # gmean(0.2, 0.2) = 0.2
    assert w["b1"] == w["b2"] == pytest.approx(1.0)  # 0 / 0 floors to tiny / tiny: finite


def test_weights_steer_the_global_allocation():
    """Same spectra, same costs: the budget goes to the layer whose output matters more."""
    energies = np.linspace(1.0, 0.1, 20) ** 2
    cost = lambda r: r * 40  # noqa: E731  (a 20 x 20 weight)

    def layers(wa: float, wb: float) -> list[AllocationLayer]:
        return [AllocationLayer(k, energies, float(energies.sum()), cost, 400, 10, weight=w)
                for k, w in (("a", wa), ("b", wb))]

    even = allocate(layers(1.0, 1.0), 400).ranks
    assert even["a"] == even["b"]
    skewed = allocate(layers(10.0, 1.0), 400).ranks
    assert skewed["a"] is None or skewed["a"] > skewed["b"]
    # the weighted tail is what the allocation reports as its total error
    assert allocate(layers(2.0, 2.0), 400).total_error == pytest.approx(2 * allocate(layers(1.0, 1.0), 400).total_error)
