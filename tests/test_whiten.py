"""Whitened factorization: output-optimal on the calibration data, robust to singular Gram matrices."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import numpy_helper

from builders import DATA
from onnx_lowrank import load_model
from onnx_lowrank.core import linalg
from onnx_lowrank.core.whitening import make_whitener


def _digits_layer():
    """fc2 of the bundled digits MLP (a real trained 256x256 weight) and its real inputs."""
    model = load_model(DATA / "digits_mlp.onnx")
    w = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    def hidden(x):
        return np.maximum(x @ w["fc1.weight"].T + w["fc1.bias"], 0)
    calib = np.load(DATA / "digits_calibration.npz")["pixels"]
    held = np.load(DATA / "digits_heldout.npz")["pixels"]
    return w["fc2.weight"], hidden(calib), hidden(held)


def _output_error(x, w, a, b):
    return np.linalg.norm(x @ (w - a @ b)) / np.linalg.norm(x @ w)


def test_whitening_beats_plain_truncation_on_held_out_inputs():
    w, x_cal, x_held = _digits_layer()
    whitener = make_whitener(x_cal.T.astype(np.float64) @ x_cal, "full")
    for rank in (8, 16, 32):
        plain = linalg.factorize(w, rank, method="svd")
        white = whitener.factorize(w, rank, side="rows", method="svd")
        e_plain = _output_error(x_held, w, plain.a, plain.b)
        e_white = _output_error(x_held, w, white.a, white.b)
        assert e_white < 0.5 * e_plain, (rank, e_white, e_plain)
        # and it is the optimum on the calibration data itself (Eckart-Young of L^T W)
        target = whitener.apply(w, "rows")
        s = np.linalg.svd(target, compute_uv=False)
        assert whitener.relative_error(w, white.a, white.b, "rows") == pytest.approx(
            np.sqrt(np.sum(s[rank:] ** 2) / np.sum(s**2)), rel=1e-6)


def test_diag_whitening_sits_between():
    w, x_cal, x_held = _digits_layer()
    g = x_cal.T.astype(np.float64) @ x_cal
    errors = {}
    for mode in ("full", "diag"):
        f = make_whitener(g, mode).factorize(w, 16, side="rows", method="svd")
        errors[mode] = _output_error(x_held, w, f.a, f.b)
    plain = linalg.factorize(w, 16, method="svd")
    assert errors["full"] < errors["diag"] < _output_error(x_held, w, plain.a, plain.b)


def test_columns_side_for_weights_on_the_left():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((40, 30))
    x = rng.standard_normal((30, 500)) * np.linspace(3, 0.01, 30)[:, None]  # y = W x, inputs are columns
    whitener = make_whitener(x @ x.T, "full", eps=0.0)
    f = whitener.factorize(w, 5, side="cols", method="svd")
    s = np.linalg.svd(w @ whitener.L, compute_uv=False)
    err = np.linalg.norm((w - f.a @ f.b) @ x) / np.linalg.norm(w @ x)
    assert err == pytest.approx(np.sqrt(np.sum(s[5:] ** 2) / np.sum(s**2)), rel=1e-4)


def test_full_rank_whitened_is_exact():
    w, x_cal, _ = _digits_layer()
    f = make_whitener(x_cal.T.astype(np.float64) @ x_cal, "full").factorize(w, 256, side="rows", method="svd")
    assert np.linalg.norm(w - f.a @ f.b) / np.linalg.norm(w) < 1e-5


def test_singular_zero_and_indefinite_gram_matrices():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((10, 20))  # fewer samples than features: rank-10 Gram
    x[:, 3] = 0.0  # a feature never excited
    singular = make_whitener(x.T @ x, "full")
    assert singular.method == "cholesky" and np.all(np.isfinite(singular.L))
    zero = make_whitener(np.zeros((6, 6)), "full")
    assert np.array_equal(zero.L, np.eye(6))
    indefinite = np.diag([10.0, 10.0, -5.0, 10.0])  # not a Gram matrix: Cholesky fails, eigh fallback
    wh = make_whitener(indefinite, "full")
    assert wh.method == "eigh" and np.all(np.isfinite(wh.L))
    w = rng.standard_normal((20, 8))
    f = singular.factorize(w, 4, side="rows", method="svd")
    assert np.all(np.isfinite(f.a)) and np.all(np.isfinite(f.b))
