"""--jobs: parallel factorization gives byte-identical models for every number of jobs."""

from __future__ import annotations

import numpy as np
from onnx import helper

from builders import DATA, init, make_model, vi
from onnx_lowrank import LowRankConfig, optimize


def _model():
    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i in range(6):  # 768x768 is where OpenBLAS results differed between 1 and 2 threads
        inits.append(init(f"w{i}", rng.standard_normal((768, 768)).astype(np.float32)))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"], name=f"mm{i}"))
        prev = f"h{i}"
    inits.append(init("k", rng.standard_normal((32, 6, 3, 3)).astype(np.float32)))
    nodes.append(helper.make_node("Conv", ["img", "k"], ["c"], name="conv", kernel_shape=[3, 3]))
    return make_model(nodes, [vi("x", [1, 768]), vi("img", [1, 6, 8, 8])], [vi(prev, [1, 768]), vi("c", [1, 32, 6, 6])],
                      inits)


def test_jobs_do_not_change_bytes():
    model = _model()
    outputs = {jobs: optimize(model, LowRankConfig(rank=96, jobs=jobs))[0].SerializeToString() for jobs in (1, 2, 3, 0)}
    assert len(set(outputs.values())) == 1


def test_jobs_with_calibration_and_shared_weights():
    config = dict(target_params=0.3)
    calib = DATA / "digits_calibration.npz"
    a = optimize(DATA / "digits_mlp.onnx", LowRankConfig(jobs=1, **config), calibration=calib)[0]
    b = optimize(DATA / "digits_mlp.onnx", LowRankConfig(jobs=2, **config), calibration=calib)[0]
    assert a.SerializeToString() == b.SerializeToString()
