"""Conv calibration: im2col patches equal onnxruntime's conv; whitened weight-svd convs."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from builders import init, make_model, rel_err, run, vi
from onnx_lowrank import LowRankConfig, optimize
from onnx_lowrank.passes.conv import ConvGeometry, conv_patches

GEOMETRIES = {
    "1x1": dict(kernel_shape=[1, 1]),
    "3x3-pad": dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
    "stride-asym": dict(kernel_shape=[3, 2], strides=[2, 1], pads=[0, 1, 2, 0]),
    "dilated": dict(kernel_shape=[3, 3], dilations=[2, 1], pads=[2, 1, 2, 1]),
    "same-upper": dict(kernel_shape=[4, 3], strides=[2, 2], auto_pad="SAME_UPPER"),
    "same-lower": dict(kernel_shape=[4, 3], strides=[2, 1], auto_pad="SAME_LOWER"),
    "valid": dict(kernel_shape=[3, 3], strides=[2, 2], auto_pad="VALID"),
    "1d": dict(kernel_shape=[5], strides=[2], pads=[2, 1]),
    "3d": dict(kernel_shape=[2, 3, 3], pads=[0, 1, 1, 1, 1, 0]),
}


def _conv(attrs, c=5, m=7, seed=0):
    rng = np.random.default_rng(seed)
    k = attrs["kernel_shape"]
    spatial = {1: [13], 2: [9, 11], 3: [5, 6, 7]}[len(k)]
    w = rng.standard_normal([m, c, *k]).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", **attrs)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", m] + [f"o{i}" for i in range(len(k))])
    model = make_model([node], [vi("x", ["n", c, *spatial])], [y], [init("w", w)])
    return model, w, [c, *spatial]


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_patches_reproduce_the_conv(name):
    attrs = GEOMETRIES[name]
    model, w, shape = _conv(attrs)
    x = np.random.default_rng(1).standard_normal([2, *shape]).astype(np.float32)
    y = run(model, {"x": x})[0]
    node = model.graph.node[0]
    geo = ConvGeometry.of(node, attrs["kernel_shape"])
    rows = conv_patches(x, geo)
    out = rows @ w.reshape(w.shape[0], -1).T  # [N * prod(out), M]
    got = np.moveaxis(out.reshape(y.shape[0], *y.shape[2:], y.shape[1]), -1, 1)
    np.testing.assert_allclose(got, y, rtol=1e-4, atol=1e-4)


def _smooth_inputs(n, c, size, seed):
    """Images with strong spatial and channel correlation (low-pass noise), like real features."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n, 2, size, size))
    kernel = np.ones(5) / 5
    for axis in (2, 3):
        base = np.apply_along_axis(lambda v: np.convolve(v, kernel, mode="same"), axis, base)
    mix = rng.standard_normal((c, 2))
    x = np.einsum("cj,njhw->nchw", mix, base) + 0.01 * rng.standard_normal((n, c, size, size))
    return x.astype(np.float32)


def test_whitened_conv_full_rank_exact_and_better_truncated():
    rng = np.random.default_rng(2)
    c, m = 16, 24
    w = rng.standard_normal((m, c, 3, 3)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    model = make_model([node], [vi("x", ["n", c, 12, 12])], [vi("y", ["n", m, 12, 12])],
                       [init("w", w), init("b", rng.standard_normal(m).astype(np.float32))])
    data = _smooth_inputs(40, c, 12, 3)  # one distribution: 32 calibration, 8 held-out samples
    calib, held = {"x": data[:32, None]}, data[32:]
    ref = run(model, {"x": held})[0]

    full, report = optimize(model, LowRankConfig(rank=100000, force=True), calibration=calib)
    assert report.layers[0].whitened_error is not None
    assert rel_err(run(full, {"x": held})[0], ref) < 1e-4

    plain, _ = optimize(model, LowRankConfig(rank=6, multiple_of=1))
    white, report = optimize(model, LowRankConfig(rank=6, multiple_of=1), calibration=calib)
    row = report.layers[0]
    assert row.rank == 6 and row.whitened_error < row.rel_error
    e_plain = rel_err(run(plain, {"x": held})[0], ref)
    e_white = rel_err(run(white, {"x": held})[0], ref)
    assert e_white < 0.5 * e_plain, (e_white, e_plain)


def test_grouped_and_other_schemes_are_factorized_data_free_with_a_note():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", kernel_shape=[3, 3], group=2, pads=[1, 1, 1, 1])
    model = make_model([node], [vi("x", ["n", 8, 6, 6])], [vi("y", ["n", 8, 6, 6])], [init("w", w)])
    calib = {"x": rng.standard_normal((4, 1, 8, 6, 6)).astype(np.float32)}
    _, report = optimize(model, LowRankConfig(rank=2, multiple_of=1), calibration=calib)
    row = report.layers[0]
    assert row.status == "factorized" and row.whitened_error is None
    assert "no calibration whitening for this layer type" in row.note
