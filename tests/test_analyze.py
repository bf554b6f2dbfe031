"""onnx-lowrank analyze: energy ranks against an exact SVD, JSON schema, skip reasons, CLI exit codes."""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import onnx
import pytest
from builders import DATA, init, make_model, vi
from onnx import TensorProto, helper, numpy_helper

from onnx_lowrank.analyze import DEFAULT_EXACT_LIMIT, analyze_model, format_analysis
from onnx_lowrank.cli.analyze import add_analyze_arguments, run_analyze
from onnx_lowrank.config import LowRankConfig

ENERGIES = ("0.9", "0.95", "0.99")


def matrix_with_spectrum(m: int, n: int, sigma: np.ndarray, seed: int = 0) -> np.ndarray:
    """float32 W (m x n) = U diag(sigma) V^T with random orthonormal U, V."""
    rng = np.random.default_rng(seed)
    k = len(sigma)
    u, _ = np.linalg.qr(rng.standard_normal((m, k)))
    v, _ = np.linalg.qr(rng.standard_normal((n, k)))
    return ((u * sigma) @ v.T).astype(np.float32)


def exact_energy_rank(w: np.ndarray, energy: float) -> int:
    """Reference: the smallest r with sum_{i<=r} s_i^2 >= energy * sum s_i^2, from a float64 SVD."""
    s = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    cum = np.cumsum(s**2) / np.sum(s**2)
    return int(np.argmax(cum >= energy - 1e-12)) + 1


def two_layer_model(w1: np.ndarray, w2_t: np.ndarray) -> onnx.ModelProto:
    """x -> MatMul(W1) -> Gemm(transB=1, W2^T stored) -> y: both weight layouts real exporters use."""
    m, h = w1.shape
    out = w2_t.shape[0]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1/MatMul"),
        helper.make_node("Gemm", ["h", "w2", "b2"], ["y"], name="fc2/Gemm", transB=1),
    ]
    return make_model(
        nodes, [vi("x", ["batch", m])], [vi("y", ["batch", out])],
        [init("w1", w1), init("w2", w2_t), init("b2", np.zeros(out, np.float32))],
    )


# Spectra that put the 90/95/99% cut-offs at very different ranks.
SIGMA_SLOW = 1.0 / np.sqrt(np.arange(1, 97))         # sigma_i = i^-1/2: slow decay
SIGMA_FAST = 0.9 ** np.arange(64)                    # geometric
SIGMA_STEP = np.r_[np.full(10, 5.0), np.full(54, 0.5)]  # a gap after 10 values


@pytest.mark.parametrize("sigma", [SIGMA_SLOW, SIGMA_FAST, SIGMA_STEP], ids=["slow", "geometric", "step"])
def test_energy_ranks_equal_exact_svd(sigma):
    w1 = matrix_with_spectrum(96, 128, sigma, seed=1)
    w2 = matrix_with_spectrum(128, 40, sigma[:40], seed=2)
    result = analyze_model(two_layer_model(w1, np.ascontiguousarray(w2.T)))
    layers = {layer["name"]: layer for layer in result["layers"]}
    assert set(layers) == {"fc1/MatMul", "fc2/Gemm"}
    for name, w in (("fc1/MatMul", w1), ("fc2/Gemm", w2)):
        layer = layers[name]
        assert layer["estimated"] is False
        assert layer["shape"] == list(w.shape)
        for e in ENERGIES:
            assert layer["energy_rank"][e] == exact_energy_rank(w, float(e)), (name, e)


def test_hand_made_spectrum_ranks():
    # energies 0.64, 0.25, 0.09, 0.02 (of 1.0): 90% needs 3 values, 95% 3, 99% 4.
    sigma = np.sqrt([0.64, 0.25, 0.09, 0.02])
    w = matrix_with_spectrum(32, 24, sigma)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                       [vi("x", [1, 32])], [vi("y", [1, 24])], [init("w", w)])
    layer = analyze_model(model)["layers"][0]
    assert layer["energy_rank"] == {"0.9": 3, "0.95": 3, "0.99": 4}
    assert layer["break_even_rank"] == int(np.ceil(32 * 24 / (32 + 24)))  # 14
    assert layer["params"] == 32 * 24


def test_estimated_spectrum_is_flagged_and_close():
    """Above exact_limit the spectrum comes from RSI; on a decaying spectrum its ranks agree."""
    w = matrix_with_spectrum(300, 200, SIGMA_FAST.repeat(3)[:150] ** 1.0, seed=3)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="big")],
                       [vi("x", [1, 300])], [vi("y", [1, 200])], [init("w", w)])
    exact = analyze_model(model)["layers"][0]
    est = analyze_model(model, exact_limit=64)["layers"][0]
    assert exact["estimated"] is False and est["estimated"] is True
    assert est["spectrum_values"] < 200
    for e in ENERGIES:
        assert exact["energy_rank"][e] == exact_energy_rank(w, float(e))
        # RSI values are lower bounds: the estimate may only err high, and by very little here
        assert 0 <= est["energy_rank"][e] - exact["energy_rank"][e] <= 1
    assert "~" in format_analysis(analyze_model(model, exact_limit=64))


