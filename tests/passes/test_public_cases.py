"""Public test cases shipped with onnx (PyTorch-exported Conv/Linear, IR 3) at forced full rank.

Each model is factorized under every Conv scheme with ``rank=100000, force=True`` and must
reproduce the reference output stored next to it. These are old exports (IR 3, opset 6) whose
initializers are also listed as graph inputs, as IR < 4 required.
"""

from __future__ import annotations

import glob
import os

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from builders import run
from onnx_lowrank import LowRankConfig, optimize

BASE = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "pytorch-converted")
CASES = sorted(os.path.basename(d) for d in glob.glob(os.path.join(BASE, "test_Conv[123]d*")))


def _load(case):
    d = os.path.join(BASE, case)
    model = onnx.load(os.path.join(d, "model.onnx"))
    data = os.path.join(d, "test_data_set_0")
    inputs = [numpy_helper.to_array(onnx.load_tensor(p)) for p in sorted(glob.glob(os.path.join(data, "input_*.pb")))]
    expected = numpy_helper.to_array(onnx.load_tensor(os.path.join(data, "output_0.pb")))
    return model, inputs, expected


@pytest.mark.skipif(not CASES, reason="this onnx wheel ships no pytorch-converted test data")
@pytest.mark.parametrize("scheme", ["weight-svd", "spatial-svd", "tucker2"])
@pytest.mark.parametrize("case", CASES)
def test_public_conv_case_full_rank(case, scheme):
    model, inputs, expected = _load(case)
    feeds = {model.graph.input[0].name: inputs[0]}
    out, report = optimize(model, LowRankConfig(rank=100000, force=True, conv_scheme=scheme))
    row = report.layers[0]
    if "depthwise" in case and row.status == "skipped":
        assert row.reason.startswith("depthwise conv")
    else:
        assert row.status == "factorized", row.reason
        assert len(out.graph.node) >= 2
    got = run(out, feeds)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * float(np.abs(expected).max()))
    onnx.checker.check_model(out, full_check=True)
