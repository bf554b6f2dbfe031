"""The committed default demo model (onnx_lowrank/data/digits_mlp.onnx) and its held-out data."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

DATA_DIR = Path(__file__).resolve().parents[1] / "onnx_lowrank" / "data"
MODEL_PATH = DATA_DIR / "digits_mlp.onnx"
HELDOUT_PATH = DATA_DIR / "digits_heldout.npz"

EXPECTED_NODES = [
    # (name, op_type, inputs, outputs)
    ("fc1/Gemm", "Gemm", ["pixels", "fc1.weight", "fc1.bias"], ["fc1/Gemm_output_0"]),
    ("relu1/Relu", "Relu", ["fc1/Gemm_output_0"], ["relu1/Relu_output_0"]),
    ("fc2/MatMul", "MatMul", ["relu1/Relu_output_0", "fc2.weight"], ["fc2/MatMul_output_0"]),
    ("fc2/Add", "Add", ["fc2/MatMul_output_0", "fc2.bias"], ["fc2/Add_output_0"]),
    ("relu2/Relu", "Relu", ["fc2/Add_output_0"], ["relu2/Relu_output_0"]),
    ("fc3/Gemm", "Gemm", ["relu2/Relu_output_0", "fc3.weight", "fc3.bias"], ["logits"]),
]
EXPECTED_INITIALIZERS = {
    "fc1.weight": (256, 64),  # PyTorch Linear layout [out, in], Gemm transB=1
    "fc1.bias": (256,),
    "fc2.weight": (256, 256),  # [in, out], MatMul
    "fc2.bias": (256,),
    "fc3.weight": (10, 256),  # [out, in], Gemm transB=1
    "fc3.bias": (10,),
}


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return onnx.load(str(MODEL_PATH))


@pytest.fixture(scope="module")
def heldout():
    with np.load(HELDOUT_PATH) as data:
        return {k: data[k] for k in data.files}


def _dims(value_info):
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def test_model_is_valid(model):
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version in (8, 9)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    assert model.producer_name == "onnx-lowrank models/digits.py"


def test_graph_structure(model):
    g = model.graph
    got = [(n.name, n.op_type, list(n.input), list(n.output)) for n in g.node]
    assert got == EXPECTED_NODES
    attrs = {n.name: {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in g.node}
    assert attrs["fc1/Gemm"]["transB"] == 1 and attrs["fc3/Gemm"]["transB"] == 1
    assert attrs["fc1/Gemm"].get("transA", 0) == 0 and attrs["fc3/Gemm"].get("transA", 0) == 0

    inits = {t.name: tuple(t.dims) for t in g.initializer}
    assert inits == EXPECTED_INITIALIZERS
    assert all(t.data_type == onnx.TensorProto.FLOAT for t in g.initializer)

    assert [i.name for i in g.input] == ["pixels"]  # initializers are not graph inputs
    assert [o.name for o in g.output] == ["logits"]
    assert g.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert g.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert _dims(g.input[0]) == ["batch", 64]
    assert _dims(g.output[0]) == ["batch", 10]


def test_heldout_file(heldout):
    assert sorted(heldout) == ["labels", "pixels"]
    x, y = heldout["pixels"], heldout["labels"]
    assert x.dtype == np.float32 and x.ndim == 2 and x.shape[1] == 64
    assert y.dtype == np.int64 and y.shape == (x.shape[0],)
    assert x.shape[0] == 540  # 30% stratified split of the 1797 digits
    assert x.min() >= 0.0 and x.max() <= 1.0
    assert set(np.unique(y).tolist()) == set(range(10))


def test_heldout_accuracy_matches_metadata(model, heldout):
    props = {p.key: p.value for p in model.metadata_props}
    sess = ort.InferenceSession(str(MODEL_PATH), providers=["CPUExecutionProvider"])
    (logits,) = sess.run(["logits"], {"pixels": heldout["pixels"]})
    assert logits.shape == (heldout["pixels"].shape[0], 10)
    assert logits.dtype == np.float32
    pred = logits.argmax(axis=1)
    correct = int(np.sum(pred == heldout["labels"]))
    acc = correct / len(heldout["labels"])
    assert acc >= 0.95
    assert correct == int(props["heldout_correct"])
    assert len(heldout["labels"]) == int(props["heldout_total"])
    assert acc == pytest.approx(float(props["heldout_accuracy"]), abs=1e-12)
    assert f"{acc:.6f}" in model.doc_string


def test_symbolic_batch(heldout):
    sess = ort.InferenceSession(str(MODEL_PATH), providers=["CPUExecutionProvider"])
    for n in (1, 7):
        (logits,) = sess.run(["logits"], {"pixels": heldout["pixels"][:n]})
        assert logits.shape == (n, 10)


def test_rebuild_is_byte_identical(tmp_path, monkeypatch):
    """Determinism guard: rebuilding (~10 s) reproduces the committed files exactly.

    The npz is pure data and must match everywhere; the ONNX bytes depend on
    float training and so on the numpy/BLAS build (verified stable across
    thread counts).
    """
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))  # works without PYTHONPATH=.
    from models.digits import build_digits_model

    result = build_digits_model(tmp_path, seed=0)
    sha = lambda p: hashlib.sha256(Path(p).read_bytes()).hexdigest()  # noqa: E731
    assert sha(tmp_path / "digits_heldout.npz") == sha(HELDOUT_PATH)
    assert sha(tmp_path / "digits_mlp.onnx") == sha(MODEL_PATH)
    assert result["ort_accuracy"] == result["heldout_accuracy"]