def test_json_schema_and_totals():
    w1 = matrix_with_spectrum(64, 64, SIGMA_SLOW[:64])
    w2 = matrix_with_spectrum(64, 16, SIGMA_SLOW[:16], seed=5)
    result = analyze_model(two_layer_model(w1, np.ascontiguousarray(w2.T)))
    assert {"layers", "totals", "skipped", "energies", "ratios", "exact_limit", "model"} <= set(result)
    for layer in result["layers"]:
        assert {"name", "op", "weight", "shape", "params", "break_even_rank", "energy_rank", "estimated",
                "energy_params", "ratio_rank", "ratio_energy"} <= set(layer)
        assert set(layer["energy_rank"]) == set(ENERGIES)
    totals = result["totals"]
    assert totals["layers"] == 2 and totals["skipped"] == 0
    assert totals["params"] == 64 * 64 + 64 * 16
    assert totals["model_params"] == 64 * 64 + 64 * 16 + 16  # + the Gemm bias
    # --ratio 0.5 keeps about half of each layer: rank floor(0.5 * m n / (m + n))
    r50 = totals["ratio"]["0.5"]
    assert r50["params_after"] == 16 * 128 + 6 * 80
    assert 0 < r50["energy_kept"] < 1
    # --energy 0.99 on a slow spectrum needs ranks above break-even: everything stays dense
    assert totals["energy"]["0.99"]["params_after"] == totals["params"]
    assert totals["energy"]["0.99"]["factorized"] == 0
    # JSON-serializable, without the internal plot data
    from onnx_lowrank.analyze import to_json

    doc = json.loads(to_json(result))
    assert all(not k.startswith("_") for layer in doc["layers"] for k in layer)


def test_skip_reasons_listed():
    w = matrix_with_spectrum(16, 16, np.ones(16))
    q = np.ones((16, 16), dtype=np.int8)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="const_weight"),
        helper.make_node("MatMul", ["h", "wi"], ["h2"], name="input_weight"),  # weight is a graph input
        helper.make_node("MatMulInteger", ["xq", "q"], ["yq"], name="quantized"),
    ]
    model = make_model(
        nodes,
        [vi("x", [1, 16]), vi("wi", [16, 16]), vi("xq", [1, 16], TensorProto.INT8)],
        [vi("h2", [1, 16]), vi("yq", [1, 16], TensorProto.INT32)],
        [init("w", w), numpy_helper.from_array(q, "q")],
    )
    result = analyze_model(model, LowRankConfig(exclude=("nothing-matches",)))
    assert [layer["name"] for layer in result["layers"]] == ["const_weight"]
    reasons = {s["name"]: s["reason"] for s in result["skipped"]}
    assert "graph input" in reasons["input_weight"]
    assert "quantized" in reasons["quantized"]
    text = format_analysis(result)
    assert "input_weight" in text and "graph input" in text
    # filters apply as in optimize
    excluded = analyze_model(model, LowRankConfig(exclude=("const",)))
    assert excluded["layers"] == []
    assert "excluded" in {s["name"]: s["reason"] for s in excluded["skipped"]}["const_weight"]


def test_shared_weight_counted_once():
    w = matrix_with_spectrum(32, 32, SIGMA_FAST[:32])
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="a"),
             helper.make_node("MatMul", ["h", "w"], ["y"], name="b")]
    model = make_model(nodes, [vi("x", [1, 32])], [vi("y", [1, 32])], [init("w", w)])
    result = analyze_model(model)
    assert len(result["layers"]) == 2
    assert result["totals"]["params"] == 32 * 32


def test_committed_digits_model_matches_exact_svd():
    path = DATA / "digits_mlp.onnx"
    model = onnx.load(str(path))
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    result = analyze_model(path)
    assert result["model"] == str(path)
    for layer in result["layers"]:
        w = weights[layer["weight"]]
        for e in ENERGIES:
            assert layer["energy_rank"][e] == exact_energy_rank(w, float(e))
    assert result["totals"]["layers"] == 3


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_analyze_arguments(parser)
    return parser.parse_args(argv)


def test_cli_table_and_json(tmp_path, capsys):
    out = tmp_path / "a.json"
    assert run_analyze(parse([str(DATA / "digits_mlp.onnx"), "--json", str(out)])) == 0
    table = capsys.readouterr().out
    assert "fc2/MatMul" in table and "break-even" in table and "--ratio 0.5" in table
    doc = json.loads(out.read_text())
    assert [layer["name"] for layer in doc["layers"]] == ["fc1/Gemm", "fc2/MatMul", "fc3/Gemm"]
    assert doc["exact_limit"] == DEFAULT_EXACT_LIMIT

    assert run_analyze(parse([str(DATA / "digits_mlp.onnx"), "--json", "-"])) == 0
    assert json.loads(capsys.readouterr().out)["totals"]["layers"] == 3


def test_cli_bad_inputs_exit_codes(tmp_path, capsys):
    missing = tmp_path / "missing.onnx"
    assert run_analyze(parse([str(missing)])) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such file" in err

    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00\xffnot a model at all")
    assert run_analyze(parse([str(garbage)])) == 1
    assert capsys.readouterr().err.count("\n") == 1

    model = str(DATA / "digits_mlp.onnx")
    assert run_analyze(parse([model, "--energies", "0.9,1.5"])) == 2
    assert "(0, 1]" in capsys.readouterr().err
    assert run_analyze(parse([model, "--plot", str(tmp_path / "x.jpg")])) == 2
    assert run_analyze(parse([model, "--op-types", "Softmax"])) == 2
    assert run_analyze(parse([model, "--exact-limit", "-1"])) == 2


def test_cli_plot(tmp_path, monkeypatch, capsys):
    model = str(DATA / "digits_mlp.onnx")
    png = tmp_path / "spectra.png"
    if _has_matplotlib():
        assert run_analyze(parse([model, "--plot", str(png)])) == 0
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        capsys.readouterr()
    # without matplotlib: one clear line, exit 1
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert run_analyze(parse([model, "--plot", str(tmp_path / "other.png")])) == 1
    err = capsys.readouterr().err
    assert "matplotlib" in err and "[plot]" in err and err.count("\n") == 1


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True
