"""The latency cost model of a factorized layer: will it run faster in onnxruntime?

FLOPs drop from ``m n`` to ``r (m + n)`` per row, but the chain is two kernel calls instead of
one: at a few rows, small layers are bound by call overhead and the second call can cost more
than the FLOPs saved (measured here on onnxruntime 1.32, one thread: a 384x384 layer at one row
never drops below about 0.47 of its time, whatever the rank). At 128 rows and 768x768 or larger,
time follows the FLOP ratio within +-0.03.

``predicted_ratio`` models a MatMul/Gemm call as ``overhead + macs / throughput``; the constants
below were measured on this project's 2-core machines (see docs/performance.md). It is pure
arithmetic, so the pass can use it without a runtime; the measured counterpart,
:func:`onnx_lowrank.measure.latency.measured_ratio`, times both forms in onnxruntime.
"""

from __future__ import annotations

__all__ = ["predicted_ratio", "CALL_OVERHEAD_S", "MACS_PER_S", "CONV_EXTRA"]

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
