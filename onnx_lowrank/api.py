"""The library entry point: ``optimize(model_or_path, config) -> (model, report)``."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import onnx

from onnx_lowrank.passes import apply_lowrank

from .config import LowRankConfig
from .flops import count_params
from .model_io import EXTERNAL_DATA_THRESHOLD, ModelError, load_model, model_file_size
from .report import Report

__all__ = ["optimize"]

logger = logging.getLogger(__name__)


def optimize(
    model_or_path: onnx.ModelProto | str | os.PathLike[str],
    config: LowRankConfig | None = None,
    *,
    progress: bool = False,
    check: bool = True,
) -> tuple[onnx.ModelProto, Report]:
    """Factorize the constant weights of MatMul, Gemm and Conv nodes into low-rank pairs.

    Parameters
    ----------
    model_or_path : onnx.ModelProto or path-like
        The model, or the path of an ``.onnx`` file (its external data is loaded too). A
        ``ModelProto`` passed in is never modified: the result is a new message.
    config : LowRankConfig, optional
        Method, rank policy and targets; ``LowRankConfig()`` (RSI, keep 50% of each layer's
        parameters) when omitted.
    progress : bool
        Progress bar on stderr while factorizing.
    check : bool
        Run ``onnx.checker`` on the result (skipped above the 2 GiB protobuf limit).

    Returns
    -------
    model : onnx.ModelProto
        The rewritten model: each factorized node replaced by two chained nodes
        ``(X @ A) @ B`` with ``A (m x r)`` and ``B (r x n)``; opset, metadata, graph inputs,
        outputs and value_info preserved.
    report : Report
        One row per candidate node (rank, parameters, relative and optimal error, or the reason
        it was skipped) and totals; ``report.to_json()`` is the ``--report`` file.

    Notes
    -----
    A weight ``W (m x n)`` costs ``m n`` parameters dense and ``r (m + n)`` factorized, so a
    layer is only factorized below its break-even rank ``m n / (m + n)`` unless
    ``config.force`` is set.

    References
    ----------
    N. Halko, P. G. Martinsson, J. A. Tropp, "Finding structure with randomness: probabilistic
    algorithms for constructing approximate matrix decompositions", SIAM Review 53(2), 2011.
    """
    config = config if config is not None else LowRankConfig()
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    input_path: str | None = None
    size_before: int | None = None
    if isinstance(model_or_path, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(model_or_path)
    elif isinstance(model_or_path, (str, os.PathLike)):
        input_path = str(model_or_path)
        model = load_model(model_or_path)
        size_before = model_file_size(model_or_path)
    else:
        raise TypeError(f"optimize() takes an onnx.ModelProto or a path, not {type(model_or_path).__name__}")
    seconds["load"] = time.perf_counter() - start

    params_before = count_params(model)
    start = time.perf_counter()
    rows = apply_lowrank(model, config, progress=progress)
    seconds["factorize"] = time.perf_counter() - start

    if check and _payload_bytes(model) < EXTERNAL_DATA_THRESHOLD:
        start = time.perf_counter()
        try:
            onnx.checker.check_model(model)
        except onnx.checker.ValidationError as exc:  # a bug of ours, never the user's input
            raise ModelError(f"internal error: the rewritten model fails onnx.checker: {exc}") from exc
        seconds["check"] = time.perf_counter() - start

    report = Report(
        layers=rows,
        config=config.to_dict(),
        model_params_before=params_before,
        model_params_after=count_params(model),
        input_path=input_path,
        size_before=size_before,
        seconds=seconds,
    )
    done = report.factorized
    logger.info("factorized %d of %d candidate layers", len(done), len(rows))
    return model, report


def _payload_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer)


def default_model_path() -> Path:
    """The small real model shipped with the package (an MLP trained on scikit-learn's digits)."""
    return Path(__file__).resolve().parent / "data" / "digits_mlp.onnx"
