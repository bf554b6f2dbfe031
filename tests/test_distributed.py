"""--dask: factorizations as dask.distributed tasks give the same bytes as the local run.

A LocalCluster takes a few seconds to start, so the cluster tests share one module-scoped
cluster (reached by its address, as a real cluster would be) and ``local:2`` is started once per
model by ``optimize`` itself.
"""

from __future__ import annotations

import socket
import sys

import numpy as np
import pytest
from onnx import helper
from threadpoolctl import threadpool_limits

from builders import DATA, init, make_model, vi
from onnx_lowrank import LowRankConfig, optimize
from onnx_lowrank.model_io import ModelError

distributed = pytest.importorskip("distributed")
import dask  # noqa: E402  (installed with distributed)

from onnx_lowrank import distributed as dist  # noqa: E402
from onnx_lowrank.passes import FactorJob, find_candidates, run_job  # noqa: E402


def _model():
    """MatMuls (one weight shared by two nodes), a Gemm with transB and a Conv."""
    rng = np.random.default_rng(0)  # w0 from seed 0: its SVD differs between 1 and 2 BLAS threads
    nodes, inits = [], []
    inits.append(init("w0", rng.standard_normal((768, 768)).astype(np.float32)))  # 768: BLAS-thread sensitive
    inits.append(init("shared", rng.standard_normal((768, 512)).astype(np.float32)))
    inits.append(init("w2", rng.standard_normal((512, 768)).astype(np.float32)))
    inits.append(init("g", rng.standard_normal((256, 512)).astype(np.float32)))
    inits.append(init("gb", rng.standard_normal((256,)).astype(np.float32)))
    inits.append(init("k", rng.standard_normal((128, 64, 3, 3)).astype(np.float32)))
    nodes += [
        helper.make_node("MatMul", ["x", "w0"], ["h0"], name="mm0"),
        helper.make_node("MatMul", ["h0", "shared"], ["h1"], name="mm1"),
        helper.make_node("MatMul", ["h1", "w2"], ["h2"], name="mm2"),
        helper.make_node("MatMul", ["h2", "shared"], ["h3"], name="mm3"),  # the same weight again
        helper.make_node("Gemm", ["h3", "g", "gb"], ["y"], name="gemm", transB=1),
        helper.make_node("Conv", ["img", "k"], ["c"], name="conv", kernel_shape=[3, 3]),
    ]
    return make_model(nodes, [vi("x", [1, 768]), vi("img", [1, 64, 10, 10])],
                      [vi("y", [1, 256]), vi("c", [1, 128, 8, 8])], inits)


def test_local_cluster_matches_local_run_bytes():
    # Exact SVD: LAPACK's results change in their last bits with the BLAS thread count (RSI's
    # here do not), so this fails if a worker's BLAS runs with more than one thread.
    model = _model()
    local = optimize(model, LowRankConfig(rank=64, method="svd", jobs=1))[0].SerializeToString()
    remote, report = optimize(model, LowRankConfig(rank=64, method="svd", dask="local:2"))
    assert remote.SerializeToString() == local
    assert sum(layer.status == "factorized" for layer in report.layers) == 6


def test_local_cluster_with_calibration_matches_local_run_bytes():
    calib, config = DATA / "digits_calibration.npz", dict(target_params=0.3)
    local = optimize(DATA / "digits_mlp.onnx", LowRankConfig(jobs=1, **config), calibration=calib)[0]
    remote = optimize(DATA / "digits_mlp.onnx", LowRankConfig(dask="local:2", **config), calibration=calib)[0]
    assert remote.SerializeToString() == local.SerializeToString()


@pytest.fixture(scope="module")
def scheduler():
    """One cluster for the tests that reach a running scheduler by its address. Its worker has
    two threads, as a real worker usually has, and starts without the OPENBLAS_NUM_THREADS=1 etc.
    that dask's nanny normally sets: the one-BLAS-thread limit must come from the task itself."""
    with dask.config.set({"distributed.nanny.pre-spawn-environ": {}}), \
            distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address=None,
                                     silence_logs=40) as cluster:
        yield cluster.scheduler_address


def _jobs(model, rank=64):
    config = LowRankConfig(rank=rank, method="svd")
    cands = [cand for _, cand in find_candidates(model, config) if cand is not None]
    return [FactorJob(cand, rank, rank, config, None, cand.label) for cand in cands]


def test_scheduler_address_results_in_order_with_progress(scheduler):
    jobs = _jobs(_model())
    ticks = []
    results = dist.run_jobs(scheduler, jobs, progress=ticks.append)
    assert ticks == [1] * len(jobs)
    for job, result in zip(jobs, results):
        with threadpool_limits(limits=1):
            expected = run_job(job)
        assert result.rel_error == expected.rel_error
        assert np.array_equal(result.factors.a, expected.factors.a)


def test_worker_exception_carries_the_job_label(scheduler):
    bad = FactorJob(None, 4, 4, LowRankConfig(rank=4), None, "the_bad_layer")  # type: ignore[arg-type]
    with pytest.raises(AttributeError, match="the_bad_layer"):
        dist.run_jobs(scheduler, _jobs(_model())[:2] + [bad])


def test_unreachable_scheduler_is_one_line(monkeypatch):
    monkeypatch.setattr(dist, "CONNECT_TIMEOUT", 1.0)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ModelError) as info:
        optimize(_model(), LowRankConfig(rank=64, dask=f"tcp://127.0.0.1:{port}"))
    message = str(info.value)
    assert "\n" not in message and "cannot connect" in message and f"127.0.0.1:{port}" in message


@pytest.mark.parametrize("address, words", [("foo://bar", "not a scheduler address"),
                                            ("/nonexistent/scheduler.json", "no such scheduler file")])
def test_bad_addresses_are_one_line(address, words):
    with pytest.raises(ModelError, match=words) as info:
        dist.run_jobs(address, _jobs(_model())[:1])
    assert "\n" not in str(info.value)


def test_without_distributed_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)
    with pytest.raises(ModelError, match=r"onnx-lowrank\[distributed\]"):
        dist.run_jobs("local:1", _jobs(_model())[:1])


def test_no_jobs_starts_nothing():
    assert dist.run_jobs("tcp://127.0.0.1:1", []) == []
