"""The planner on its own: per-layer and global ranks, the latency guard, whiteners, MACs, notes."""

from __future__ import annotations

import math

import numpy as np
import pytest
from onnx import helper

from builders import init, make_model, vi
from onnx_lowrank.config import LowRankConfig
from onnx_lowrank.core.latency_model import predicted_ratio
from onnx_lowrank.core.ranks import break_even_rank, select_rank
from onnx_lowrank.passes import find_candidates
from onnx_lowrank.passes.planning import (PassState, attach_whiteners, choose_ranks, estimate_macs, join_notes,
                                          latency_guard)
from onnx_lowrank.statistics import CalibrationStats


def _chain(weights: dict[str, np.ndarray], *, batch="batch"):
    """x -> MatMul(w_1) -> ... -> MatMul(w_k): node ``<name>_mm`` reads initializer ``<name>``."""
    nodes, x = [], "x"
    for i, (name, w) in enumerate(weights.items()):
        out = "y" if i == len(weights) - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [x, name], [out], name=f"{name}_mm"))
        x = out
    first, last = next(iter(weights.values())), list(weights.values())[-1]
    return make_model(nodes, [vi("x", [batch, first.shape[0]])], [vi("y", [batch, last.shape[1]])],
                      [init(k, v.astype(np.float32)) for k, v in weights.items()])


def _active(model, config):
    return [(row, cand) for row, cand in find_candidates(model, config) if cand is not None]


def _orthogonal(rng, n):
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return q


# -- per-layer ratio policy ---------------------------------------------------------------------

def test_ratio_policy_ranks_by_hand_and_by_select_rank():
    rng = np.random.default_rng(0)
    weights = {"sq": rng.standard_normal((64, 64)), "wide": rng.standard_normal((64, 32)),
               "thin": rng.standard_normal((32, 100))}
    config = LowRankConfig(ratio=0.5)
    model = _chain(weights)
    active = _active(model, config)
    selected = choose_ranks(active, config)
    ranks = {cand.label: rank for cand, rank, _ in selected}
    # Largest r with r (m + n) <= ratio m n (core/ranks.py: _largest_rank_within), then the
    # break-even check factored(r) < m n.
    assert ranks == {"sq_mm": math.floor(0.5 * 64 * 64 / (64 + 64)),  # 16
                     "wide_mm": math.floor(0.5 * 64 * 32 / (64 + 32)),  # 10
                     "thin_mm": math.floor(0.5 * 32 * 100 / (32 + 100))}  # 12
    assert ranks == {"sq_mm": 16, "wide_mm": 10, "thin_mm": 12}
    for row, cand in active:
        m, n = cand.shape
        choice = select_rank(config, params_before=m * n, max_rank=min(m, n),
                             factored_params=lambda r, m=m, n=n: r * (m + n), spectrum=cand.spectrum)
        assert ranks[cand.label] == choice.rank
        assert row.break_even_rank == choice.break_even == math.ceil(m * n / (m + n))
        assert row.break_even_rank == break_even_rank(m * n, cand.factored_params, min(m, n))
        assert row.reason is None
    assert {r.node: r.break_even_rank for r, _ in active} == {"sq_mm": 32, "wide_mm": 22, "thin_mm": 25}


def test_ratio_one_reaches_break_even_and_stays_dense():
    rng = np.random.default_rng(1)
    config = LowRankConfig(ratio=1.0)
    active = _active(_chain({"sq": rng.standard_normal((64, 64)), "wide": rng.standard_normal((64, 32))}), config)
    selected = choose_ranks(active, config)
    # 64x64: r = floor(4096 / 128) = 32 = break-even: 4096 >= 4096 parameters, dense.
    # 64x32: r = floor(2048 / 96) = 21 < break-even 22 (2016 < 2048): factorized.
    assert [(c.label, r) for c, r, _ in selected] == [("wide_mm", 21)]
    row = active[0][0]
    assert row.reason.startswith("unprofitable: rank 32 >= break-even 32 (4096 >= 4096 parameters")


# -- global budget ------------------------------------------------------------------------------

