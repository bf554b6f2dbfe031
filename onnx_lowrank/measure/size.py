"""Size of a model: bytes on disk (with external data), parameters and FLOPs."""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

from onnx_lowrank import flops as _flops
from onnx_lowrank.measure.errors import HarnessError, MissingFileError
from onnx_lowrank.model_io import ModelError, model_file_size

__all__ = ["model_size_bytes", "model_stats"]


def model_size_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes on disk of a model: the ``.onnx`` file plus every external data file it references.

    :func:`onnx_lowrank.model_io.model_file_size` with the measurement errors of
    :mod:`onnx_lowrank.measure.errors`: ``MissingFileError`` for a missing model file, ``HarnessError`` for
    a missing external data file.
    """
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise MissingFileError(f"model file not found: {p}")
    try:
        return model_file_size(p)
    except ModelError as exc:
        raise HarnessError(str(exc)) from None


def model_stats(
    path: str | os.PathLike[str], input_shapes: Mapping[str, Sequence[int]] | None = None
) -> dict[str, Any]:
    """Size, parameter count and FLOPs of a model file.

    Parameters
    ----------
    path : path-like
    input_shapes : mapping, optional
        Concrete input shapes for the FLOP count (see :func:`onnx_lowrank.flops.count_flops`).

    Returns
    -------
    dict
        ``path``, ``params``, ``size_bytes``, ``flops``, ``macs``, ``flops_complete`` (False when
        some MatMul/Gemm/Conv shapes were unknown and left out), ``counted_nodes``.
    """
    report = _flops.count_flops(path, input_shapes)
    return {
        "path": os.fspath(path),
        "params": report.params,
        "size_bytes": model_size_bytes(path),
        "flops": report.flops,
        "macs": report.macs,
        "flops_complete": report.complete,
        "counted_nodes": len(report.nodes),
    }
