"""Test helpers: tiny random-weight models for graph-rewrite tests, and onnxruntime runs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "onnx_lowrank" / "data"


def make_model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Sequence[onnx.ValueInfoProto],
    initializers: Sequence[onnx.TensorProto] = (),
    *,
    opset: int = 17,
    name: str = "test",
) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), name, list(inputs), list(outputs), list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="tests")
    model.ir_version = 8  # what onnxruntime 1.17+ accepts everywhere
    onnx.checker.check_model(model, full_check=True)
    return model


def vi(name: str, shape: Sequence[int | str | None], elem: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, list(shape))


def init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    denom = np.linalg.norm(b64)
    return float(np.linalg.norm(a64 - b64) / (denom if denom else 1.0))


def assert_clean(model: onnx.ModelProto) -> None:
    """Checker (full), shape inference, and no initializer that nothing reads."""
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    used = {i for n in model.graph.node for i in n.input}
    used |= {o.name for o in model.graph.output}
    orphans = [t.name for t in model.graph.initializer if t.name not in used]
    assert not orphans, f"orphan initializers: {orphans}"
