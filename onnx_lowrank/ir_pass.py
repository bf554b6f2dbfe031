"""Low-rank factorization as an onnx-ir pass, for export pipelines built on ``onnx_ir``.

``torch.onnx.export(..., dynamo=True)`` returns an ``ONNXProgram`` whose ``.model`` is an
``onnx_ir.Model``, and onnx-ir / onnxscript optimizations are ``onnx_ir.passes`` run by a
``PassManager``. :class:`LowRankPass` lets onnx-lowrank sit in such a pipeline::

    import onnx_ir as ir
    from onnx_lowrank import LowRankConfig
    from onnx_lowrank.ir_pass import LowRankPass

    model = ir.load("model.onnx")
    lowrank = LowRankPass(LowRankConfig(ratio=0.5))
    result = ir.passes.PassManager([lowrank])(model)
    ir.save(result.model, "model.lowrank.onnx")
    print(lowrank.last_report.format_table())

Cases handled
-------------
* Everything :func:`onnx_lowrank.optimize` handles (MatMul, Gemm and Conv with a constant
  weight; every rank policy, calibration whitening, global budgets, ``max_error`` search), with
  the same per-layer report, kept as :attr:`LowRankPass.last_report`.
* Weights stored in external data (``ir.load`` of a model with ``.data`` files): they are read
  into memory for the factorization; the result holds every tensor in memory (save it with
  ``ir.save(..., external_data=...)`` when it exceeds 2 GiB).
* Running the pass again is a no-op: nodes made by onnx-lowrank are never factorized again,
  and a model the pass already rewrote with the same configuration is returned unchanged with
  ``modified=False`` (the configuration is recorded in the model's ``metadata_props`` under
  :data:`METADATA_KEY`), so ``PassManager(..., steps=2)`` does not compress twice even with a
  global budget.

The pass is **functional** (``in_place=False``, ``changes_input=False``): the input
``ir.Model`` is never modified; a new model is returned whether or not anything changed.
It works on a serialized copy: ``ir.to_proto`` -> ``optimize`` -> ``ir.from_proto``, so
IR-only annotations (``Value.meta``, ``Node.meta``) do not survive; names, metadata_props,
doc strings, opsets, functions and value_info do.

onnx-ir is an optional dependency: ``pip install 'onnx-lowrank[ir]'``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal, Union

import numpy as np

try:
    import onnx_ir as ir
    from onnx_ir.passes import PassBase, PassResult
except ImportError:  # pragma: no cover - exercised by a subprocess test
    raise ImportError("LowRankPass needs onnx-ir: pip install 'onnx-lowrank[ir]'") from None

import onnx

from onnx_lowrank.api import optimize
from onnx_lowrank.config import LowRankConfig

if TYPE_CHECKING:
    from onnx_lowrank.report import Report

__all__ = ["LowRankPass", "METADATA_KEY"]

logger = logging.getLogger(__name__)

#: ``metadata_props`` key holding the JSON configuration the pass applied to a model.
METADATA_KEY = "onnx_lowrank.config"

Inputs = Union[str, "os.PathLike[str]", Mapping[str, np.ndarray]]


class LowRankPass(PassBase):
    """Factorize the constant weights of MatMul/Gemm/Conv nodes into low-rank pairs.

    A functional ``onnx_ir.passes`` pass: ``pass_(model)`` returns
    ``PassResult(new_model, modified)`` and leaves ``model`` untouched. ``modified`` is True
    when at least one layer was factorized.

    Parameters
    ----------
    config : LowRankConfig, optional
        Method, rank policy and targets, as for :func:`onnx_lowrank.optimize`;
        ``LowRankConfig()`` (keep 50% of each layer's parameters) when omitted.
    calibration : path-like or mapping of str to ndarray, optional
        Calibration inputs (``.npz`` path or ``{input name: (samples, ...)}``): layers are
        factorized for their output error on them (see :func:`onnx_lowrank.optimize`).
    validation : path-like or mapping of str to ndarray, optional
        Held-out inputs for ``config.max_error``.

    Attributes
    ----------
    last_report : Report or None
        The per-layer report of the last run that reached :func:`onnx_lowrank.optimize`
        (``None`` before the first run, and left as it was when a run is skipped because the
        model already carries this configuration).
    """

    def __init__(
        self,
        config: LowRankConfig | None = None,
        *,
        calibration: Inputs | None = None,
        validation: Inputs | None = None,
    ) -> None:
        super().__init__()
        self.config = config if config is not None else LowRankConfig()
        self.calibration = calibration
        self.validation = validation
        self.last_report: Report | None = None

    @property
    def in_place(self) -> Literal[False]:
        """Functional: a new model is returned."""
        return False

    @property
    def changes_input(self) -> Literal[False]:
        """The input model is never modified."""
        return False

    def __repr__(self) -> str:
        policy, value = self.config.policy
        calibrated = ", calibrated" if self.calibration is not None else ""
        return f"LowRankPass({policy}={value}{calibrated})"

    def _signature(self) -> str:
        return json.dumps(self.config.to_dict(), sort_keys=True)

    def call(self, model: ir.Model) -> PassResult:
        """Factorize ``model``'s weights; return a new model and whether anything changed."""
        signature = self._signature()
        if model.metadata_props.get(METADATA_KEY) == signature:
            logger.info("model already rewritten by onnx-lowrank with this configuration: unchanged")
            return PassResult(model.clone(), False)

        proto = _to_proto_in_memory(model)
        optimized, report = optimize(proto, self.config, calibration=self.calibration,
                                     validation=self.validation)
        self.last_report = report
        done = report.factorized
        logger.info("LowRankPass: factorized %d of %d candidate layers", len(done), len(report.layers))
        if not done:
            return PassResult(model.clone(), False)
        result = ir.from_proto(optimized)
        result.metadata_props[METADATA_KEY] = signature
        return PassResult(result, True)


def _to_proto_in_memory(model: ir.Model) -> onnx.ModelProto:
    """``ir.to_proto(model)`` with externally stored initializers read into ``raw_data``.

    ``ir.to_proto`` keeps external tensors as references relative to a base directory the
    ModelProto does not know; the factorization needs their values. ``model`` is not modified.
    """
    proto = ir.to_proto(model)
    external = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        values = model.graph.initializers
        for tensor in external:
            value = values.get(tensor.name)
            if value is None or value.const_value is None:
                continue
            data = value.const_value.tobytes()
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT
            tensor.raw_data = data
        logger.info("read %d externally stored initializers into memory", len(external))
    return proto
