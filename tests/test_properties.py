"""Property tests (issue 8, item 5): random small MatMul/Gemm/Conv graphs with random attributes.

* forced full rank (``LowRankConfig(rank=100000, force=True)``, every conv scheme) reproduces
  onnxruntime's outputs to 1e-4 relative L2;
* any rank policy gives a checker-clean model that runs in onnxruntime with the original
  output shapes.

Hypothesis runs derandomized (the same examples on every run, no example database), so CI is
deterministic; each property is capped at a few dozen examples.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from builders import assert_clean, init, rel_err, run, vi
from onnx_lowrank import LowRankConfig, optimize
from onnx_lowrank.config import CONV_SCHEMES, METHODS
from onnx_lowrank.passes.conv import DEPTHWISE_REASON

PROFILE = dict(derandomize=True, database=None, deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
EXACT = settings(max_examples=30, **PROFILE)
CONV = settings(max_examples=40, **PROFILE)
ANY = settings(max_examples=40, **PROFILE)

#: Rows that may legitimately stay dense even with --force.
ALLOWED_SKIPS = {DEPTHWISE_REASON}


class Graph:
    """A graph under construction: nodes, initializers, the running tensor and its shape."""

    def __init__(self, x_shape: list[int], seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.x_shape = list(x_shape)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.current = "x"
        self.shape = list(x_shape)
        self.ops: list[str] = []
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.symbolic_batch = False

    def weight(self, shape, data=None) -> str:
        """A constant: an initializer, or (drawn) a Constant node, a transposed initializer behind a
        Transpose node, or an earlier weight of the same shape (shared by two nodes)."""
        shape = tuple(shape)
        source = "init" if data is None else data.draw(
            st.sampled_from(["init", "init", "constant", "transpose", "shared"]), label="weight source")
        if source == "shared":
            same = [name for name, s in self.shapes.items() if s == shape]
            if same:
                return same[0]
        name = f"w{len(self.shapes)}"
        value = self.rng.standard_normal(shape).astype(np.float32)
        if source == "constant":
            self.nodes.append(helper.make_node("Constant", [], [name], name=f"const_{name}",
                                               value=numpy_helper.from_array(value, name)))
        elif source == "transpose" and len(shape) == 2:
            self.inits.append(init(f"{name}_t", np.ascontiguousarray(value.T)))
            self.nodes.append(helper.make_node("Transpose", [f"{name}_t"], [name], name=f"tr_{name}", perm=[1, 0]))
        else:
            self.inits.append(init(name, value))
        self.shapes[name] = shape
        return name

    def add(self, op: str, inputs: list[str], shape: list[int], **attrs) -> None:
        out = f"t{len(self.nodes)}"
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"{op.lower()}{len(self.nodes)}", **attrs))
        self.current, self.shape = out, list(shape)
        self.ops.append(op)

    def model(self) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
        declared = (["batch"] + self.x_shape[1:]) if self.symbolic_batch else self.x_shape
        graph = helper.make_graph(self.nodes, "prop", [vi("x", declared)],
                                  [vi(self.current, [None] * len(self.shape))], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tests")
        model.ir_version = 8
        onnx.checker.check_model(model, full_check=True)
        x = self.rng.standard_normal(self.x_shape).astype(np.float32)
        return model, {"x": x}


#: Small sides (1 included: rank-1 and vector-like weights) and sides big enough to be worth factorizing.
dims = st.one_of(st.integers(1, 4), st.integers(5, 20))


# ------------------------------------------------------------------------------------------
# Layer builders (drawn interactively: later choices depend on the running shape)
# ------------------------------------------------------------------------------------------


def add_matmul(data, g: Graph) -> None:
    """MatMul with the weight on the right (``X @ W``) or the left (``W @ X``); X of any rank."""
    s = g.shape
    if data.draw(st.booleans(), label="weight on the right"):
        m, n = s[-1], data.draw(dims, label="n")
        w = g.weight((m, n), data)
        g.add("MatMul", [g.current, w], s[:-1] + [n])
    else:
        axis = -2 if len(s) >= 2 else 0
        m, p = s[axis], data.draw(dims, label="p")
        w = g.weight((p, m), data)
        out = list(s)
        out[axis] = p
        g.add("MatMul", [w, g.current], out)


C_KINDS = ("none", "scalar", "one", "row", "row2d", "col", "matrix")


def add_gemm(data, g: Graph) -> None:
    """Gemm on a 2-D running tensor, constant A or B, every transA/transB/alpha/beta/C form."""
    r, c = g.shape
    side = data.draw(st.sampled_from(["right", "left"]), label="weight operand")
    trans_a, trans_b = data.draw(st.integers(0, 1), label="transA"), data.draw(st.integers(0, 1), label="transB")
    alpha = data.draw(st.sampled_from([1.0, 0.5, -2.0, 0.0]), label="alpha")
    beta = data.draw(st.sampled_from([1.0, 0.25, -1.0]), label="beta")
    if side == "right":  # A = running tensor
        mm, kk = (c, r) if trans_a else (r, c)
        nn = data.draw(dims, label="N")
        w = g.weight((nn, kk) if trans_b else (kk, nn), data)
        inputs = [g.current, w]
    else:  # B = running tensor
        kk, nn = (c, r) if trans_b else (r, c)
        mm = data.draw(dims, label="M")
        w = g.weight((kk, mm) if trans_a else (mm, kk), data)
        inputs = [w, g.current]
    kind = data.draw(st.sampled_from(C_KINDS), label="C")
    c_shape = {"scalar": [], "one": [1], "row": [nn], "row2d": [1, nn], "col": [mm, 1], "matrix": [mm, nn]}.get(kind)
    if c_shape is not None:
        inputs.append(g.weight(c_shape))
    attrs = {"transA": trans_a, "transB": trans_b, "alpha": alpha}
    if c_shape is not None:
        attrs["beta"] = beta
    g.add("Gemm", inputs, [mm, nn], **attrs)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def add_conv(data, g: Graph) -> None:
    """Conv (1-D or 2-D, fixed by the input) with random kernel/stride/pads/dilation/group/auto_pad."""
    n, c_in, *spatial = g.shape
    d = len(spatial)
    group = data.draw(st.sampled_from(_divisors(c_in)), label="group")
    c_out = group * data.draw(st.integers(1, 6), label="outputs per group")
    auto_pad = data.draw(st.sampled_from(["NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER", "NOTSET"]), label="auto_pad")
    kernel, strides, dilations, pads_begin, pads_end, out = [], [], [], [], [], []
    for size in spatial:
        # onnxruntime rejects dilations with SAME_* padding (the original conv too).
        dil = 1 if auto_pad.startswith("SAME") else data.draw(st.integers(1, 2), label="dilation")
        pb = data.draw(st.integers(0, 2), label="pad begin") if auto_pad == "NOTSET" else 0
        pe = data.draw(st.integers(0, 2), label="pad end") if auto_pad == "NOTSET" else 0
        k_max = max(1, min(3, (size + pb + pe - 1) // dil + 1))
        k = data.draw(st.integers(1, k_max), label="kernel")
        s = data.draw(st.integers(1, 2), label="stride")
        span = (k - 1) * dil + 1
        if auto_pad.startswith("SAME"):
            o = -(-size // s)
        else:
            o = (size + pb + pe - span) // s + 1
        assert o >= 1
        kernel.append(k), strides.append(s), dilations.append(dil), pads_begin.append(pb), pads_end.append(pe)
        out.append(o)
    attrs: dict = {}
    if data.draw(st.booleans(), label="kernel_shape attribute"):
        attrs["kernel_shape"] = kernel
    if auto_pad != "NOTSET":
        attrs["auto_pad"] = auto_pad
    elif any(pads_begin + pads_end):
        attrs["pads"] = pads_begin + pads_end
    if any(s != 1 for s in strides):
        attrs["strides"] = strides
    if any(x != 1 for x in dilations):
        attrs["dilations"] = dilations
    if group != 1:
        attrs["group"] = group
    inputs = [g.current, g.weight((c_out, c_in // group, *kernel), data)]
    if data.draw(st.booleans(), label="bias"):
        inputs.append(g.weight((c_out,)))
    g.add("Conv", inputs, [n, c_out, *out], **attrs)


def maybe_relu(data, g: Graph) -> None:
    if data.draw(st.booleans(), label="relu"):
        g.add("Relu", [g.current], g.shape)


# ------------------------------------------------------------------------------------------
# Graph strategies
# ------------------------------------------------------------------------------------------


def matmul_graph(data) -> Graph:
    rank = data.draw(st.integers(1, 4), label="X rank")
    shape = [data.draw(st.integers(1, 3), label="batch") for _ in range(rank - 2)] + \
        [data.draw(dims, label="dim") for _ in range(min(rank, 2))]
    g = Graph(shape, data.draw(st.integers(0, 2**16), label="seed"))
    for i in range(data.draw(st.integers(1, 3), label="layers")):
        if i:
            maybe_relu(data, g)
        add_matmul(data, g)
    g.symbolic_batch = data.draw(st.booleans(), label="symbolic first dimension")
    return g


def gemm_graph(data) -> Graph:
    shape = [data.draw(dims, label="rows"), data.draw(dims, label="cols")]
    g = Graph(shape, data.draw(st.integers(0, 2**16), label="seed"))
    for i in range(data.draw(st.integers(1, 3), label="layers")):
        if i:
            maybe_relu(data, g)
        if data.draw(st.sampled_from(["Gemm", "Gemm", "MatMul"]), label="op") == "Gemm":
            add_gemm(data, g)
        else:
            add_matmul(data, g)
    g.symbolic_batch = data.draw(st.booleans(), label="symbolic first dimension")
    return g


def conv_graph(data) -> Graph:
    ndim = data.draw(st.sampled_from([2, 1, 2]), label="spatial dims")
    shape = [data.draw(st.integers(1, 2), label="N"), data.draw(st.integers(1, 8), label="C")] + \
        [data.draw(st.integers(3, 8), label="size") for _ in range(ndim)]
    g = Graph(shape, data.draw(st.integers(0, 2**16), label="seed"))
    for i in range(data.draw(st.integers(1, 2), label="convs")):
        if i:
            maybe_relu(data, g)
        add_conv(data, g)
    if data.draw(st.booleans(), label="dense head"):
        flat = g.shape[0], math.prod(g.shape[1:])
        g.add("Flatten", [g.current], list(flat), axis=1)
        if data.draw(st.booleans(), label="gemm head"):
            add_gemm(data, g)
        else:
            add_matmul(data, g)
    g.symbolic_batch = data.draw(st.booleans(), label="symbolic first dimension")
    return g


GRAPHS = {"matmul": matmul_graph, "gemm": gemm_graph, "conv": conv_graph}


def _layers_of(model: onnx.ModelProto) -> int:
    return sum(n.op_type in ("MatMul", "Gemm", "Conv") for n in model.graph.node)


# ------------------------------------------------------------------------------------------
# Properties
# ------------------------------------------------------------------------------------------


def _check_full_rank(model: onnx.ModelProto, feeds: dict[str, np.ndarray], scheme: str) -> None:
    out, report = optimize(model, LowRankConfig(rank=100000, force=True, conv_scheme=scheme))
    assert len(report.layers) == _layers_of(model)
    for row in report.layers:
        assert row.status == "factorized" or row.reason in ALLOWED_SKIPS, (scheme, row)
        if row.status == "factorized":
            assert row.rel_error < 1e-4, (scheme, row)
    assert_clean(out)
    got, want = run(out, feeds), run(model, feeds)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        assert rel_err(a, b) < 1e-4, (scheme, rel_err(a, b), [(r.node, r.rank, r.scheme) for r in report.layers])


@EXACT
@given(st.data())
def test_full_rank_matmul_graphs_reproduce_outputs(data):
    model, feeds = matmul_graph(data).model()
    _check_full_rank(model, feeds, "weight-svd")


@EXACT
@given(st.data())
def test_full_rank_gemm_graphs_reproduce_outputs(data):
    model, feeds = gemm_graph(data).model()
    _check_full_rank(model, feeds, "weight-svd")


@CONV
@given(st.data())
def test_full_rank_conv_graphs_reproduce_outputs_for_every_scheme(data):
    model, feeds = conv_graph(data).model()
    for scheme in CONV_SCHEMES:
        _check_full_rank(model, feeds, scheme)


def configs(data) -> LowRankConfig:
    policy = data.draw(st.sampled_from(["rank", "ratio", "energy", "target_params", "target_flops"]), label="policy")
    value = {
        "rank": st.integers(1, 12),
        "ratio": st.floats(0.02, 1.0),
        "energy": st.floats(0.05, 1.0),
        "target_params": st.floats(0.02, 1.0),
        "target_flops": st.floats(0.02, 1.0),
    }[policy]
    kwargs = {policy: data.draw(value, label=policy)}
    if policy in ("rank", "ratio", "energy"):
        kwargs["force"] = data.draw(st.booleans(), label="force")
        kwargs["multiple_of"] = data.draw(st.sampled_from([None, 1, 2, 4]), label="multiple_of")
    return LowRankConfig(method=data.draw(st.sampled_from(METHODS), label="method"),
                         conv_scheme=data.draw(st.sampled_from(CONV_SCHEMES), label="conv_scheme"),
                         seed=data.draw(st.integers(0, 3), label="config seed"), **kwargs)


@ANY
@given(st.data())
def test_any_rank_gives_a_clean_model_with_the_original_output_shapes(data):
    kind = data.draw(st.sampled_from(sorted(GRAPHS)), label="graph kind")
    model, feeds = GRAPHS[kind](data).model()
    config = configs(data)
    out, report = optimize(model, config)
    assert len(report.layers) == _layers_of(model)
    for row in report.layers:
        assert (row.status == "factorized") == (row.reason is None), row
        if row.status == "factorized":
            assert 1 <= row.rank and np.isfinite(row.rel_error) and row.params_after is not None
    assert_clean(out)
    got, want = run(out, feeds), run(model, feeds)
    assert [a.shape for a in got] == [b.shape for b in want]
    assert all(np.all(np.isfinite(a)) for a in got)
    # Nothing factorized: the model comes back byte-identical.
    if not report.factorized:
        assert out.SerializeToString() == model.SerializeToString()


@ANY
@given(st.data())
def test_optimizing_twice_changes_nothing_the_second_time(data):
    kind = data.draw(st.sampled_from(sorted(GRAPHS)), label="graph kind")
    model, feeds = GRAPHS[kind](data).model()
    config = configs(data)
    once, _ = optimize(model, config)
    twice, report = optimize(once, LowRankConfig(rank=100000, force=True, conv_scheme=config.conv_scheme))
    assert all(r.reason == "already a low-rank factor (made by onnx-lowrank)"
               for r in report.layers if r.node.rsplit("/", 1)[-1].startswith("lowrank_"))
    assert_clean(twice)
    assert [a.shape for a in run(twice, feeds)] == [a.shape for a in run(model, feeds)]
