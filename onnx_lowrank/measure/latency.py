"""Will the factorized layer run faster in onnxruntime? Measured on this machine.

``measured_ratio`` times the two forms of a layer with onnxruntime itself: one thread,
interleaved runs, median ratio. The cost model that predicts the same ratio without a runtime
is :func:`onnx_lowrank.core.latency_model.predicted_ratio`.
"""

from __future__ import annotations

import logging
import statistics
import time
from functools import lru_cache

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnx_lowrank.measure.sessions import create_session

__all__ = ["measured_ratio"]

logger = logging.getLogger(__name__)


def measured_ratio(m: int, n: int, rank: int, rows: int, *, runs: int = 200, seed: int = 0) -> float:
    """Median time ratio of ``(X @ A) @ B`` over ``X @ W`` in onnxruntime on this machine.

    One thread, graph optimizations on, warm-up, then the two sessions interleaved
    (A B A B ...) so that machine noise hits both alike. Results are cached per shape.
    """
    return _measured(int(m), int(n), int(rank), max(1, int(rows)), int(runs), int(seed))


@lru_cache(maxsize=None)
def _measured(m: int, n: int, rank: int, rows: int, runs: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, m)).astype(np.float32)
    dense = _session({"w": rng.standard_normal((m, n)).astype(np.float32)}, [("x", "w", "y")], m, n)
    chain = _session(
        {"a": rng.standard_normal((m, rank)).astype(np.float32), "b": rng.standard_normal((rank, n)).astype(np.float32)},
        [("x", "a", "h"), ("h", "b", "y")], m, n,
    )
    feed = {"x": x}
    for _ in range(10):
        dense.run(None, feed)
        chain.run(None, feed)
    ratios = []
    for _ in range(runs):
        t0 = time.perf_counter()
        dense.run(None, feed)
        t1 = time.perf_counter()
        chain.run(None, feed)
        t2 = time.perf_counter()
        ratios.append((t2 - t1) / max(t1 - t0, 1e-9))
    ratio = statistics.median(ratios)
    logger.info("measured %dx%d rank %d at %d rows: time ratio %.3f", m, n, rank, rows, ratio)
    return float(ratio)


def _session(weights: dict[str, np.ndarray], matmuls: list[tuple[str, str, str]], m: int, n: int) -> ort.InferenceSession:
    nodes = [helper.make_node("MatMul", [a, b], [c]) for a, b, c in matmuls]
    graph = helper.make_graph(
        nodes, "latency_probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", m])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", n])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return create_session(model, threads=1, record_assignment=False)

