"""Gemm pass: every attribute combination at forced full rank reproduces onnxruntime's output."""

from __future__ import annotations

import itertools

import numpy as np
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


def test_old_opset_gemm_is_left_alone():
    rng = np.random.default_rng(0)
    node = helper.make_node("Gemm", ["x", "w", "c"], ["y"], name="gemm", transB=1)
    model = make_model([node], [vi("x", [M, K])], [vi("y", [M, N])],
                       [init("w", rng.standard_normal((N, K)).astype(np.float32)), init("c", np.zeros(N, np.float32))],
                       opset=9)
    _, report = optimize(model, FULL)
    assert report.layers[0].reason == "Gemm in opset 9 (< 11) requires C on every node: left alone"
