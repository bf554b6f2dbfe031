"""Trial models: the model with some layers factorized, run in onnxruntime, one after another.

The weighted and measured allocations probe each layer alone at a few ranks, and the
``max_error`` search tries one global budget after another: each trial is the whole model
rewritten by the pass, run on held-out samples. Copying, serializing and parsing the whole
model for every trial took 0.33 s of MiniLM's (86 MiB); here its weights are spilled once to a
temporary file (:class:`~onnx_lowrank.model_io.SpilledWeights`), each trial copies the
weightless skeleton, reads only the weights it factorizes, and onnxruntime loads it from a path
next to the weights file: 0.03 s.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from onnx_lowrank.measure import sessions
from onnx_lowrank.config import LowRankConfig
from onnx_lowrank.model_io import SpilledWeights
from onnx_lowrank.passes import PassState, apply_lowrank
from onnx_lowrank.report import LayerResult

__all__ = ["TrialModels"]

logger = logging.getLogger(__name__)


class TrialModels:
    """Builds and runs trial rewrites of one in-memory model; a context manager.

    Parameters
    ----------
    model : onnx.ModelProto
        The model, weights in memory (not modified).
    state : PassState
        Shared by the trials (Gram matrices, whiteners, factorizations).

    Notes
    -----
    Models the spill cannot take (fields this onnx does not know, tensors already external) and
    a failed spill (a full temporary directory) fall back to trials that copy the whole model.
    """

    def __init__(self, model: onnx.ModelProto, state: PassState) -> None:
        self.state = state
        self._spilled: SpilledWeights | None = None
        self._model = model
        try:
            self._spilled = SpilledWeights(model)
        except OSError as exc:
            logger.warning("cannot spill the weights to a temporary file (%s): each trial copies the model", exc)

    @property
    def _directory(self) -> str | None:
        return self._spilled.directory if self._spilled is not None else None

    def __enter__(self) -> TrialModels:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._spilled is not None:
            self._spilled.close()

    def build(self, config: LowRankConfig, calibration: Mapping[str, np.ndarray] | None,
              input_shapes: Mapping[str, Any] | None, fixed_ranks: Mapping[str, int | None] | None = None,
              progress: bool = False) -> tuple[onnx.ModelProto, list[LayerResult]]:
        """The model rewritten by the pass under ``config`` (or ``fixed_ranks``), and its rows.

        Its unchanged weights still refer to the spilled file: run it with :meth:`session`, and
        :meth:`materialize` the one to keep.
        """
        trial = onnx.ModelProto()
        # Without a spill directory SpilledWeights holds a whole copy: trials copy that one.
        trial.CopyFrom(self._spilled.model if self._spilled is not None else self._model)
        base_dir = self.state.base_dir
        if self._directory is not None:
            self.state.base_dir = self._directory  # where this trial's weights are read from
        try:
            rows = apply_lowrank(trial, config, calibration=calibration, input_shapes=input_shapes,
                                 state=self.state, fixed_ranks=fixed_ranks, progress=progress)
        finally:
            self.state.base_dir = base_dir
        return trial, rows

    def session(self, trial: onnx.ModelProto) -> ort.InferenceSession:
        """An onnxruntime session of a trial (loaded next to the spilled weights)."""
        if self._directory is None:
            return sessions.create_session(trial, threads=sessions.accuracy_threads())
        path = os.path.join(self._directory, "trial.onnx")
        with open(path, "wb") as f:
            f.write(trial.SerializeToString())
        return sessions.create_session(path, threads=sessions.accuracy_threads())

    def materialize(self, trial: onnx.ModelProto) -> None:
        """Read the weights a trial still refers to back into it (before the spill is removed)."""
        if self._spilled is not None:
            self._spilled.restore(trial)
