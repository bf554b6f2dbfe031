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


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """``onnx-lowrank ARGV`` in-process: (exit code, stdout, stderr); argparse exits count too."""
    from onnx_lowrank.cli import main

    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def save_small_matmul(path: Path, seed: int = 0) -> Path:
    """A one-MatMul model (64 -> 48, symbolic batch) saved at ``path``."""
    rng = np.random.default_rng(seed)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                       [vi("x", ["batch", 64])], [vi("y", ["batch", 48])],
                       [init("w", rng.standard_normal((64, 48)).astype(np.float32))])
    onnx.save(model, path)
    return path

