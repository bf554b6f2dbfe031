"""Low-rank factorization of an onnx-graphsurgeon graph, for TensorRT / Polygraphy pipelines.

Users of TensorRT and Polygraphy hold a ``gs.Graph`` between their own edits (folding constants,
fusing plugins, cleaning up). :func:`optimize_graph` factorizes it like
:func:`onnx_lowrank.optimize` factorizes a ``ModelProto`` and hands a ``gs.Graph`` back::

    import onnx
    import onnx_graphsurgeon as gs
    from onnx_lowrank import LowRankConfig, optimize_graph

    graph = gs.import_onnx(onnx.load("model.onnx"))
    graph.fold_constants().cleanup()                 # the usual Polygraphy/TensorRT preparation
    graph, report = optimize_graph(graph, LowRankConfig(target_params=0.5), calibration="calib.npz")
    print(report.format_table())
    onnx.save(gs.export_onnx(graph), "model.lowrank.onnx")
    # polygraphy run model.lowrank.onnx --onnxrt --trt ; trtexec --onnx=model.lowrank.onnx

Cases handled
-------------
* Everything :func:`onnx_lowrank.optimize` handles, with the same report.
* The input graph is never modified: a new ``gs.Graph`` is returned. Weights that the input
  graph holds as ``LazyValues`` are exported as their original TensorProto, so they are not
  read into numpy arrays on the way through.

It goes ``gs.export_onnx`` -> ``optimize`` -> ``gs.import_onnx``; what a ``gs.Graph`` does not
carry (model-level ``metadata_props``, ``doc_string``) is not carried here either.
"""

from __future__ import annotations

import logging
import onnx_graphsurgeon as gs

from onnx_lowrank.api import Inputs, optimize
from onnx_lowrank.config import LowRankConfig
from onnx_lowrank.report import Report

__all__ = ["optimize_graph"]

logger = logging.getLogger(__name__)


def optimize_graph(
    graph: gs.Graph,
    config: LowRankConfig | None = None,
    *,
    calibration: Inputs | None = None,
    validation: Inputs | None = None,
    progress: bool = False,
) -> tuple[gs.Graph, Report]:
    """Factorize the constant weights of a ``gs.Graph``'s MatMul, Gemm and Conv nodes.

    Parameters
    ----------
    graph : onnx_graphsurgeon.Graph
        Not modified.
    config : LowRankConfig, optional
        ``LowRankConfig()`` when omitted (the same defaults as the CLI).
    calibration, validation : path-like or mapping of str to ndarray, optional
        As in :func:`onnx_lowrank.optimize`.
    progress : bool
        Progress bars on stderr.

    Returns
    -------
    (onnx_graphsurgeon.Graph, Report)
        The factorized graph and the per-layer report.

    Notes
    -----
    The graph is exported with ``do_type_check=False``: graphs in the middle of a Polygraphy
    edit often have outputs without a dtype yet, which ``optimize`` does not need.
    """
    model = gs.export_onnx(graph, do_type_check=False)
    out, report = optimize(model, config, calibration=calibration, validation=validation, progress=progress)
    return gs.import_onnx(out), report
