"""Hostile and odd inputs (issue 8, item 4): each case asserts numbers or messages.

NaN/Inf and extreme-magnitude weights, all-zero and rank-1 weights, quantized models, local
functions and nested subgraphs, empty graphs, duplicate node names, unwritable outputs, disk-full
and interrupted writes, and running ``optimize`` on its own output.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from builders import DATA, assert_clean, init, make_model, rel_err, run, run_cli, save_small_matmul, vi
from onnx_lowrank import LowRankConfig, optimize
from onnx_lowrank import model_io
from onnx_lowrank.model_io import ModelError, load_model, save_model

FULL = LowRankConfig(rank=100000, force=True)
SCHEMES = ("weight-svd", "spatial-svd", "tucker2")
NAN_REASON = "weight 'w_bad' contains NaN or Inf: left alone"
QUANT_REASON = "quantized operator: left alone"
TMP_PREFIX = ".onnx-lowrank-"


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {lines}"
    return lines[0]


def _all_graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _all_graphs(a.g)
            for g in a.graphs:
                yield from _all_graphs(g)


def _float_tensors(model: onnx.ModelProto):
    """Every float tensor stored in the model: initializers and Constant values, subgraphs too."""
    floats = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)
    for g in _all_graphs(model.graph):
        for t in g.initializer:
            if t.data_type in floats:
                yield t.name, numpy_helper.to_array(t)
        for n in g.node:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.TENSOR and a.t.data_type in floats:
                    yield f"{n.name}.{a.name}", numpy_helper.to_array(a.t)


def _nonfinite(model: onnx.ModelProto, allowed: set[str] = frozenset()) -> list[str]:
    return [name for name, a in _float_tensors(model)
            if name not in allowed and not np.all(np.isfinite(a.astype(np.float64)))]


def _temporaries(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.startswith(TMP_PREFIX)]


def _row(report, node: str):
    rows = [r for r in report.layers if r.node == node]
    assert len(rows) == 1, [r.node for r in report.layers]
    return rows[0]


# ------------------------------------------------------------------------------------------
# NaN / Inf weights
# ------------------------------------------------------------------------------------------


def _two_branch_model(op: str, bad_value: float, seed: int = 0):
    """``y_bad = layer(x, w_bad)`` and ``y_good = layer(x, w_good)`` side by side, one entry of
    ``w_bad`` replaced by ``bad_value``."""
    rng = np.random.default_rng(seed)
    if op == "MatMul":
        shape, x_shape, y_shape, attrs = (24, 16), [4, 24], [4, 16], {}
    elif op == "Gemm":
        shape, x_shape, y_shape, attrs = (16, 24), [4, 24], [4, 16], {"transB": 1}
    else:
        shape, x_shape, y_shape, attrs = (8, 4, 3, 3), [2, 4, 7, 7], [2, 8, 7, 7], {"pads": [1, 1, 1, 1]}
    w_bad = rng.standard_normal(shape).astype(np.float32)
    w_bad.flat[5] = bad_value
    w_good = rng.standard_normal(shape).astype(np.float32)
    nodes = [helper.make_node(op, ["x", "w_bad"], ["y_bad"], name="bad", **attrs),
             helper.make_node(op, ["x", "w_good"], ["y_good"], name="good", **attrs)]
    model = make_model(nodes, [vi("x", x_shape)], [vi("y_bad", y_shape), vi("y_good", y_shape)],
                       [init("w_bad", w_bad), init("w_good", w_good)])
    x = rng.standard_normal(x_shape).astype(np.float32)
    return model, x


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("op", ["MatMul", "Gemm", "Conv"])
def test_nonfinite_weight_is_skipped_and_never_spreads(op, bad_value):
    model, x = _two_branch_model(op, bad_value)
    configs = (FULL, LowRankConfig(rank=2, multiple_of=1), LowRankConfig(target_params=0.3), LowRankConfig(energy=0.5))
    for config in configs:
        # Weights spilled to disk (the default) are checked when first read: by the job
        # (rank policies) or for their spectrum (energy, budgets); in memory, when matched.
        out, report = optimize(model, config)
        in_memory, eager = optimize(model, config, lazy=False)
        assert out.SerializeToString() == in_memory.SerializeToString()
        assert [(r.node, r.status, r.reason) for r in report.layers] == \
            [(r.node, r.status, r.reason) for r in eager.layers]
        bad, good = _row(report, "bad"), _row(report, "good")
        assert bad.status == "skipped" and bad.reason == NAN_REASON
        assert good.status == "factorized" and np.isfinite(good.rel_error)
        # The bad weight is left byte-identical; every other float tensor is finite.
        original = {t.name: t for t in model.graph.initializer}
        kept = {t.name: t for t in out.graph.initializer}
        assert kept["w_bad"] == original["w_bad"]
        assert _nonfinite(out, allowed={"w_bad"}) == []
        assert_clean(out)
        got, want = run(out, {"x": x}), run(model, {"x": x})
        np.testing.assert_array_equal(np.isnan(got[0]), np.isnan(want[0]))  # the bad branch as it was
        if config is FULL:
            assert rel_err(got[1], want[1]) < 1e-4


def test_nonfinite_weight_behind_constant_and_transpose_is_skipped():
    rng = np.random.default_rng(1)
    w_t = rng.standard_normal((16, 24)).astype(np.float32)
    w_t[2, 3] = np.nan
    nodes = [helper.make_node("Constant", [], ["w_t"], name="const", value=numpy_helper.from_array(w_t, "w_t")),
             helper.make_node("Transpose", ["w_t"], ["w"], name="tr", perm=[1, 0]),
             helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    model = make_model(nodes, [vi("x", [4, 24])], [vi("y", [4, 16])])
    out, report = optimize(model, FULL)
    assert report.layers[0].status == "skipped"
    assert report.layers[0].reason == "weight 'w' contains NaN or Inf: left alone"
    assert out.SerializeToString() == model.SerializeToString()


def test_nonfinite_weight_cli_reports_reason_and_writes_finite_factors(tmp_path, capsys):
    model, _ = _two_branch_model("MatMul", np.nan)
    src, dst = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, src)
    code, out, err = run_cli(capsys, "optimize", src, dst, "--rank", "2")
    assert code == 0, err
    assert "contains NaN or Inf" in out and "factorized 1 of 2" in out
    written = onnx.load(dst)
    assert _nonfinite(written, allowed={"w_bad"}) == []


def test_nan_activations_in_calibration_never_give_nan_factors(caplog):
    """A NaN weight upstream makes every calibration activation downstream NaN: the downstream
    layer's Gram matrix is NaN. Whitening must be abandoned (factors stay finite) and the reason
    must say so; 'the Gram matrix is zero' would send the user looking for dead inputs."""
    rng = np.random.default_rng(2)
    w_bad = rng.standard_normal((24, 16)).astype(np.float32)
    w_bad[0, 0] = np.nan
    nodes = [helper.make_node("MatMul", ["x", "w_bad"], ["h"], name="first"),
             helper.make_node("MatMul", ["h", "w2"], ["y"], name="second")]
    model = make_model(nodes, [vi("x", ["n", 24])], [vi("y", ["n", 16])],
                       [init("w_bad", w_bad), init("w2", rng.standard_normal((16, 16)).astype(np.float32))])
    calibration = {"x": rng.standard_normal((32, 24)).astype(np.float32)}
    with caplog.at_level(logging.WARNING):
        out, report = optimize(model, LowRankConfig(rank=4, whiten="full"), calibration=calibration)
    assert _row(report, "first").reason == NAN_REASON
    second = _row(report, "second")
    assert second.status == "factorized" and second.rank == 4
    assert _nonfinite(out, allowed={"w_bad"}) == []
    said = " ".join([r.getMessage() for r in caplog.records] + [second.note or ""]).lower()
    assert "nan" in said or "non-finite" in said or "not finite" in said, said


@pytest.mark.parametrize("method", ["rsi", "rsvd", "svd"])
@pytest.mark.parametrize("scale", [1e25, 1e-30, 1e-40], ids=["huge", "tiny", "subnormal"])
def test_extreme_but_finite_weights_never_crash_or_write_garbage(method, scale):
    """float32 weights are finite up to 3.4e38 and down to 1e-45: factorization is scale
    invariant, so either the layer is factorized as well as at scale 1 or it is skipped with
    a reason. Never an exception, NaN factors, or silently zero factors."""
    rng = np.random.default_rng(3)
    base = rng.standard_normal((24, 16))
    w = (base * scale).astype(np.float32)
    assert np.all(np.isfinite(w)) and np.count_nonzero(w) == w.size
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                       [vi("x", [4, 24])], [vi("y", [4, 16])], [init("w", w)])
    reference = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                           [vi("x", [4, 24])], [vi("y", [4, 16])], [init("w", base.astype(np.float32))])
    config = LowRankConfig(rank=4, method=method)
    _, ref_report = optimize(reference, config)
    out, report = optimize(model, config)
    row = report.layers[0]
    assert _nonfinite(out) == []
    if row.status == "factorized":
        assert row.rel_error == pytest.approx(ref_report.layers[0].rel_error, rel=0.05)
    else:
        assert row.reason


# ------------------------------------------------------------------------------------------
# All-zero and rank-1 weights
# ------------------------------------------------------------------------------------------


def _layer(op: str, w: np.ndarray, seed: int = 0):
    rng = np.random.default_rng(seed)
    if op == "MatMul":
        node = helper.make_node("MatMul", ["x", "w"], ["y"], name="layer")
        x_shape, y_shape = [4, w.shape[0]], [4, w.shape[1]]
    elif op == "Gemm":
        node = helper.make_node("Gemm", ["x", "w", "c"], ["y"], name="layer", transB=1, alpha=0.5)
        x_shape, y_shape = [4, w.shape[1]], [4, w.shape[0]]
    else:
        node = helper.make_node("Conv", ["x", "w", "c"], ["y"], name="layer", pads=[1, 1, 1, 1])
        x_shape, y_shape = [2, w.shape[1], 6, 6], [2, w.shape[0], 6, 6]
    inits = [init("w", w)]
    if op != "MatMul":
        inits.append(init("c", rng.standard_normal(w.shape[0]).astype(np.float32)))
    model = make_model([node], [vi("x", x_shape)], [vi("y", y_shape)], inits)
    return model, rng.standard_normal(x_shape).astype(np.float32)


ZERO_CONFIGS = [
    ("full", FULL),
    ("rank-3", LowRankConfig(rank=3, multiple_of=1)),
    ("ratio", LowRankConfig(ratio=0.3, multiple_of=1)),
    ("energy", LowRankConfig(energy=0.9, multiple_of=1)),
    ("target", LowRankConfig(target_params=0.3)),
    ("svd", LowRankConfig(rank=3, method="svd", multiple_of=1)),
    ("rsvd", LowRankConfig(rank=3, method="rsvd", multiple_of=1)),
]


@pytest.mark.parametrize("name,config", ZERO_CONFIGS, ids=[c[0] for c in ZERO_CONFIGS])
@pytest.mark.parametrize("op", ["MatMul", "Gemm", "Conv"])
def test_all_zero_weight_gives_finite_zero_factors(op, name, config):
    shape = {"MatMul": (24, 16), "Gemm": (16, 24), "Conv": (8, 6, 3, 3)}[op]
    model, x = _layer(op, np.zeros(shape, np.float32))
    schemes = SCHEMES if op == "Conv" else ("weight-svd",)
    for scheme in schemes:
        cfg = replace(config, conv_scheme=scheme)
        out, report = optimize(model, cfg)
        row = report.layers[0]
        assert _nonfinite(out) == [], (scheme, row)
        if row.status == "factorized":
            assert row.rel_error == 0.0 and row.optimal_error in (0.0, None)
            factors = [numpy_helper.to_array(t) for t in out.graph.initializer if t.name != "c"]
            assert any(not np.any(f) for f in factors)  # a zero factor (Tucker keeps orthonormal bases)
        else:
            assert row.reason
        assert_clean(out)
        assert rel_err(run(out, {"x": x})[0], run(model, {"x": x})[0]) < 1e-6


def test_all_zero_weight_with_calibration_whitening_stays_finite():
    model, x = _layer("MatMul", np.zeros((24, 16), np.float32))
    calibration = {"x": np.random.default_rng(4).standard_normal((32, 4, 24)).astype(np.float32)}
    for whiten in ("full", "diag"):
        out, report = optimize(model, LowRankConfig(rank=3, whiten=whiten), calibration=calibration)
        assert report.layers[0].status == "factorized" and report.layers[0].rel_error == 0.0
        assert _nonfinite(out) == []
        assert not np.any(run(out, {"x": x})[0])


def _rank_one(op: str, seed: int = 5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if op == "Conv":  # weight-svd view W.reshape(M, -1).T of rank 1
        u, v = rng.standard_normal((8, 1)), rng.standard_normal((1, 6 * 9))
        return (u @ v).reshape(8, 6, 3, 3).astype(np.float32)
    shape = (24, 16) if op == "MatMul" else (16, 24)
    return (rng.standard_normal((shape[0], 1)) @ rng.standard_normal((1, shape[1]))).astype(np.float32)


@pytest.mark.parametrize("method", ["rsi", "rsvd", "svd"])
@pytest.mark.parametrize("op", ["MatMul", "Gemm", "Conv"])
def test_rank_one_weight_at_rank_one_is_exact(op, method):
    model, x = _layer(op, _rank_one(op))
    out, report = optimize(model, LowRankConfig(rank=1, method=method, multiple_of=1))
    row = report.layers[0]
    assert row.status == "factorized" and row.rank == 1
    assert row.rel_error < 1e-5 and row.optimal_error < 1e-5
    assert row.params_after == 1 * sum(row.shape)
    assert _nonfinite(out) == []
    assert_clean(out)
    assert rel_err(run(out, {"x": x})[0], run(model, {"x": x})[0]) < 1e-5


@pytest.mark.parametrize("op", ["MatMul", "Gemm", "Conv"])
def test_rank_one_weight_energy_policy_picks_rank_one(op):
    model, x = _layer(op, _rank_one(op))
    out, report = optimize(model, LowRankConfig(energy=0.999, multiple_of=1))
    assert report.layers[0].rank == 1
    assert rel_err(run(out, {"x": x})[0], run(model, {"x": x})[0]) < 1e-5


# ------------------------------------------------------------------------------------------
# Quantized models
# ------------------------------------------------------------------------------------------


def _qparams() -> list[onnx.TensorProto]:
    return [init("xs", np.array(0.1, np.float32)), init("xz", np.array(128, np.uint8)),
            init("ws", np.array(0.05, np.float32)), init("wz", np.array(0, np.int8)),
            init("ys", np.array(0.2, np.float32)), init("yz", np.array(128, np.uint8))]


def _quantized_models():
    rng = np.random.default_rng(6)
    wq = rng.integers(-127, 127, (24, 16)).astype(np.int8)
    wc = rng.integers(-127, 127, (8, 4, 3, 3)).astype(np.int8)
    u8 = TensorProto.UINT8
    yield "MatMulInteger", make_model(
        [helper.make_node("MatMulInteger", ["x", "w"], ["y"], name="q")],
        [vi("x", [4, 24], u8)], [vi("y", [4, 16], TensorProto.INT32)], [init("w", wq)]), \
        {"x": rng.integers(0, 255, (4, 24)).astype(np.uint8)}
    yield "QLinearMatMul", make_model(
        [helper.make_node("QLinearMatMul", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["y"], name="q")],
        [vi("x", [4, 24], u8)], [vi("y", [4, 16], u8)], [init("w", wq), *_qparams()]), \
        {"x": rng.integers(0, 255, (4, 24)).astype(np.uint8)}
    yield "QLinearConv", make_model(
        [helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["y"], name="q")],
        [vi("x", [1, 4, 6, 6], u8)], [vi("y", [1, 8, 4, 4], u8)], [init("w", wc), *_qparams()]), \
        {"x": rng.integers(0, 255, (1, 4, 6, 6)).astype(np.uint8)}
    yield "ConvInteger", make_model(
        [helper.make_node("ConvInteger", ["x", "w"], ["y"], name="q")],
        [vi("x", [1, 4, 6, 6], u8)], [vi("y", [1, 8, 4, 4], TensorProto.INT32)], [init("w", wc)]), \
        {"x": rng.integers(0, 255, (1, 4, 6, 6)).astype(np.uint8)}


@pytest.mark.parametrize("op,model,feeds", list(_quantized_models()), ids=lambda v: v if isinstance(v, str) else "")
def test_quantized_operators_are_left_alone_with_reason(op, model, feeds):
    for config in (LowRankConfig(), FULL):
        out, report = optimize(model, config)
        assert [(r.node, r.op, r.status, r.reason) for r in report.layers] == [("q", op, "skipped", QUANT_REASON)]
        assert out.SerializeToString() == model.SerializeToString()
        np.testing.assert_array_equal(run(out, feeds)[0], run(model, feeds)[0])


@pytest.mark.parametrize("op", ["MatMul", "Gemm", "Conv"])
def test_dequantize_linear_weights_are_left_alone_with_reason(op):
    rng = np.random.default_rng(7)
    if op == "Conv":
        wq, x_shape, y_shape, attrs = rng.integers(-127, 127, (8, 4, 3, 3)), [1, 4, 6, 6], [1, 8, 4, 4], {}
    elif op == "Gemm":
        wq, x_shape, y_shape, attrs = rng.integers(-127, 127, (16, 24)), [4, 24], [4, 16], {"transB": 1}
    else:
        wq, x_shape, y_shape, attrs = rng.integers(-127, 127, (24, 16)), [4, 24], [4, 16], {}
    nodes = [helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], name="dq"),
             helper.make_node(op, ["x", "w"], ["y"], name="layer", **attrs)]
    model = make_model(nodes, [vi("x", x_shape)], [vi("y", y_shape)],
                       [init("wq", wq.astype(np.int8)), init("ws", np.array(0.05, np.float32)),
                        init("wz", np.array(0, np.int8))])
    out, report = optimize(model, FULL)
    assert report.layers[0].status == "skipped"
    assert report.layers[0].reason == "weight 'w' comes from DequantizeLinear (quantized model): left alone"
    assert out.SerializeToString() == model.SerializeToString()


def test_dequantize_linear_behind_transpose_names_the_quantization():
    """QDQ exports often put a Transpose between DequantizeLinear and MatMul: the reason should
    still say the weight is quantized, not blame the Transpose."""
    rng = np.random.default_rng(8)
    nodes = [helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wt"], name="dq"),
             helper.make_node("Transpose", ["wt"], ["w"], name="tr", perm=[1, 0]),
             helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    model = make_model(nodes, [vi("x", [4, 24])], [vi("y", [4, 16])],
                       [init("wq", rng.integers(-127, 127, (16, 24)).astype(np.int8)),
                        init("ws", np.array(0.05, np.float32)), init("wz", np.array(0, np.int8))])
    out, report = optimize(model, FULL)
    assert report.layers[0].status == "skipped"
    assert "DequantizeLinear" in report.layers[0].reason, report.layers[0].reason
    assert out.SerializeToString() == model.SerializeToString()


def test_quantize_dynamic_digits_model_is_left_alone(tmp_path, capsys):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantized = tmp_path / "digits_int8.onnx"
    quantize_dynamic(str(DATA / "digits_mlp.onnx"), str(quantized), weight_type=QuantType.QInt8)
    original = onnx.load(quantized)
    for config in (LowRankConfig(), FULL, LowRankConfig(target_params=0.2)):
        out, report = optimize(quantized, config)
        assert len(report.layers) == 3
        assert {(r.op, r.status, r.reason) for r in report.layers} == {("MatMulInteger", "skipped", QUANT_REASON)}
        assert not report.factorized
        assert out.graph.SerializeToString() == original.graph.SerializeToString()
    # The CLI writes a model that still runs and gives the same logits.
    dst = tmp_path / "digits_int8.lowrank.onnx"
    code, stdout, err = run_cli(capsys, "optimize", quantized, dst, "--ratio", "0.5")
    assert code == 0, err
    assert "factorized 0 of 3" in stdout and stdout.count(QUANT_REASON) == 3
    pixels = np.load(DATA / "digits_heldout.npz")["pixels"][:16]
    np.testing.assert_array_equal(run(onnx.load(dst), {"pixels": pixels})[0], run(original, {"pixels": pixels})[0])


# ------------------------------------------------------------------------------------------
# Local functions and nested subgraphs
# ------------------------------------------------------------------------------------------


def _functions_and_subgraphs_model():
    """outer MatMul(x, w) -> local function Proj (a MatMul inside) -> Loop whose body holds an If
    with a MatMul in each branch; the then-branch reads the outer weight ``w``, and produces
    tensors named like the ones a rewrite of ``outer_mm`` would create."""
    rng = np.random.default_rng(9)
    w = rng.standard_normal((16, 16)).astype(np.float32)
    wf = rng.standard_normal((16, 16)).astype(np.float32)
    fn = helper.make_function(
        "local", "Proj", ["x"], ["y"],
        [helper.make_node("Constant", [], ["wf"], value=numpy_helper.from_array(wf, "wf"), name="fconst"),
         helper.make_node("MatMul", ["x", "wf"], ["y"], name="fmm")],
        [helper.make_opsetid("", 17)])
    then_g = helper.make_graph(
        [helper.make_node("MatMul", ["v_in", "w"], ["outer_mm/lowrank_hidden"], name="then_mm"),
         helper.make_node("Identity", ["outer_mm/lowrank_hidden"], ["w/lowrank_a"], name="outer_mm/lowrank_a_x"),
         helper.make_node("Identity", ["w/lowrank_a"], ["t_out"], name="tid")],
        "then", [], [vi("t_out", [4, 16])])
    else_g = helper.make_graph(
        [helper.make_node("Constant", [], ["we"], value=numpy_helper.from_array(wf * 0.5, "we"), name="econst"),
         helper.make_node("MatMul", ["v_in", "we"], ["e_out"], name="else_mm")],
        "else", [], [vi("e_out", [4, 16])])
    body = helper.make_graph(
        [helper.make_node("If", ["cond_in"], ["v_out"], name="if", then_branch=then_g, else_branch=else_g),
         helper.make_node("Identity", ["cond_in"], ["cond_out"], name="cid")],
        "body", [vi("i", [], TensorProto.INT64), vi("cond_in", [], TensorProto.BOOL), vi("v_in", [4, 16])],
        [vi("cond_out", [], TensorProto.BOOL), vi("v_out", [4, 16])])
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="outer_mm"),
             helper.make_node("Proj", ["h"], ["p"], domain="local", name="call"),
             helper.make_node("Loop", ["trip", "cond", "p"], ["z"], name="loop", body=body)]
    graph = helper.make_graph(nodes, "g", [vi("x", [4, 16]), vi("cond", [], TensorProto.BOOL)], [vi("z", [4, 16])],
                              [init("w", w), init("trip", np.array(2, np.int64))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
                              functions=[fn])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model, rng.standard_normal((4, 16)).astype(np.float32)


def test_functions_and_nested_subgraphs_are_left_intact_outer_matmul_factorized():
    model, x = _functions_and_subgraphs_model()
    out, report = optimize(model, FULL)
    rows = {r.node: r for r in report.layers}
    assert set(rows) == {"outer_mm", "then_mm", "else_mm", "fmm"}
    assert rows["outer_mm"].status == "factorized" and rows["outer_mm"].rank == 16
    assert rows["then_mm"].reason == "inside the subgraph of 'if': subgraphs are left intact"
    assert rows["else_mm"].reason == "inside the subgraph of 'if': subgraphs are left intact"
    assert rows["fmm"].reason == "inside local function 'Proj': functions are left intact"
    # Functions and the Loop body untouched; the outer weight survives (the then-branch reads it).
    assert [f.SerializeToString() for f in out.functions] == [f.SerializeToString() for f in model.functions]
    loop = lambda m: next(n for n in m.graph.node if n.op_type == "Loop")  # noqa: E731
    assert loop(out).SerializeToString() == loop(model).SerializeToString()
    assert "w" in {t.name for t in out.graph.initializer}
    assert [n.op_type for n in out.graph.node] == ["MatMul", "MatMul", "Proj", "Loop"]
    # New names avoid the names used inside the subgraph (one SSA namespace across scopes).
    inner = {o for g in list(_all_graphs(out.graph))[1:] for n in g.node for o in n.output}
    outer_new = {o for n in out.graph.node[:2] for o in n.output} | {t.name for t in out.graph.initializer}
    assert not inner & (outer_new - {"h"})
    onnx.checker.check_model(out, full_check=True)
    onnx.shape_inference.infer_shapes(out, check_type=True, strict_mode=True)
    for cond in (True, False):
        feeds = {"x": x, "cond": np.array(cond)}
        assert rel_err(run(out, feeds)[0], run(model, feeds)[0]) < 1e-5


def test_functions_and_subgraphs_at_low_rank_still_run():
    model, x = _functions_and_subgraphs_model()
    out, report = optimize(model, LowRankConfig(rank=2))
    assert [r.status for r in report.layers if r.node == "outer_mm"] == ["factorized"]
    onnx.checker.check_model(out, full_check=True)
    for cond in (True, False):
        got = run(out, {"x": x, "cond": np.array(cond)})[0]
        assert got.shape == (4, 16) and np.all(np.isfinite(got))


# ------------------------------------------------------------------------------------------
# Empty graphs, graphs without candidates
# ------------------------------------------------------------------------------------------


def _bare_model(nodes, inputs, outputs, inits=()):
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, list(inits)),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


EMPTYISH = {
    "no-nodes": lambda: _bare_model([], [vi("x", [2, 3])], [vi("x", [2, 3])]),
    "nothing-at-all": lambda: _bare_model([], [], []),
    "no-candidate": lambda: _bare_model([helper.make_node("Relu", ["x"], ["h"], name="r"),
                                         helper.make_node("Add", ["h", "x"], ["y"], name="a")],
                                        [vi("x", [2, 3])], [vi("y", [2, 3])]),
}


@pytest.mark.parametrize("kind", list(EMPTYISH))
def test_empty_graphs_and_graphs_without_candidates(kind, tmp_path, capsys):
    model = EMPTYISH[kind]()
    for config in (LowRankConfig(), FULL, LowRankConfig(target_params=0.5), LowRankConfig(target_flops=0.5)):
        out, report = optimize(model, config)
        assert report.layers == [] and report.totals()["factorized"] == 0
        assert out.SerializeToString() == model.SerializeToString()
    src, dst = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, src)
    code, stdout, err = run_cli(capsys, "optimize", src, dst)
    assert code == 0, err
    assert "factorized 0 of 0" in stdout
    assert onnx.load(dst).graph == model.graph
    if kind != "nothing-at-all":
        code, stdout, err = run_cli(capsys, "optimize", src, tmp_path / "checked.onnx", "--check", "--json")
        assert code == 0, err


def test_matmul_of_two_activations_is_reported_not_factorized():
    model = make_model([helper.make_node("MatMul", ["x", "z"], ["y"], name="mm")],
                       [vi("x", [2, 3]), vi("z", [3, 4])], [vi("y", [2, 4])])
    out, report = optimize(model, FULL)
    assert [(r.node, r.status, r.reason) for r in report.layers] == \
        [("mm", "skipped", "weight 'z' is a graph input (not a constant)")]
    assert out.SerializeToString() == model.SerializeToString()


# ------------------------------------------------------------------------------------------
# Duplicate node names
# ------------------------------------------------------------------------------------------


def _duplicate_names_model():
    rng = np.random.default_rng(10)
    w1 = rng.standard_normal((24, 16)).astype(np.float32)
    w2 = rng.standard_normal((16, 12)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm"),
             helper.make_node("MatMul", ["h", "w2"], ["y"], name="mm")]
    model = make_model(nodes, [vi("x", [4, 24])], [vi("y", [4, 12])], [init("w1", w1), init("w2", w2)])
    return model, rng.standard_normal((4, 24)).astype(np.float32), w1, w2


@pytest.mark.parametrize("config", [FULL, LowRankConfig(rank=4), LowRankConfig(target_params=0.5)],
                         ids=["full", "rank", "target"])
def test_duplicate_node_names_give_unique_new_names(config):
    model, x, w1, w2 = _duplicate_names_model()
    out, report = optimize(model, config)
    assert [r.status for r in report.layers] == ["factorized", "factorized"]
    names = [n.name for n in out.graph.node]
    outputs = [o for n in out.graph.node for o in n.output]
    inits = [t.name for t in out.graph.initializer]
    assert len(set(names)) == len(names) == 4
    assert len(set(outputs)) == len(outputs) and len(set(inits)) == len(inits) == 4
    assert set(names) == {"mm/lowrank_a", "mm/lowrank_b", "mm#2/lowrank_a", "mm#2/lowrank_b"}
    assert_clean(out)  # onnxruntime refuses the input (two nodes named "mm"); the output runs
    got = run(out, {"x": x})[0]
    if config is FULL:
        assert rel_err(got, x @ w1 @ w2) < 1e-5


def test_duplicate_node_names_keep_their_own_macs():
    """MACs are looked up by node label: two nodes named "mm" must not share one entry."""
    model, _, _, _ = _duplicate_names_model()
    _, report = optimize(model, LowRankConfig(rank=4))
    assert [r.macs_before for r in report.layers] == [4 * 24 * 16, 4 * 16 * 12]


def test_names_already_taken_by_the_user_are_avoided():
    rng = np.random.default_rng(11)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm/lowrank_hidden"], name="pre"),
             helper.make_node("Identity", ["mm/lowrank_hidden"], ["h"], name="mm/lowrank_a_user"),
             helper.make_node("MatMul", ["h", "w2"], ["y"], name="mm")]
    model = make_model(nodes, [vi("x", [4, 16])], [vi("y", [4, 12])],
                       [init("w", rng.standard_normal((16, 16)).astype(np.float32)),
                        init("w2", rng.standard_normal((16, 12)).astype(np.float32)),
                        init("w2/lowrank_a", rng.standard_normal(3).astype(np.float32))])
    model.graph.output.append(vi("w2/lowrank_a", [3]))  # keeps the user's tensor in use
    onnx.checker.check_model(model, full_check=True)
    out, report = optimize(model, FULL)
    assert [r.status for r in report.layers] == ["factorized", "factorized"]
    outputs = [o for n in out.graph.node for o in n.output]
    assert len(set(outputs)) == len(outputs)
    assert len({t.name for t in out.graph.initializer}) == len(out.graph.initializer)
    assert_clean(out)
    x = rng.standard_normal((4, 16)).astype(np.float32)
    for got, want in zip(run(out, {"x": x}), run(model, {"x": x})):
        assert rel_err(got, want) < 1e-5


# ------------------------------------------------------------------------------------------
# Unwritable output, disk full, interrupted writes
# ------------------------------------------------------------------------------------------


@pytest.fixture
def small_model(tmp_path: Path) -> Path:
    return save_small_matmul(tmp_path / "in.onnx", seed=12)


def test_output_under_a_regular_file_exits_1_one_line_nothing_written(tmp_path, small_model, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("not a directory")
    before = sorted(p.name for p in tmp_path.iterdir())
    for target in (blocker / "out.onnx", blocker / "sub" / "out.onnx"):
        code, stdout, err = run_cli(capsys, "optimize", small_model, target, "--rank", "4")
        assert code == 1 and stdout == ""
        line = _one_line(err)
        assert line.startswith("onnx-lowrank optimize: error: output directory ") and str(target.parent) in line
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert blocker.read_text() == "not a directory"


def test_report_under_a_regular_file_is_refused_before_writing_the_model(tmp_path, small_model, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    code, _, err = run_cli(capsys, "optimize", small_model, tmp_path / "out.onnx", "--report", blocker / "r.json")
    assert code == 1 and str(blocker) in _one_line(err)
    assert not (tmp_path / "out.onnx").exists()


def test_read_only_output_directory_exits_1_one_line(tmp_path, small_model, capsys, monkeypatch):
    out_dir = tmp_path / "ro"
    out_dir.mkdir()
    real_access = os.access
    monkeypatch.setattr(model_io.os, "access",
                        lambda p, mode, **kw: False if Path(p) == out_dir else real_access(p, mode, **kw))
    code, stdout, err = run_cli(capsys, "optimize", small_model, out_dir / "out.onnx")
    assert code == 1 and stdout == ""
    assert _one_line(err) == (f"onnx-lowrank optimize: error: output directory {out_dir} is not writable; "
                              "choose another output path")
    assert list(out_dir.iterdir()) == []


class _FailingFile:
    """A real file whose ``write`` writes half of the bytes, then raises ``exc``."""

    def __init__(self, path, mode, exc):
        self._fh = open(path, mode)  # noqa: SIM115
        self._exc = exc

    def write(self, data):
        self._fh.write(data[: len(data) // 2])
        self._fh.flush()
        raise self._exc

    def __getattr__(self, name):
        return getattr(self._fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._fh.close()
        return False


@pytest.mark.parametrize("exc", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()],
                         ids=["enospc", "interrupt"])
def test_write_failing_midway_keeps_previous_target_and_leaves_no_temporary(tmp_path, exc, monkeypatch):
    rng = np.random.default_rng(13)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [vi("x", [4, 64])],
                       [vi("y", [4, 48])], [init("w", rng.standard_normal((64, 48)).astype(np.float32))])
    target = tmp_path / "out.onnx"
    target.write_bytes(b"previous bytes")
    monkeypatch.setattr(model_io, "open", lambda p, m="r", *a, **k: _FailingFile(p, m, exc), raising=False)
    if isinstance(exc, OSError):
        with pytest.raises(ModelError, match=r"cannot write .*out\.onnx: No space left on device"):
            save_model(model, target)
    else:
        with pytest.raises(KeyboardInterrupt):
            save_model(model, target)
    assert target.read_bytes() == b"previous bytes"
    assert _temporaries(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]


def test_fsync_failure_keeps_previous_target(tmp_path, monkeypatch):
    model = onnx.load(DATA / "digits_mlp.onnx")
    target = tmp_path / "out.onnx"
    target.write_bytes(b"old")

    def eio(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(model_io.os, "fsync", eio)
    with pytest.raises(ModelError, match="Input/output error"):
        save_model(model, target)
    assert target.read_bytes() == b"old" and _temporaries(tmp_path) == []


@pytest.mark.parametrize("exc,code,message", [
    (OSError(errno.ENOSPC, "No space left on device"), 1,
     "onnx-lowrank optimize: error: cannot write {out}: No space left on device"),
    (KeyboardInterrupt(), 130, "onnx-lowrank: interrupted; no output was written"),
], ids=["enospc", "interrupt"])
def test_cli_disk_full_or_interrupted_write(tmp_path, small_model, capsys, monkeypatch, exc, code, message):
    target = tmp_path / "out.onnx"
    target.write_bytes(b"previous bytes")
    monkeypatch.setattr(model_io, "open", lambda p, m="r", *a, **k: _FailingFile(p, m, exc), raising=False)
    got, stdout, err = run_cli(capsys, "optimize", small_model, target, "--rank", "4", "--report", tmp_path / "r.json")
    assert got == code and stdout == ""
    assert _one_line(err) == message.format(out=target)
    assert target.read_bytes() == b"previous bytes"
    assert not (tmp_path / "r.json").exists()
    assert _temporaries(tmp_path) == []


def _mlp(seed: int, width: int = 48) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    return make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [vi("x", [4, 64])],
                      [vi("y", [4, width])], [init("w", rng.standard_normal((64, width)).astype(np.float32))])


def test_external_data_write_failing_midway_keeps_previous_pair(tmp_path, monkeypatch):
    target = tmp_path / "out.onnx"
    save_model(_mlp(1), target, external_data=True)
    old_model, old_data = target.read_bytes(), (tmp_path / "out.onnx.data").read_bytes()
    real_save = onnx.save_model

    def save_then_fail(model, path, **kwargs):
        real_save(model, path, **kwargs)
        data = Path(path).parent / kwargs["location"]
        data.write_bytes(data.read_bytes()[:100])  # half-written data file
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(model_io.onnx, "save_model", save_then_fail)
    with pytest.raises(ModelError, match="No space left on device"):
        save_model(_mlp(2), target, external_data=True)
    assert target.read_bytes() == old_model
    assert (tmp_path / "out.onnx.data").read_bytes() == old_data
    assert _temporaries(tmp_path) == []


@pytest.mark.parametrize("exc", [OSError(errno.EIO, "Input/output error"), KeyboardInterrupt()],
                         ids=["eio", "interrupt"])
def test_external_data_interrupted_between_the_two_renames_keeps_a_consistent_pair(tmp_path, monkeypatch, exc):
    """The data file is renamed into place before the model file. If the second rename never
    happens, the previous ``out.onnx`` must not be left reading the new ``out.onnx.data``."""
    target = tmp_path / "out.onnx"
    save_model(_mlp(1, width=48), target, external_data=True)
    old = numpy_helper.to_array(load_model(target).graph.initializer[0])
    real_replace = os.replace
    calls = []

    def second_fails(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise exc
        return real_replace(src, dst)

    monkeypatch.setattr(model_io.os, "replace", second_fails)
    with pytest.raises((ModelError, KeyboardInterrupt)):
        save_model(_mlp(2, width=32), target, external_data=True)
    monkeypatch.setattr(model_io.os, "replace", real_replace)
    assert _temporaries(tmp_path) == []
    # The previous output still loads and still holds its own weights.
    np.testing.assert_array_equal(numpy_helper.to_array(load_model(target).graph.initializer[0]), old)


# ------------------------------------------------------------------------------------------
# Optimizing an already optimized model
# ------------------------------------------------------------------------------------------


def _three_families():
    rng = np.random.default_rng(14)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
             helper.make_node("Gemm", ["h", "w2", "b2"], ["g"], name="gemm", transB=1),
             helper.make_node("Reshape", ["g", "shape"], ["g4"], name="rs"),
             helper.make_node("Conv", ["g4", "wc"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    inits = [init("w1", rng.standard_normal((64, 48)).astype(np.float32)),
             init("w2", rng.standard_normal((128, 48)).astype(np.float32)),
             init("b2", rng.standard_normal(128).astype(np.float32)),
             init("shape", np.array([2, 8, 4, 4], np.int64)),
             init("wc", rng.standard_normal((40, 8, 3, 3)).astype(np.float32))]
    model = make_model(nodes, [vi("x", [2, 64])], [vi("y", [2, 40, 4, 4])], inits)
    return model, rng.standard_normal((2, 64)).astype(np.float32)


OWN = "already a low-rank factor (made by onnx-lowrank)"


@pytest.mark.parametrize("scheme", SCHEMES)
def test_second_run_leaves_factor_chains_alone_even_with_force(scheme):
    model, x = _three_families()
    once, first = optimize(model, LowRankConfig(rank=8, multiple_of=1, conv_scheme=scheme))
    assert [r.status for r in first.layers] == ["factorized"] * 3
    n_factor_nodes = 7 if scheme == "tucker2" else 6
    for config in (LowRankConfig(rank=8, multiple_of=1, conv_scheme=scheme), LowRankConfig(ratio=0.5),
                   LowRankConfig(rank=100000, force=True, conv_scheme=scheme),
                   LowRankConfig(rank=2, force=True, multiple_of=1, conv_scheme=scheme),
                   LowRankConfig(target_params=0.3)):
        twice, second = optimize(once, config)
        assert [(r.status, r.reason) for r in second.layers] == [("skipped", OWN)] * n_factor_nodes
        assert twice.SerializeToString() == once.SerializeToString()
        assert rel_err(run(twice, {"x": x})[0], run(once, {"x": x})[0]) == 0.0


def test_second_run_factorizes_only_what_the_first_left_dense(tmp_path, capsys):
    model, x = _three_families()
    once, first = optimize(model, LowRankConfig(rank=8, multiple_of=1, op_types=("MatMul",)))
    assert [r.status for r in first.layers] == ["factorized", "skipped", "skipped"]
    twice, second = optimize(once, FULL)
    assert [(r.node, r.status) for r in second.layers] == [
        ("mm1/lowrank_a", "skipped"), ("mm1/lowrank_b", "skipped"), ("gemm", "factorized"), ("conv", "factorized")]
    assert rel_err(run(twice, {"x": x})[0], run(once, {"x": x})[0]) < 1e-4
    assert_clean(twice)
    # CLI, with --force: exit 0, the factor nodes are listed with the reason.
    src, dst = tmp_path / "once.onnx", tmp_path / "twice.onnx"
    onnx.save(once, src)
    code, stdout, err = run_cli(capsys, "optimize", src, dst, "--rank", "100000", "--force")
    assert code == 0, err
    assert stdout.count(OWN) == 2 and "factorized 2 of 4" in stdout


def test_second_run_recognises_factor_chains_without_node_names():
    rng = np.random.default_rng(15)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [vi("x", [4, 256])],
                       [vi("y", [4, 256])], [init("w", rng.standard_normal((256, 256)).astype(np.float32))])
    once, _ = optimize(model, LowRankConfig(ratio=0.5))
    for node in once.graph.node:
        node.name = ""
    _, second = optimize(once, LowRankConfig(ratio=0.5))
    assert [r.status for r in second.layers] == ["skipped", "skipped"]
