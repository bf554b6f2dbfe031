"""Factorization jobs on their own: run_job's errors, executors, shared weights, truncation, NaN on disk."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import helper
from threadpoolctl import threadpool_limits

from builders import init, make_model, vi
from onnx_lowrank.config import LowRankConfig
from onnx_lowrank.passes import find_candidates
from onnx_lowrank.passes.graph import GraphContext
from onnx_lowrank.passes.jobs import FactorJob, factorize_all, run_job, run_local


def _spectrum_matrix(rng, m, n, sigma):
    u, _ = np.linalg.qr(rng.standard_normal((m, len(sigma))))
    v, _ = np.linalg.qr(rng.standard_normal((n, len(sigma))))
    return ((u * sigma) @ v.T).astype(np.float32)


def _single(w: np.ndarray):
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                       [vi("x", ["batch", w.shape[0]])], [vi("y", ["batch", w.shape[1]])], [init("w", w)])
    (row, cand), = find_candidates(model, LowRankConfig())
    return model, row, cand


def _eckart_young(w: np.ndarray, rank: int) -> float:
    s = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    return float(np.sqrt(np.sum(s[rank:] ** 2) / np.sum(s ** 2)))


# -- run_job ------------------------------------------------------------------------------------

def test_run_job_close_to_eckart_young():
    rng = np.random.default_rng(0)
    w = _spectrum_matrix(rng, 128, 96, np.arange(1, 97) ** -0.5)  # slow decay: RSI has work to do
    _, _, cand = _single(w)
    rank = 16
    result = run_job(FactorJob(cand, rank, rank, LowRankConfig(), label="mm"))
    optimum = _eckart_young(w, rank)
    assert result.skipped is None
    assert result.optimal_error == pytest.approx(optimum, rel=1e-6)
    assert optimum <= result.rel_error <= 1.05 * optimum
    a, b = result.factors.a, result.factors.b
    assert a.shape == (128, rank) and b.shape == (rank, 96) and a.dtype == np.float32
    measured = np.linalg.norm(w.astype(np.float64) - a.astype(np.float64) @ b) / np.linalg.norm(w)
    assert result.rel_error == pytest.approx(measured, rel=1e-5)
    assert result.whitened_error is None and result.full is None  # target == rank: nothing to cache
    assert result.seconds > 0


def test_run_job_target_above_rank_truncates_and_caches():
    rng = np.random.default_rng(1)
    w = _spectrum_matrix(rng, 64, 48, 0.8 ** np.arange(48))
    _, _, cand = _single(w)
    config = LowRankConfig(method="svd")
    big = run_job(FactorJob(cand, 8, 20, config))
    assert big.full is not None and big.full.a.shape == (64, 20)
    np.testing.assert_array_equal(big.factors.a, big.full.a[:, :8])
    np.testing.assert_array_equal(big.factors.b, big.full.b[:8])
    assert big.rel_error == pytest.approx(_eckart_young(w, 8), rel=1e-4)
    # A later job with the cached factorization slices it, without factorizing again.
    small = run_job(FactorJob(cand, 5, 5, config, cached=big.full))
    assert small.full is None
    np.testing.assert_array_equal(small.factors.a, big.full.a[:, :5])
    assert small.rel_error == pytest.approx(_eckart_young(w, 5), rel=1e-4)
    # A cache smaller than the rank asked for is not used.
    larger = run_job(FactorJob(cand, 24, 24, config, cached=big.full))
    assert larger.factors.a.shape == (64, 24)
    assert larger.rel_error == pytest.approx(_eckart_young(w, 24), rel=1e-4)


# -- factorize_all ------------------------------------------------------------------------------

def _shared_model(seed=2):
    """mm1 and mm2 share w (64x64); mm3 reads v (64x48)."""
    rng = np.random.default_rng(seed)
    w = _spectrum_matrix(rng, 64, 64, np.arange(1, 65) ** -1.0)
    v = _spectrum_matrix(rng, 64, 48, np.arange(1, 49) ** -1.0)
    return make_model([helper.make_node("MatMul", ["x", "w"], ["h1"], name="mm1"),
                       helper.make_node("Relu", ["h1"], ["r"], name="relu"),
                       helper.make_node("MatMul", ["r", "w"], ["h2"], name="mm2"),
                       helper.make_node("MatMul", ["h2", "v"], ["y"], name="mm3")],
                      [vi("x", ["batch", 64])], [vi("y", ["batch", 48])], [init("w", w), init("v", v)])


def _plan(model, ranks={"mm1": 12, "mm2": 12, "mm3": 10}):
    ctx = GraphContext(model)
    found = find_candidates(model, LowRankConfig(), ctx=ctx)
    selected = [(cand, ranks[row.node], row) for row, cand in found if cand is not None]
    return ctx, selected


def _summary(rewrites):
    return [([n.SerializeToString() for n in rw.nodes], [(name, a.dtype.str, a.shape, a.tobytes())
                                                         for name, a in rw.initializers])
            for _, rw in sorted(rewrites.items(), key=lambda kv: kv[1].nodes[0].name)]


def test_custom_executor_matches_local_and_shared_weight_is_one_job():
    model = _shared_model()
    config = LowRankConfig(jobs=2)

    ctx, selected = _plan(model)
    local = factorize_all(selected, ctx, config, cache={})
    local_rows = [(r.node, r.status, r.rank, r.params_after, r.rel_error) for _, _, r in selected]

    seen: list[list[str]] = []

    def executor(jobs, progress):
        seen.append([job.label for job in jobs])
        done = [run_job(job) for job in jobs]
        progress(len(done))
        return done

    ctx2, selected2 = _plan(model)
    custom = factorize_all(selected2, ctx2, config, cache={}, executor=executor)
    # Two distinct (weight, rank): mm1 and mm2 share w at rank 12. Largest weight first.
    assert seen == [["mm1", "mm3"]]
    assert set(custom) == {id(model.graph.node[0]), id(model.graph.node[2]), id(model.graph.node[3])}
    assert _summary(custom) == _summary(local)
    assert [(r.node, r.status, r.rank, r.params_after, r.rel_error) for _, _, r in selected2] == local_rows

    mm1, mm2 = custom[id(model.graph.node[0])], custom[id(model.graph.node[2])]
    assert [name for name, _ in mm1.initializers] == ["w/lowrank_a", "w/lowrank_b"]
    assert mm2.initializers == []  # reuses mm1's factors
    assert [n.input[1] for n in mm2.nodes] == ["w/lowrank_a", "w/lowrank_b"]
    assert [n.name for n in mm2.nodes] == ["mm2/lowrank_a", "mm2/lowrank_b"]
    rows = {r.node: r for _, _, r in selected2}
    assert rows["mm1"].params_after == rows["mm2"].params_after == 12 * 128
    assert rows["mm1"].rel_error == rows["mm2"].rel_error


def test_run_local_gives_the_same_bytes_for_any_worker_count():
    model = _shared_model(3)
    _, selected = _plan(model)
    jobs = [FactorJob(c, r, r, LowRankConfig(), label=row.node) for c, r, row in selected]
    one = run_local(jobs, lambda k: None, workers=1)
    two = run_local(jobs, lambda k: None, workers=2)
    for x, y in zip(one, two):
        assert x.factors.a.tobytes() == y.factors.a.tobytes() and x.factors.b.tobytes() == y.factors.b.tobytes()


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two cores for a two-thread BLAS")
def test_custom_executor_bytes_do_not_depend_on_its_blas_threads():
    rng = np.random.default_rng(1)
    w = _spectrum_matrix(rng, 1024, 512, np.arange(1, 513) ** -0.5)
    _, _, cand = _single(w)
    job = FactorJob(cand, 128, 128, LowRankConfig(), label="mm")
    local = run_local([job], lambda k: None)[0]
    with threadpool_limits(limits=2):  # a caller's thread on this 2-core machine, as an executor may run it
        custom = run_job(job)
    assert custom.factors.a.tobytes() == local.factors.a.tobytes()
    assert custom.factors.b.tobytes() == local.factors.b.tobytes()


def test_same_weight_at_two_ranks_makes_two_jobs():
    model = _shared_model(4)
    counts = []

    def executor(jobs, progress):
        counts.append(len(jobs))
        return [run_job(j) for j in jobs]

    ctx, selected = _plan(model, {"mm1": 12, "mm2": 6, "mm3": 10})
    rewrites = factorize_all(selected, ctx, LowRankConfig(), cache={}, executor=executor)
    assert counts == [3]
    mm2 = rewrites[id(model.graph.node[2])]
    assert [name for name, _ in mm2.initializers] == ["w/lowrank_a_1", "w/lowrank_b_1"]
    assert mm2.initializers[0][1].shape == (64, 6)


def test_prefactorize_caches_below_break_even_and_truncates_later():
    model = _shared_model(5)
    config = LowRankConfig(method="svd")
    cache: dict = {}
    ctx, selected = _plan(model)
    first = factorize_all(selected, ctx, config, cache=cache, prefactorize=True)
    # Break-even of 64x64 is 32, of 64x48 is ceil(3072 / 112) = 28: cached at 31 and 27.
    assert sorted(f.a.shape[1] for f in cache.values()) == [27, 31]
    counts = []

    def executor(jobs, progress):
        counts.append([j.cached is not None for j in jobs])
        return [run_job(j) for j in jobs]

    ctx2, selected2 = _plan(model, {"mm1": 7, "mm2": 7, "mm3": 9})
    second = factorize_all(selected2, ctx2, config, cache=cache, executor=executor)
    assert counts == [[True, True]]
    w_full = next(f for f in cache.values() if f.a.shape[1] == 31)
    a7 = second[id(model.graph.node[0])].initializers[0][1]
    np.testing.assert_array_equal(a7, w_full.a[:, :7])
    assert len(first) == len(second) == 3


# -- NaN on disk --------------------------------------------------------------------------------

def test_nan_weight_loaded_lazily_gives_a_reason(tmp_path):
    rng = np.random.default_rng(6)
    w = rng.standard_normal((32, 24)).astype(np.float32)
    w[3, 5] = np.nan
    good = rng.standard_normal((24, 16)).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["h"], name="bad_mm"),
                        helper.make_node("MatMul", ["h", "good"], ["y"], name="good_mm")],
                       [vi("x", ["batch", 32])], [vi("y", ["batch", 16])], [init("w", w), init("good", good)])
    path = tmp_path / "nan.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="nan.onnx.data", size_threshold=0)
    lazy = onnx.load_model(str(path), load_external_data=False)
    ctx = GraphContext(lazy, base_dir=str(tmp_path))
    found = find_candidates(lazy, LowRankConfig(), ctx=ctx)
    assert all(cand is not None for _, cand in found)  # not read at match time
    selected = [(cand, 4, row) for row, cand in found]

    direct = run_job(FactorJob(selected[0][0], 4, 4, LowRankConfig()))
    assert direct.factors is None and "NaN or Inf" in direct.skipped

    rewrites = factorize_all(selected, ctx, LowRankConfig(), cache={})
    bad, fine = (row for _, _, row in selected)
    assert "NaN or Inf" in bad.reason and "'w'" in bad.reason
    assert bad.status == "skipped" and bad.rank is None
    assert fine.status == "factorized" and fine.rank == 4 and fine.reason is None
    assert list(rewrites) == [id(lazy.graph.node[1])]
    a, b = (arr for _, arr in rewrites[id(lazy.graph.node[1])].initializers)
    assert np.linalg.norm(good - a @ b) / np.linalg.norm(good) == pytest.approx(fine.rel_error, rel=1e-4)
