"""Gemm pass: every attribute combination at forced full rank reproduces onnxruntime's output."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from builders import assert_clean, init, make_model, rel_err, run, vi
from onnx_lowrank import LowRankConfig, optimize

FULL = LowRankConfig(rank=100000, force=True)
M, K, N = 5, 24, 16

C_SHAPES = {"none": None, "scalar": [], "vector": [N], "matrix": [M, N]}


def _gemm_model(side, trans_a, trans_b, alpha, beta, c_kind, seed=0):
    rng = np.random.default_rng(seed)
    a_shape = [K, M] if trans_a else [M, K]
    b_shape = [N, K] if trans_b else [K, N]
    inits, inputs = [], []
    if side == "right":
        inits.append(init("w", rng.standard_normal(b_shape).astype(np.float32)))
        inputs.append(vi("x", a_shape))
        names = ["x", "w"]
    else:
        inits.append(init("w", rng.standard_normal(a_shape).astype(np.float32)))
        inputs.append(vi("x", b_shape))
        names = ["w", "x"]
    if C_SHAPES[c_kind] is not None:
        inits.append(init("c", rng.standard_normal(C_SHAPES[c_kind]).astype(np.float32)))
        names.append("c")
    attrs = {"transA": trans_a, "transB": trans_b, "alpha": alpha, "beta": beta}
    node = helper.make_node("Gemm", names, ["y"], name="gemm", **attrs)
    model = make_model([node], inputs, [vi("y", [M, N])], inits)
    shape = a_shape if side == "right" else b_shape
    x = rng.standard_normal(shape).astype(np.float32)
    return model, x


CASES = list(itertools.product(["right", "left"], [0, 1], [0, 1], [(1.0, 1.0), (0.5, 2.0)], list(C_SHAPES)))


@pytest.mark.parametrize("side,trans_a,trans_b,scales,c_kind", CASES)
def test_every_gemm_variant_full_rank(side, trans_a, trans_b, scales, c_kind):
    alpha, beta = scales
    model, x = _gemm_model(side, trans_a, trans_b, alpha, beta, c_kind)
    out, report = optimize(model, FULL)
    assert report.layers[0].status == "factorized"
    assert [n.op_type for n in out.graph.node] == ["Gemm", "Gemm"]
    assert rel_err(run(out, {"x": x})[0], run(model, {"x": x})[0]) < 1e-4
    first, second = out.graph.node
    assert "x" in first.input and second.input[:2].count(first.output[0]) == 1
    if c_kind != "none":
        assert second.input[2] == "c" and len(first.input) == 2  # bias on the second node only
    assert_clean(out)


def test_transb_factors_keep_storage_orientation():
    # PyTorch Linear: weight stored [out, in] with transB=1; so are the factors.
    model, x = _gemm_model("right", 0, 1, 1.0, 1.0, "vector")
    out, report = optimize(model, LowRankConfig(rank=6))
    assert report.layers[0].shape == (K, N)
    shapes = {t.name: list(t.dims) for t in out.graph.initializer}
    assert shapes["w/lowrank_a"] == [6, K] and shapes["w/lowrank_b"] == [N, 6]
    assert all(any(a.name == "transB" and a.i == 1 for a in n.attribute) for n in out.graph.node)


def test_truncated_gemm_matches_numpy_of_stored_factors():
    model, x = _gemm_model("right", 0, 1, 0.5, 2.0, "matrix", seed=3)
    out, _ = optimize(model, LowRankConfig(rank=5))
    t = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    expected = 0.5 * x @ t["w/lowrank_a"].T @ t["w/lowrank_b"].T + 2.0 * t["c"]
    assert rel_err(run(out, {"x": x})[0], expected) < 1e-5


@pytest.mark.parametrize("opset", [7, 9, 10])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("trans", [0, 1])
def test_old_opset_gemm_full_rank_is_matmul_then_gemm_with_c(opset, side, trans):
    """Before opset 11 C is mandatory on every Gemm: MatMul (after a Transpose when the activation
    is transposed) then the Gemm that carries C, alpha and beta; exact at full rank."""
    rng = np.random.default_rng(opset + trans)
    w_shape = (N, K) if trans else (K, N)  # right: op(B) is K x N
    if side == "right":
        node = helper.make_node("Gemm", ["x", "w", "c"], ["y"], name="gemm", transA=trans, transB=trans,
                                alpha=0.5, beta=2.0)
        x = rng.standard_normal((K, M) if trans else (M, K)).astype(np.float32)
        w = rng.standard_normal(w_shape).astype(np.float32)
        c = rng.standard_normal(N).astype(np.float32)
        out_shape = [M, N]
    else:  # constant A (M x K as op(A)), activation B
        node = helper.make_node("Gemm", ["w", "x", "c"], ["y"], name="gemm", transA=trans, transB=trans,
                                alpha=0.5, beta=2.0)
        w = rng.standard_normal((K, M) if trans else (M, K)).astype(np.float32)
        x = rng.standard_normal((N, K) if trans else (K, N)).astype(np.float32)
        c = rng.standard_normal((M, 1)).astype(np.float32)
        out_shape = [M, N]
    model = make_model([node], [vi("x", list(x.shape))], [vi("y", out_shape)], [init("w", w), init("c", c)],
                       opset=opset)
    out, report = optimize(model, FULL)
    row = report.layers[0]
    assert row.status == "factorized", row.reason
    ops = [n.op_type for n in out.graph.node]
    assert ops == (["Transpose"] if trans else []) + ["MatMul", "Gemm"]
    assert list(out.graph.node[-1].input)[2] == "c" and out.graph.node[-1].output[0] == "y"
    assert rel_err(run(out, {"x": x})[0], run(model, {"x": x})[0]) < 1e-5
    assert_clean(out)


def test_old_opset_gemm_without_c_is_refused():
    # Invalid before opset 11 (the checker refuses it), so asked of the rule directly.
    from onnx_lowrank.passes.gemm import match_gemm
    from onnx_lowrank.passes.graph import GraphContext
    from onnx_lowrank.passes.skip import Skip

    node = helper.make_node("Gemm", ["x", "w"], ["y"], name="gemm")
    model = onnx.helper.make_model(
        helper.make_graph([node], "g", [vi("x", [M, K])], [vi("y", [M, N])],
                          [init("w", np.ones((K, N), np.float32))]),
        opset_imports=[helper.make_opsetid("", 9)])
    found = match_gemm(node, "gemm", GraphContext(model), FULL)
    assert found == Skip("Gemm without C (required before opset 11)")


@pytest.mark.parametrize("case", ["pytorch-converted/test_Linear"])
def test_onnx_opset6_linear_conformance_case_full_rank(case):
    """onnx's opset-6 Linear case (Gemm with broadcast=1, transB=1, IR 3: initializers are also
    inputs). onnxruntime has no Gemm-6 kernel: onnx's reference evaluator runs both models."""
    from pathlib import Path

    from onnx.reference import ReferenceEvaluator

    base = Path(onnx.__file__).parent / "backend" / "test" / "data" / case
    model = onnx.load(str(base / "model.onnx"))
    x = numpy_helper.to_array(onnx.load_tensor(str(base / "test_data_set_0" / "input_0.pb")))
    expected = numpy_helper.to_array(onnx.load_tensor(str(base / "test_data_set_0" / "output_0.pb")))
    out, report = optimize(model, LowRankConfig(rank=100000, force=True))
    assert report.layers[0].status == "factorized", report.layers[0].reason
    assert [n.op_type for n in out.graph.node] == ["MatMul", "Gemm"]
    assert {a.name: a.i for a in out.graph.node[-1].attribute if a.name == "broadcast"} == {"broadcast": 1}
    feeds = {model.graph.input[0].name: x}
    np.testing.assert_allclose(ReferenceEvaluator(out).run(None, feeds)[0], expected, rtol=1e-4, atol=1e-5)
    # IR 3: the new factors are graph inputs too, the replaced weight is gone from both lists
    names = {i.name for i in out.graph.input}
    assert {t.name for t in out.graph.initializer} <= names and "1" not in names
    onnx.checker.check_model(out)
