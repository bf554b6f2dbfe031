"""optimize_graph: the onnx-graphsurgeon entry point, on real models.

The gs.Graph path must give the same factorization as the ModelProto API (same report rows,
outputs equal to the ModelProto result's) and leave the caller's graph untouched.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from builders import run
from onnx_lowrank import LowRankConfig, optimize
from onnx_lowrank.gs_api import optimize_graph

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models import registry  # noqa: E402

DIGITS = Path(__file__).resolve().parents[1] / "onnx_lowrank" / "data" / "digits_mlp.onnx"
DIGITS_CAL = DIGITS.with_name("digits_calibration.npz")


def _rows(report):
    return [(r.node, r.status, r.rank, r.params_after, r.reason) for r in report.layers]


def _graph_bytes(graph: gs.Graph) -> bytes:
    return gs.export_onnx(graph, do_type_check=False).SerializeToString()


def test_digits_graph_matches_modelproto_api():
    model = onnx.load(str(DIGITS))
    graph = gs.import_onnx(model)
    before = _graph_bytes(graph)
    config = LowRankConfig(target_params=0.5)
    out_graph, report = optimize_graph(graph, config, calibration=str(DIGITS_CAL))
    reference, ref_report = optimize(model, config, calibration=str(DIGITS_CAL))

    assert _graph_bytes(graph) == before  # the caller's graph is not modified
    assert _rows(report) == _rows(ref_report)
    assert len(report.factorized) >= 1
    exported = gs.export_onnx(out_graph)
    onnx.checker.check_model(exported)
    assert [n.op_type for n in exported.graph.node] == [n.op_type for n in reference.graph.node]
    pixels = np.load(DIGITS.with_name("digits_heldout.npz"))["pixels"][:64]
    got, = run(exported, {"pixels": pixels})
    want, = run(reference, {"pixels": pixels})
    np.testing.assert_array_equal(got, want)


def test_efficientnet_graph_after_polygraphy_style_cleanup():
    spec = registry.get("efficientnet_lite0")
    for module in spec.requires:
        pytest.importorskip(module, reason=f"{module} not installed: pip install -e '.[models]'")
    path = Path(spec.build())
    graph = gs.import_onnx(onnx.load(str(path)))
    graph.fold_constants().cleanup()  # what a TensorRT/Polygraphy pipeline does first
    config = LowRankConfig(ratio=0.5, op_types=("Conv",))
    out_graph, report = optimize_graph(graph, config)
    reference, ref_report = optimize(gs.export_onnx(graph, do_type_check=False), config)

    assert _rows(report) == _rows(ref_report)
    factorized = report.factorized
    assert len(factorized) >= 20  # most of its 33 pointwise convs (depthwise ones are skipped with a reason)
    assert all(r.reason for r in report.layers if r.status != "factorized")
    image = np.random.default_rng(0).uniform(-1, 1, (2, 3, 224, 224)).astype(np.float32)
    got, = run(gs.export_onnx(out_graph), {"image": image})
    want, = run(reference, {"image": image})
    np.testing.assert_array_equal(got, want)
    params_after = sum(int(np.prod(t.shape)) for t in out_graph.tensors().values() if isinstance(t, gs.Constant))
    params_before = sum(int(np.prod(t.shape)) for t in graph.tensors().values() if isinstance(t, gs.Constant))
    assert params_after < params_before
