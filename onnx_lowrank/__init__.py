"""onnx-lowrank: low-rank factorization of ONNX models, and an onnxruntime harness that says what it cost.

>>> import onnx_lowrank
>>> model, report = onnx_lowrank.optimize("model.onnx", onnx_lowrank.LowRankConfig(ratio=0.5))  # doctest: +SKIP
>>> print(report.format_table())  # doctest: +SKIP
"""

from .api import optimize
from .config import LowRankConfig
from .model_io import ModelError, load_model, save_model
from .report import LayerResult, Report

__version__ = "0.1.0"

__all__ = [
    "LayerResult",
    "LowRankConfig",
    "ModelError",
    "Report",
    "__version__",
    "load_model",
    "optimize",
    "save_model",
]
