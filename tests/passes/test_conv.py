"""Conv pass: every scheme x every attribute variant at forced full rank reproduces onnxruntime's
output; truncation errors equal the predicted Frobenius errors; grouped, depthwise, fallbacks,
structure and MACs."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from builders import assert_clean, init, make_model, rel_err, run, vi
from onnx_lowrank import LowRankConfig, optimize
from onnx_lowrank.flops import count_flops
from onnx_lowrank.passes.conv import DEPTHWISE_REASON, match_conv
from onnx_lowrank.passes.graph import GraphContext

SCHEMES = ("weight-svd", "spatial-svd", "tucker2")


def full(scheme: str, **kw) -> LowRankConfig:
    return LowRankConfig(rank=100000, force=True, conv_scheme=scheme, **kw)


def conv_model(c=6, m=8, kernel=(3, 3), spatial=(9, 10), *, n=2, group=1, strides=None, pads=None,
               dilations=None, auto_pad=None, bias=True, dtype=np.float32, seed=0, weight=None,
               kernel_shape=True):
    """One Conv with random weights; returns (model, x, w)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((m, c // group, *kernel)).astype(dtype)
    w = weight if weight is not None else w  # drawn anyway: bias and x stay the same
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    attrs = {}
    if kernel_shape:
        attrs["kernel_shape"] = list(kernel)
    for key, value in (("strides", strides), ("pads", pads), ("dilations", dilations), ("auto_pad", auto_pad)):
        if value is not None:
            attrs[key] = list(value) if not isinstance(value, str) else value
    if group != 1:
        attrs["group"] = group
    inputs = ["x", "w"]
    inits = [init("w", w)]
    if bias:
        inits.append(init("b", rng.standard_normal(m).astype(dtype)))
        inputs.append("b")
    node = helper.make_node("Conv", inputs, ["y"], name="conv", **attrs)
    model = make_model([node], [vi("x", [n, c, *spatial], elem)], [vi("y", [None] * (2 + len(kernel)), elem)], inits)
    x = rng.standard_normal((n, c, *spatial)).astype(dtype)
    return model, x, w


# name -> conv_model keyword arguments. Every attribute, alone and combined, in 1-D, 2-D and 3-D.
VARIANTS = {
    "1d": dict(kernel=(3,), spatial=(11,), pads=(1, 1)),
    "1d-stride-dilation-asym-pads": dict(kernel=(3,), spatial=(17,), strides=(2,), dilations=(2,), pads=(2, 1)),
    "1d-same-upper": dict(kernel=(4,), spatial=(10,), strides=(3,), auto_pad="SAME_UPPER", bias=False),
    "1d-groups": dict(kernel=(5,), spatial=(12,), group=2, pads=(0, 3)),
    "2d": dict(pads=(1, 1, 1, 1)),
    "2d-no-bias": dict(pads=(1, 1, 1, 1), bias=False),
    "2d-no-kernel-shape-attr": dict(kernel_shape=False),
    "2d-rect-kernel": dict(kernel=(3, 5), pads=(1, 2, 1, 2)),
    "2d-strides": dict(spatial=(11, 13), strides=(2, 3)),
    "2d-asym-pads": dict(pads=(0, 2, 1, 0)),
    "2d-dilations": dict(spatial=(12, 13), dilations=(2, 3), pads=(2, 3, 1, 0)),
    "2d-same-upper": dict(kernel=(3, 4), strides=(2, 2), auto_pad="SAME_UPPER"),
    # (onnxruntime rejects dilations with SAME_*, in the original too: see test_spatial_svd_splits_geometry)
    "2d-same-lower": dict(kernel=(4, 3), strides=(2, 3), auto_pad="SAME_LOWER"),
    "2d-same-upper-even-kernel": dict(kernel=(2, 4), auto_pad="SAME_UPPER", bias=False),
    "2d-valid": dict(strides=(2, 1), auto_pad="VALID"),
    "2d-notset": dict(auto_pad="NOTSET", pads=(1, 0, 0, 1)),
    "2d-groups": dict(c=6, m=8, group=2, pads=(1, 1, 1, 1)),
    "2d-groups-everything": dict(c=8, m=12, group=4, spatial=(12, 11), strides=(2, 1), pads=(1, 0, 0, 2),
                                 dilations=(1, 2), bias=False),
    "2d-groups-same-lower": dict(c=8, m=4, group=2, strides=(2, 2), auto_pad="SAME_LOWER"),
    "2d-1x1": dict(kernel=(1, 1)),
    "2d-1x1-strided-grouped": dict(kernel=(1, 1), strides=(2, 2), group=2, bias=False),
    "2d-5x1": dict(kernel=(5, 1), pads=(2, 0, 2, 0)),
    "3d": dict(kernel=(3, 3, 3), spatial=(5, 6, 7), pads=(1, 1, 1, 1, 1, 1)),
    "3d-everything": dict(c=4, m=6, kernel=(2, 3, 3), spatial=(6, 7, 8), strides=(1, 2, 2), dilations=(2, 1, 1),
                          pads=(0, 1, 2, 1, 0, 0), group=2),
    "3d-same-upper": dict(kernel=(3, 2, 3), spatial=(5, 6, 7), strides=(2, 2, 1), auto_pad="SAME_UPPER", bias=False),
    "3d-valid": dict(kernel=(2, 2, 2), spatial=(5, 5, 5), auto_pad="VALID"),
}


def applied(scheme: str, kernel) -> str:
    """The scheme the pass uses for this kernel (spatial-svd and tucker2 have fallbacks)."""
    if scheme == "spatial-svd" and (len(kernel) != 2 or min(kernel) == 1):
        return "weight-svd"
    if scheme == "tucker2" and math.prod(kernel) == 1:
        return "weight-svd"
    return scheme


def _shape(model: onnx.ModelProto, name: str) -> list[int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    for v in list(inferred.graph.input) + list(inferred.graph.output) + list(inferred.graph.value_info):
        if v.name == name:
            return [d.dim_value for d in v.type.tensor_type.shape.dim]
    raise KeyError(name)


def _candidate(model, config):
    ctx = GraphContext(model)
    node = model.graph.node[-1]
    return match_conv(node, "conv", ctx, config)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_scheme_and_variant_full_rank(scheme, variant):
    kw = VARIANTS[variant]
    model, x, w = conv_model(**kw)
    out, report = optimize(model, full(scheme))
    row = report.layers[0]
    assert row.status == "factorized", row.reason
    used = applied(scheme, w.shape[2:])
    assert row.scheme == (used if used == scheme else f"weight-svd (fallback from {scheme})")
    assert rel_err(run(out, {"x": x})[0], run(model, {"x": x})[0]) < 1e-4
    assert row.rel_error < 1e-5
    assert_clean(out)

    nodes = out.graph.node
    assert [n.op_type for n in nodes] == ["Conv"] * (3 if used == "tucker2" else 2)
    assert nodes[0].input[0] == "x" and nodes[-1].output[0] == "y"
    assert all(b.input[0] == a.output[0] for a, b in zip(nodes, nodes[1:]))
    suffixes = ["a", "b", "c"][: len(nodes)]
    assert [n.name for n in nodes] == [f"conv/lowrank_{s}" for s in suffixes]
    has_bias = kw.get("bias", True)
    assert [len(n.input) for n in nodes] == [2] * (len(nodes) - 1) + [3 if has_bias else 2]  # bias last
    group = kw.get("group", 1)
    groups = [next((a.i for a in n.attribute if a.name == "group"), 1) for n in nodes]
    assert groups == [group] * len(nodes)
    kernels = [list(numpy_helper.to_array(t).shape[2:]) for n in nodes for t in out.graph.initializer
               if t.name == n.input[1]]
    k = list(w.shape[2:])
    ones = [1] * len(k)
    expected = {"weight-svd": lambda: [k, ones], "spatial-svd": lambda: [[k[0], 1], [1, k[1]]],
                "tucker2": lambda: [ones, k, ones]}[used]()
    assert kernels == expected

    # MACs: the candidate's count equals flops.py's count of the original and rewritten models.
    cand = _candidate(model, full(scheme))
    y_shape = _shape(model, "y")
    assert cand.macs(row.rank, list(x.shape), y_shape) == (count_flops(model).macs, count_flops(out).macs)


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def test_spatial_svd_splits_geometry():
    # Vertical stride/dilation/pads to the kh x 1 node, horizontal ones to the 1 x kw node.
    model, _, _ = conv_model(kernel=(3, 5), spatial=(12, 13), strides=(2, 3), dilations=(2, 1), pads=(0, 2, 1, 0))
    out, _ = optimize(model, full("spatial-svd"))
    first, second = out.graph.node
    assert _attrs(first) == {"kernel_shape": [3, 1], "strides": [2, 1], "dilations": [2, 1], "pads": [0, 0, 1, 0]}
    assert _attrs(second) == {"kernel_shape": [1, 5], "strides": [1, 3], "pads": [0, 2, 0, 0]}
    # auto_pad goes to both nodes (SAME pads per axis, and an axis with kernel 1 and stride 1 pads
    # nothing). onnxruntime rejects dilations with SAME_* (the original conv too), so this case is
    # checked by structure and strict shape inference only.
    model, _, _ = conv_model(kernel=(3, 3), strides=(2, 1), dilations=(1, 2), auto_pad="SAME_LOWER", group=2)
    out, _ = optimize(model, full("spatial-svd"))
    first, second = out.graph.node
    assert _attrs(first) == {"kernel_shape": [3, 1], "strides": [2, 1], "auto_pad": b"SAME_LOWER", "group": 2}
    assert _attrs(second) == {"kernel_shape": [1, 3], "dilations": [1, 2], "auto_pad": b"SAME_LOWER", "group": 2}
    assert_clean(out)
    assert _shape(out, "y") == _shape(model, "y") == [2, 8, 5, 10]


# ---------------------------------------------------------------------------------------------
# Truncation: the errors are the predicted Frobenius errors of the reshaped weight
# ---------------------------------------------------------------------------------------------


def _tail(matrix: np.ndarray, rank: int) -> float:
    s = np.linalg.svd(matrix.astype(np.float64), compute_uv=False)
    return float(np.sum(s[rank:] ** 2))


def _truncate(matrix: np.ndarray, rank: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(matrix.astype(np.float64), full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vt[:rank]


@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("scheme", ["weight-svd", "spatial-svd"])
def test_truncated_two_node_schemes_give_predicted_error(scheme, group):
    rank = 3
    model, x, w = conv_model(c=8, m=10, kernel=(3, 3), group=group, strides=(2, 1), pads=(1, 0, 2, 1), seed=11)
    out, report = optimize(model, LowRankConfig(rank=rank, force=True, method="svd", conv_scheme=scheme,
                                                multiple_of=1))
    row = report.layers[0]
    assert (row.status, row.rank, row.scheme) == ("factorized", rank, scheme)
    mg = 10 // group
    approx = np.empty(w.shape, np.float64)
    tail = 0.0
    for j in range(group):
        wj = w[j * mg:(j + 1) * mg]
        if scheme == "weight-svd":
            mat = wj.reshape(mg, -1).T
            approx[j * mg:(j + 1) * mg] = _truncate(mat, rank).T.reshape(wj.shape)
        else:
            cg, kh, kw = wj.shape[1:]
            mat = wj.transpose(1, 2, 0, 3).reshape(cg * kh, mg * kw)
            approx[j * mg:(j + 1) * mg] = _truncate(mat, rank).reshape(cg, kh, mg, kw).transpose(2, 0, 1, 3)
        tail += _tail(mat, rank)
    predicted = math.sqrt(tail / np.sum(w.astype(np.float64) ** 2))
    assert 0.1 < predicted < 0.9
    assert row.rel_error == pytest.approx(predicted, rel=1e-4)
    assert row.optimal_error == pytest.approx(predicted, rel=1e-4)
    assert row.params_after == group * rank * (8 // group * 9 + mg) if scheme == "weight-svd" else True
    # The rewritten graph computes the conv of the truncated weight.
    reference, _, _ = conv_model(c=8, m=10, kernel=(3, 3), group=group, strides=(2, 1), pads=(1, 0, 2, 1),
                                 seed=11, weight=approx.astype(np.float32))
    assert rel_err(run(out, {"x": x})[0], run(reference, {"x": x})[0]) < 1e-4


def _hosvd(w: np.ndarray, r_in: int, r_out: int) -> tuple[np.ndarray, float, float]:
    """Reference HOSVD of one group's weight: the approximation and the two modes' tails."""
    m, c = w.shape[:2]
    w64 = w.astype(np.float64).reshape(m, c, -1)
    mode_out = w64.reshape(m, -1)
    mode_in = w64.transpose(1, 0, 2).reshape(c, -1)
    uo = np.linalg.svd(mode_out, full_matrices=False)[0][:, :r_out]
    ui = np.linalg.svd(mode_in, full_matrices=False)[0][:, :r_in]
    core = np.einsum("mo,mck,ci->oik", uo, w64, ui)
    approx = np.einsum("mo,oik,ci->mck", uo, core, ui).reshape(w.shape)
    return approx, _tail(mode_in, r_in), _tail(mode_out, r_out)


@pytest.mark.parametrize("group", [1, 2])
def test_truncated_tucker2_gives_hosvd_error(group):
    c, m, rank = 8, 12, 3
    model, x, w = conv_model(c=c, m=m, kernel=(3, 3), group=group, dilations=(2, 1), pads=(2, 1, 2, 1), seed=12)
    out, report = optimize(model, LowRankConfig(rank=rank, force=True, method="svd", conv_scheme="tucker2",
                                                multiple_of=1))
    row = report.layers[0]
    assert (row.status, row.rank, row.scheme) == ("factorized", rank, "tucker2")
    mg, cg = m // group, c // group
    approx = np.empty(w.shape)
    tails_in = tails_out = 0.0
    for j in range(group):
        approx[j * mg:(j + 1) * mg], t_in, t_out = _hosvd(w[j * mg:(j + 1) * mg], rank, rank)
        tails_in, tails_out = tails_in + t_in, tails_out + t_out
    total = np.sum(w.astype(np.float64) ** 2)
    predicted = rel_err(approx, w)
    assert row.rel_error == pytest.approx(predicted, rel=1e-4)
    # optimal_error is the lower bound every Tucker-2 approximation obeys; HOSVD is within sqrt(2).
    assert row.optimal_error == pytest.approx(math.sqrt(max(tails_in, tails_out) / total), rel=1e-4)
    assert row.optimal_error <= row.rel_error <= math.sqrt((tails_in + tails_out) / total) * (1 + 1e-6)
    assert row.params_after == group * (cg * rank + rank * rank * 9 + rank * mg)
    shapes = [list(t.dims) for t in out.graph.initializer if t.name.startswith("w/")]
    assert shapes == [[group * rank, cg, 1, 1], [group * rank, rank, 3, 3], [m, rank, 1, 1]]
    reference, _, _ = conv_model(c=c, m=m, kernel=(3, 3), group=group, dilations=(2, 1), pads=(2, 1, 2, 1),
                                 seed=12, weight=approx.astype(np.float32))
    assert rel_err(run(out, {"x": x})[0], run(reference, {"x": x})[0]) < 1e-4
    # The channel factors are orthonormal (the core carries the scale).
    a = numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == "w/lowrank_a"))
    a0 = a[:rank].reshape(rank, cg)
    assert np.allclose(a0 @ a0.T, np.eye(rank), atol=1e-5)


def test_rsi_tucker2_is_close_to_hosvd():
    model, x, w = conv_model(c=32, m=48, kernel=(3, 3), seed=13)
    _, report = optimize(model, LowRankConfig(rank=16, conv_scheme="tucker2"))
    approx, _, _ = _hosvd(w, 16, 16)
    assert report.layers[0].rel_error == pytest.approx(rel_err(approx, w), rel=0.02)


# ---------------------------------------------------------------------------------------------
# Rank policies through the conv candidates
# ---------------------------------------------------------------------------------------------


def test_conv_ranks_default_to_multiples_of_16_below_break_even():
    model, _, _ = conv_model(c=64, m=64, kernel=(3, 3), spatial=(6, 6), seed=14)
    # weight-svd: 576 x 64, break-even 576*64/640 = 57.6 -> 58; ratio 0.5 -> 28, rounded to 32.
    row = optimize(model, LowRankConfig(ratio=0.5))[1].layers[0]
    assert (row.rank, row.break_even_rank, row.params_after) == (32, 58, 32 * 640)
    assert "rounded 28 up to a multiple of 16" in row.note
    # --multiple-of 1 keeps the exact ratio rank.
    assert optimize(model, LowRankConfig(ratio=0.5, multiple_of=1))[1].layers[0].rank == 28


def test_energy_policy_on_grouped_conv_uses_all_groups_spectra():
    model, _, w = conv_model(c=8, m=16, kernel=(3, 3), group=2, seed=15)
    cand = _candidate(model, LowRankConfig())
    blocks = [w[j * 8:(j + 1) * 8].reshape(8, -1) for j in range(2)]
    energy = sum(np.linalg.svd(b.astype(np.float64), compute_uv=False) ** 2 for b in blocks)
    kept = np.cumsum(energy) / np.sum(energy)
    expected = int(np.searchsorted(kept, 0.8)) + 1
    row = optimize(model, LowRankConfig(energy=0.8, force=True, multiple_of=1))[1].layers[0]
    assert row.rank == expected
    sigma, total = cand.spectrum(8)
    assert np.allclose(sigma**2, energy, rtol=1e-6) and total == pytest.approx(np.sum(energy), rel=1e-6)


def test_tucker2_energy_means_each_mode_keeps_the_fraction():
    model, _, w = conv_model(c=10, m=14, kernel=(3, 3), seed=16)
    w64 = w.astype(np.float64).reshape(14, 10, 9)
    ranks = []
    for mode in (w64.transpose(1, 0, 2).reshape(10, -1), w64.reshape(14, -1)):
        s2 = np.linalg.svd(mode, compute_uv=False) ** 2
        ranks.append(int(np.searchsorted(np.cumsum(s2) / s2.sum(), 0.9)) + 1)
    row = optimize(model, LowRankConfig(energy=0.9, force=True, multiple_of=1, conv_scheme="tucker2"))[1].layers[0]
    assert row.rank == max(ranks)


def test_tucker2_ranks_clamp_per_mode_and_break_even_uses_three_nodes():
    model, _, _ = conv_model(c=3, m=64, kernel=(3, 3), seed=17)  # an RGB stem
    cand = _candidate(model, LowRankConfig(conv_scheme="tucker2"))
    assert cand.max_rank == 27 and cand.ranks(16) == (3, 16)  # r_out <= C/g * k*k = 27
    assert cand.factored_params(16) == 3 * 3 + 3 * 16 * 9 + 16 * 64
    row = optimize(model, LowRankConfig(conv_scheme="tucker2"))[1].layers[0]
    assert row.status == "factorized" and row.params_after == cand.factored_params(row.rank)
    assert row.params_after < 64 * 27


# ---------------------------------------------------------------------------------------------
# Depthwise, fallbacks, weights in odd places
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["weight-svd", "tucker2"])
def test_depthwise_conv_is_skipped_with_reason(scheme):
    model, _, _ = conv_model(c=8, m=8, group=8, pads=(1, 1, 1, 1))
    for config in (LowRankConfig(conv_scheme=scheme), full(scheme)):
        row = optimize(model, config)[1].layers[0]
        assert (row.status, row.reason) == ("skipped", DEPTHWISE_REASON)


def test_spatial_svd_separates_depthwise_kernels():
    # A kh x kw depthwise kernel splits into kh x 1 and 1 x kw depthwise kernels: rank 1 saves.
    model, x, _ = conv_model(c=8, m=8, group=8, kernel=(3, 5), pads=(1, 2, 1, 2), strides=(2, 1))
    out, report = optimize(model, full("spatial-svd"))
    row = report.layers[0]
    assert (row.status, row.rank) == ("factorized", 3)
    assert rel_err(run(out, {"x": x})[0], run(model, {"x": x})[0]) < 1e-4
    row = optimize(model, LowRankConfig(conv_scheme="spatial-svd"))[1].layers[0]
    assert (row.status, row.rank, row.params_after, row.break_even_rank) == ("factorized", 1, 8 * 8, 2)


def test_depthwise_with_channel_multiplier_can_gain_under_weight_svd():
    model, x, _ = conv_model(c=4, m=16, group=4, kernel=(3, 3), pads=(1, 1, 1, 1))  # 4 outputs per input
    row = optimize(model, LowRankConfig(rank=1))[1].layers[0]
    assert (row.status, row.params_after) == ("factorized", 4 * (9 + 4))
    out, report = optimize(model, full("weight-svd"))
    assert rel_err(run(out, {"x": x})[0], run(model, {"x": x})[0]) < 1e-4


@pytest.mark.parametrize("scheme,kernel,note", [
    ("spatial-svd", (3,), "spatial-svd needs a 2-D kernel with kh > 1 and kw > 1, got a 1-D kernel: used weight-svd"),
    ("spatial-svd", (3, 3, 3), "spatial-svd needs a 2-D kernel with kh > 1 and kw > 1, got a 3-D kernel: used weight-svd"),
    ("spatial-svd", (1, 1), "spatial-svd needs a 2-D kernel with kh > 1 and kw > 1, got a 1x1 kernel: used weight-svd"),
    ("spatial-svd", (1, 7), "spatial-svd needs a 2-D kernel with kh > 1 and kw > 1, got a 1x7 kernel: used weight-svd"),
    ("tucker2", (1, 1), "tucker2 of a 1x1 kernel is a plain channel mix (three nodes where two suffice): used weight-svd"),
    ("tucker2", (1,), "tucker2 of a 1 kernel is a plain channel mix (three nodes where two suffice): used weight-svd"),
])
def test_fallback_to_weight_svd_is_noted(scheme, kernel, note):
    spatial = {1: (9,), 2: (9, 10), 3: (4, 5, 6)}[len(kernel)]
    model, x, _ = conv_model(kernel=kernel, spatial=spatial)
    cand = _candidate(model, LowRankConfig(conv_scheme=scheme))
    assert cand.note == note and cand.scheme == f"weight-svd (fallback from {scheme})"
    out, report = optimize(model, full(scheme))
    assert report.layers[0].scheme == f"weight-svd (fallback from {scheme})"
    assert [n.op_type for n in out.graph.node] == ["Conv", "Conv"]
    assert rel_err(run(out, {"x": x})[0], run(model, {"x": x})[0]) < 1e-4
    assert _candidate(model, LowRankConfig()).note is None  # weight-svd asked, weight-svd done


@pytest.mark.parametrize("scheme", SCHEMES)
def test_weight_from_constant_node_behind_cast(scheme):
    rng = np.random.default_rng(18)
    w = rng.standard_normal((8, 6, 3, 3)).astype(np.float16)
    nodes = [
        helper.make_node("Constant", [], ["w16"], name="const", value=numpy_helper.from_array(w, "w16")),
        helper.make_node("Cast", ["w16"], ["w"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1], strides=[2, 2]),
    ]
    model = make_model(nodes, [vi("x", [1, 6, 9, 9])], [vi("y", [1, 8, 5, 5])])
    x = rng.standard_normal((1, 6, 9, 9)).astype(np.float32)
    out, report = optimize(model, full(scheme))
    assert report.layers[0].status == "factorized"
    assert {n.op_type for n in out.graph.node} == {"Conv"}  # Constant and Cast are gone
    assert rel_err(run(out, {"x": x})[0], run(model, {"x": x})[0]) < 1e-4
    assert_clean(out)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_float16_conv_keeps_float16_factors(scheme):
    model, x, _ = conv_model(c=8, m=8, dtype=np.float16, pads=(1, 1, 1, 1), seed=19)
    out, report = optimize(model, full(scheme))
    assert {t.data_type for t in out.graph.initializer} == {TensorProto.FLOAT16}
    assert rel_err(run(out, {"x": x})[0], run(model, {"x": x})[0]) < 5e-3
    assert_clean(out)


def test_skip_reasons():
    rng = np.random.default_rng(20)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w_in"], ["y1"], name="graph_input"),
        helper.make_node("Conv", ["x", "w_int"], ["y2"], name="integer"),
        helper.make_node("Conv", ["c", "w"], ["y3"], name="two_consts"),
        helper.make_node("Conv", ["x", "w"], ["y4"], name="bad_group", group=3),
        helper.make_node("Conv", ["x", "w"], ["y5"], name="bad_strides", strides=[2]),
    ]
    model = onnx.helper.make_model(
        helper.make_graph(nodes, "g", [vi("x", [1, 3, 5, 5]), vi("w_in", [4, 3, 3, 3])],
                          [vi(f"y{i}", [None] * 4) for i in range(1, 6)],
                          [init("w", w), init("w_int", w.astype(np.int32)),
                           init("c", np.ones((1, 3, 5, 5), np.float32))]),
        opset_imports=[helper.make_opsetid("", 17)])
    reasons = {r.node: r.reason for r in optimize(model, full("weight-svd"), check=False)[1].layers}
    assert reasons["graph_input"] == "weight 'w_in' is a graph input (not a constant)"
    assert reasons["integer"] == "weight 'w_int' has dtype int32, not a float type"
    assert reasons["two_consts"] == "both inputs are constants (constant-foldable): left alone"
    assert reasons["bad_group"] == "4 output channels are not divisible by group=3"
    assert reasons["bad_strides"] == "strides [2] do not fit a 2-D kernel"


def test_shared_conv_weight_is_factorized_once_and_second_run_is_a_no_op():
    rng = np.random.default_rng(21)
    w = rng.standard_normal((8, 6, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x1", "w"], ["y1"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["x2", "w"], ["y2"], name="c2", strides=[2, 2])]
    model = make_model(nodes, [vi("x1", [1, 6, 7, 7]), vi("x2", [1, 6, 9, 9])],
                       [vi("y1", [1, 8, 7, 7]), vi("y2", [1, 8, 4, 4])], [init("w", w)])
    feeds = {"x1": rng.standard_normal((1, 6, 7, 7)).astype(np.float32),
             "x2": rng.standard_normal((1, 6, 9, 9)).astype(np.float32)}
    for scheme in SCHEMES:
        out, report = optimize(model, full(scheme))
        assert [r.status for r in report.layers] == ["factorized"] * 2
        assert len(out.graph.initializer) == (3 if scheme == "tucker2" else 2)
        for got, want in zip(run(out, feeds), run(model, feeds)):
            assert rel_err(got, want) < 1e-4
        assert_clean(out)
        again, report2 = optimize(out, full(scheme))
        assert {r.reason for r in report2.layers} == {"already a low-rank factor (made by onnx-lowrank)"}
        assert again.SerializeToString() == out.SerializeToString()


# ---------------------------------------------------------------------------------------------
# MACs, known answers
# ---------------------------------------------------------------------------------------------


def test_macs_known_answers():
    # C=16, M=32, 3x3, stride 2, pads 1, group 2: x [1, 16, 20, 30] -> y [1, 32, 10, 15].
    model, _, _ = conv_model(c=16, m=32, kernel=(3, 3), group=2, spatial=(20, 30), n=1,
                             strides=(2, 2), pads=(1, 1, 1, 1))
    x_shape, y_shape = [1, 16, 20, 30], [1, 32, 10, 15]
    before = 150 * 32 * 8 * 9  # output pixels * M * C/g * k*k
    ws = _candidate(model, LowRankConfig())
    assert ws.macs(4, x_shape, y_shape) == (before, 150 * (2 * 4 * 8 * 9) + 150 * 32 * 4)
    sp = _candidate(model, LowRankConfig(conv_scheme="spatial-svd"))
    # kh x 1 at 10 x 30 (vertical stride only), then 1 x kw at 10 x 15.
    assert sp.macs(4, x_shape, y_shape) == (before, 10 * 30 * 2 * 4 * 8 * 3 + 150 * 32 * 4 * 3)
    tk = _candidate(model, LowRankConfig(conv_scheme="tucker2"))
    # 1x1 at the input resolution 20 x 30, core at 10 x 15, 1x1 at 10 x 15.
    assert tk.macs(4, x_shape, y_shape) == (before, 600 * 2 * 4 * 8 + 150 * 2 * 4 * 4 * 9 + 150 * 32 * 4)
    assert tk.macs(4, [1, 16, "h", 30], y_shape) is None  # unknown dimension


def test_input_model_is_not_modified():
    model, _, _ = conv_model()
    before = model.SerializeToString()
    optimize(model, LowRankConfig(rank=4, conv_scheme="tucker2"))
    assert model.SerializeToString() == before


@pytest.mark.parametrize("jobs", [1, 2])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_weights_read_from_disk_give_the_same_bytes_and_are_not_held(tmp_path, scheme, jobs):
    # A single-file model given by path is optimized with its weights read one at a time from
    # the file: conv candidates hold no weight between planning and factorization, and the
    # result equals the one from the model held in memory, byte for byte.
    from onnx_lowrank import load_model, save_model
    from onnx_lowrank.passes import find_candidates

    model, x, _ = conv_model(c=8, m=12, group=2, spatial=(12, 11), pads=(1, 1, 1, 1), seed=5)
    path = tmp_path / "conv.onnx"
    onnx.save(model, path)
    config = LowRankConfig(rank=3, force=True, conv_scheme=scheme, jobs=jobs)
    lazy, _ = optimize(path, config)
    eager, _ = optimize(onnx.load(path), config, lazy=False)
    save_model(lazy, tmp_path / "lazy.onnx", input_path=path)
    save_model(eager, tmp_path / "eager.onnx")
    assert (tmp_path / "lazy.onnx").read_bytes() == (tmp_path / "eager.onnx").read_bytes()
    assert rel_err(run(onnx.load(tmp_path / "lazy.onnx"), {"x": x})[0], run(model, {"x": x})[0]) < 1.0

    on_disk = load_model(path, lazy=True)
    (_, cand), = find_candidates(on_disk, config, ctx=GraphContext(on_disk, base_dir=str(tmp_path)))
    cand.spectrum(cand.max_rank)
    assert cand._matrix is None  # read for the spectrum, then dropped
    with cand.held() as matrix:
        with cand.held() as again:  # holds nest: the inner release keeps the matrix
            assert again is matrix
        assert cand._matrix is matrix
    assert cand._matrix is None