def test_global_target_params_budget_and_spectra():
    rng = np.random.default_rng(2)
    u, v = _orthogonal(rng, 64), _orthogonal(rng, 64)
    weights = {
        "flat": _orthogonal(rng, 64),  # every singular value 1
        "steep": (u * 0.5 ** np.arange(64)) @ v.T,  # sigma_i = 2^-i
        "tiny": rng.standard_normal((64, 1)),  # break-even 1: unprofitable at any rank
    }
    fraction = 0.5
    config = LowRankConfig(target_params=fraction)
    active = _active(_chain(weights), config)
    selected = choose_ranks(active, config)
    ranks = {cand.label: rank for cand, rank, _ in selected}
    rows = {row.node: row for row, _ in active}
    assert rows["tiny_mm"].reason == "unprofitable at any rank (break-even 1)"

    total = sum(c.params_before for _, c in active)  # 4096 + 4096 + 64
    chosen = {id(c) for c, _, _ in selected}
    used = sum(c.factored_params(r) for c, r, _ in selected) + sum(c.params_before for _, c in active
                                                                  if id(c) not in chosen)
    assert used <= fraction * total

    # The greedy by hand: steep's units 2 and 3 gain 3/16 and 3/64 of its energy, more than the
    # 1/64 of every flat unit; its 4th (3/256) gains less. Each unit costs 128 parameters; flat
    # takes the rest of the budget left by tiny (dense, 64) and steep's 3 units.
    flat_rank = int((fraction * total - 64) // 128) - 3
    assert ranks == {"steep_mm": 3, "flat_mm": flat_rank}
    assert flat_rank == 28
    assert ranks["steep_mm"] < ranks["flat_mm"]
    assert rows["flat_mm"].break_even_rank == rows["steep_mm"].break_even_rank == 32


def test_global_budget_too_small_keeps_rank_one_everywhere():
    rng = np.random.default_rng(3)
    config = LowRankConfig(target_params=0.001)
    active = _active(_chain({"a": rng.standard_normal((64, 64)), "b": rng.standard_normal((64, 64))}), config)
    selected = choose_ranks(active, config)
    assert [(c.label, r) for c, r, _ in selected] == [("a_mm", 1), ("b_mm", 1)]


# -- latency guard ------------------------------------------------------------------------------

def _latency_case():
    rng = np.random.default_rng(4)
    model = _chain({"big": rng.standard_normal((512, 512)), "small": rng.standard_normal((512, 64)),
                    "tiny": rng.standard_normal((64, 64))})
    active = _active(model, LowRankConfig())
    ranks = {"big_mm": 32, "small_mm": 16, "tiny_mm": 16}
    return [(cand, ranks[cand.label], row) for row, cand in active]


def test_latency_model_drops_slower_keeps_faster():
    selected = _latency_case()
    kept = latency_guard(selected, LowRankConfig(latency="model"))
    assert [c.label for c, _, _ in kept] == ["big_mm"]
    big, tiny = selected[0][2], selected[2][2]
    expected_big = predicted_ratio(512, 512, 32, 1)
    assert expected_big < 1.0
    assert big.note == f"predicted time ratio {expected_big:.2f}"
    expected_tiny = predicted_ratio(64, 64, 16, 1)
    assert expected_tiny >= 1.0
    assert tiny.reason == f"slower in onnxruntime: predicted time ratio {expected_tiny:.2f} at rank 16 " \
                          "(1 rows per inference)"
    assert "slower in onnxruntime" in selected[1][2].reason


def test_latency_model_uses_rows_from_macs():
    selected = _latency_case()[2:]  # tiny 64x64 at rank 16
    cand, rank, row = selected[0]
    row.params_before = cand.params_before
    row.macs_before = 128 * cand.params_before  # 128 rows per inference
    kept = latency_guard(selected, LowRankConfig(latency="model"))
    ratio = predicted_ratio(64, 64, 16, 128)
    assert ratio < 1.0  # at 128 rows the FLOPs win over the extra call
    assert len(kept) == 1 and row.note == f"predicted time ratio {ratio:.2f}"


def test_latency_off_keeps_everything():
    selected = _latency_case()
    assert latency_guard(selected, LowRankConfig(latency="off")) == selected


def test_latency_measure_uses_the_measured_callable():
    selected = _latency_case()
    calls = []

    def measured(m, n, r, rows):
        calls.append((m, n, r, rows))
        return 2.0

    kept = latency_guard(selected, LowRankConfig(latency="measure"), measured)
    assert kept == []
    assert calls == [(512, 512, 32, 1), (512, 64, 16, 1), (64, 64, 16, 1)]
    for _, rank, row in selected:
        assert row.reason.startswith("slower in onnxruntime: measured time ratio 2.00")
        assert f"at rank {rank}" in row.reason


def test_latency_measure_without_callable_falls_back_to_model():
    selected = _latency_case()
    kept = latency_guard(selected, LowRankConfig(latency="measure"), None)
    assert [c.label for c, _, _ in kept] == ["big_mm"]
    assert selected[0][2].note.startswith("predicted time ratio")


# -- whiteners ----------------------------------------------------------------------------------

def _shared_model(seed=5):
    """mm1 reads w with x; mm2 reads w with r = Relu(h1): one weight, two activations."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((16, 16)).astype(np.float32)
    v = rng.standard_normal((16, 8)).astype(np.float32)
    return make_model([helper.make_node("MatMul", ["x", "w"], ["h1"], name="mm1"),
                       helper.make_node("Relu", ["h1"], ["r"], name="relu"),
                       helper.make_node("MatMul", ["r", "w"], ["h2"], name="mm2"),
                       helper.make_node("MatMul", ["h2", "v"], ["y"], name="mm3")],
                      [vi("x", ["batch", 16])], [vi("y", ["batch", 8])], [init("w", w), init("v", v)])


class FakeStatistics:
    """Gram matrices of given activations, as collect_grams would return them; counts calls."""

    def __init__(self, grams: dict[str, np.ndarray], rows: int):
        self.grams, self.rows, self.calls = grams, rows, []

    def __call__(self, model, requests, inputs, *, progress=False, base_dir=None):
        self.calls.append(sorted(c.label for c in requests))
        keys = {(c.activation, c.feature_key) for c in requests}
        return CalibrationStats(grams={k: self.grams[k[0]] for k in keys}, rows={k: self.rows for k in keys},
                                samples=self.rows, seconds=0.0)


def _grams(seed=6, rows=200):
    rng = np.random.default_rng(seed)
    out = {}
    for name in ("x", "r", "h2"):
        x = rng.standard_normal((rows, 16)) * np.linspace(0.1, 3.0, 16)
        out[name] = x.T @ x
    return out


CALIB = {"x": np.zeros((4, 16), np.float32)}  # never run: the fake statistics supply the Gram matrices


def test_calibration_without_statistics_is_refused():
    model = _shared_model()
    config = LowRankConfig()
    with pytest.raises(ValueError, match=r"PassState\.statistics"):
        attach_whiteners(model, _active(model, config), config, CALIB, PassState(statistics=None))


def test_no_calibration_or_whiten_none_attaches_nothing():
    model = _shared_model()
    fake = FakeStatistics(_grams(), 200)
    state = PassState(statistics=fake)
    for calibration, config in ((None, LowRankConfig()), (CALIB, LowRankConfig(whiten="none"))):
        active = _active(model, config)
        attach_whiteners(model, active, config, calibration, state)
        assert all(c.whitener is None for _, c in active)
    assert fake.calls == []


def test_whiteners_from_statistics_shared_weight_sums_grams_and_reuse():
    model = _shared_model()
    grams = _grams()
    fake = FakeStatistics(grams, 200)
    state = PassState(statistics=fake)
    config = LowRankConfig()
    eps = config.whiten_eps

    active = _active(model, config)
    attach_whiteners(model, active, config, CALIB, state)
    assert fake.calls == [["mm1", "mm2", "mm3"]]
    cands = {c.label: c for _, c in active}
    assert all(c.whitener is not None for c in cands.values())
    assert cands["mm1"].whitener is cands["mm2"].whitener  # one weight, one whitener
    # Nodes sharing w minimize their summed output error: L L^T = G_x + G_r + jitter.
    shared = grams["x"] + grams["r"]
    L = cands["mm1"].whitener.L
    assert cands["mm1"].whitener.method == "cholesky"
    np.testing.assert_allclose(L @ L.T, shared + eps * np.trace(shared) / 16 * np.eye(16), rtol=1e-10, atol=1e-8)
    L3 = cands["mm3"].whitener.L
    np.testing.assert_allclose(L3 @ L3.T, grams["h2"] + eps * np.trace(grams["h2"]) / 16 * np.eye(16),
                               rtol=1e-10, atol=1e-8)
    assert all(c.note is None for c in cands.values())  # 200 rows >= 16 features

    # A second run on the same state: fresh candidates, statistics and whiteners reused.
    again = _active(model, config)
    attach_whiteners(model, again, config, CALIB, state)
    assert len(fake.calls) == 1
    for _, cand in again:
        assert cand.whitener is cands[cand.label].whitener


def test_whitening_with_fewer_rows_than_features_is_noted():
    model = _shared_model()
    fake = FakeStatistics(_grams(rows=10), 10)
    config = LowRankConfig()
    active = _active(model, config)
    attach_whiteners(model, active, config, CALIB, PassState(statistics=fake))
    notes = {c.label: c.note for _, c in active}
    # mm1 + mm2 share w: 20 rows; mm3 alone: 10 rows; both below 16 features only for mm3.
    assert notes["mm1"] is None and notes["mm2"] is None
    assert notes["mm3"] == ("calibration gave 10 input rows for 16 features: its whitened error is optimistic; "
                            "give more samples")


# -- MACs ---------------------------------------------------------------------------------------

def test_estimate_macs_two_layer_mlp():
    rng = np.random.default_rng(7)
    model = make_model(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
         helper.make_node("Relu", ["h"], ["hr"], name="relu"),
         helper.make_node("MatMul", ["hr", "w2"], ["y"])],  # unnamed: labelled MatMul_2
        [vi("x", ["batch", 64])], [vi("y", ["batch", 10])],
        [init("w1", rng.standard_normal((64, 32)).astype(np.float32)),
         init("w2", rng.standard_normal((32, 10)).astype(np.float32))])
    macs, shapes = estimate_macs(model, None)
    assert macs == {"fc1": 64 * 32, "MatMul_2": 32 * 10}  # symbolic batch taken as 1
    assert shapes["h"] == [1, 32] and shapes["y"] == [1, 10]
    macs8, shapes8 = estimate_macs(model, {"x": [8, 64]})
    assert macs8 == {"fc1": 8 * 64 * 32, "MatMul_2": 8 * 32 * 10}
    assert shapes8["hr"] == [8, 32]


# -- notes --------------------------------------------------------------------------------------

@pytest.mark.parametrize("a, b, joined", [
    (None, None, None), ("", None, None), ("", "", None), ("a", None, "a"), (None, "b", "b"),
    ("a", "b", "a; b"), ("a", "a", "a"), ("", "b", "b"),
])
def test_join_notes(a, b, joined):
    assert join_notes(a, b) == joined
