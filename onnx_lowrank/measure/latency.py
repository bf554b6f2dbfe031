"""Will the factorized layer run faster in onnxruntime? A cost model, and a measurement.

FLOPs drop from ``m n`` to ``r (m + n)`` per row, but the chain is two kernel calls instead of
one: at a few rows, small layers are bound by call overhead and the second call can cost more
than the FLOPs saved (measured here on onnxruntime 1.32, one thread: a 384x384 layer at one row
never drops below about 0.47 of its time, whatever the rank). At 128 rows and 768x768 or larger,
time follows the FLOP ratio within +-0.03.

``predicted_ratio`` models a MatMul/Gemm call as ``overhead + macs / throughput``; the constants
below were measured on this project's 2-core machines (see docs/performance.md).
``measured_ratio`` times the two forms of a layer with onnxruntime itself: one thread,
interleaved runs, median ratio.
"""

from __future__ import annotations

import logging
import statistics
import time
from functools import lru_cache

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnx_lowrank.measure.harness import create_session

__all__ = ["predicted_ratio", "measured_ratio", "CALL_OVERHEAD_S", "MACS_PER_S", "CONV_EXTRA"]

logger = logging.getLogger(__name__)

#: Fixed cost of one MatMul/Gemm kernel call in an onnxruntime session (seconds), one thread.
#: Fitted to measured_ratio on 64x256 .. 1024x1024 layers at 1..128 rows (onnxruntime 1.32):
#: e.g. 384x384 rank 96 at 1 row measured 0.90 (model 0.75), 256x256 rank 64 measured 0.93
#: (0.97), 64x256 rank 25 measured 1.04 (1.47); at 128 rows both agree with the FLOP ratio
#: within 0.03. Small GEMMs also run below peak throughput, which a constant cannot capture:
#: use ``measure`` when the decision is close.
CALL_OVERHEAD_S = 1.5e-6
#: Sustained float32 multiply-accumulates per second of one core in onnxruntime's MLAS GEMM.
MACS_PER_S = 2.0e10
#: Weight-SVD convs pay an extra activation pass and channel reorders: +0.01..+0.09 over the
#: FLOP ratio measured here; the upper end is used so the guard errs towards keeping layers dense.
CONV_EXTRA = 0.09


def predicted_ratio(m: int, n: int, rank: int, rows: int, *, op: str = "MatMul") -> float:
    """Predicted time of the factorized layer over the original.

    Parameters
    ----------
    m, n : int
        Matrix view of the weight (inputs x outputs).
    rank : int
    rows : int
        Rows multiplied per inference (batch x sequence for a transformer; output pixels for a
        Conv); 1 when unknown.
    op : str
        ``Conv`` adds the measured conv overhead :data:`CONV_EXTRA`.

    Returns
    -------
    float
        ``< 1`` means faster.
    """
    rows = max(1, int(rows))
    dense = CALL_OVERHEAD_S + rows * m * n / MACS_PER_S
    factored = 2 * CALL_OVERHEAD_S + rows * rank * (m + n) / MACS_PER_S
    ratio = factored / dense
    if op == "Conv":
        ratio += CONV_EXTRA
    return ratio


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

