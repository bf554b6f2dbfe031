"""Activation statistics: what calibration measures and the pass consumes, as plain data.

The measurement layer (:func:`onnx_lowrank.measure.calibration.collect_grams`, which runs
onnxruntime) fills a :class:`CalibrationStats`; the pass reads its Gram matrices to whiten each
layer. Neither imports the other: this module is the contract between them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["CalibrationStats"]


@dataclass
class CalibrationStats:
    """Gram matrices keyed by ``(activation, feature_key)`` and what it took to get them.

    ``grams[key]`` is ``X^T X`` (float64) of the layer inputs ``X`` seen on the calibration
    samples (for lookups, whose inputs are one-hot rows, its diagonal: a 1-D array of counts), ``rows[key]`` the number of rows of ``X``; ``samples`` the calibration samples run,
    ``seconds`` the time the runtime took.
    """

    grams: dict[Any, np.ndarray] = field(default_factory=dict)
    rows: dict[Any, int] = field(default_factory=dict)
    samples: int = 0
    seconds: float = 0.0
