"""Factorize Conv nodes with a constant weight ``W [M, C/group, k1, ..., kd]``.

Three schemes, chosen by ``LowRankConfig.conv_scheme`` (``--conv-scheme``):

``weight-svd`` (the default)
    The matrix view is ``W.reshape(M, -1).T``, ``(C/g * k1 * ... * kd) x M`` (input features x
    output features, like a MatMul's right weight), factorized as ``A (K x r) @ B (r x M)``.
    First node: Conv with the original kernel, strides, pads, dilations and auto_pad, ``C -> r``
    channels, kernel ``A.T`` reshaped ``[r, C/g, k...]``. Second node: 1x1 Conv ``r -> M``,
    kernel ``B.T`` reshaped ``[M, r, 1...]``, with the bias. A 1x1 conv is plain channel mixing
    and becomes two 1x1 convs.
``spatial-svd`` (Jaderberg et al. 2014)
    2-D kernels with ``kh > 1`` and ``kw > 1``: the view is ``(C/g * kh) x (M * kw)``
    (``W[m, c, i, j]`` at row ``(c, i)``, column ``(m, j)``). First node: ``kh x 1`` Conv
    ``C -> r`` with the vertical stride, pads and dilation; second node: ``1 x kw`` Conv
    ``r -> M`` with the horizontal ones and the bias. Dilations are supported (AIMET refuses
    them). ``auto_pad`` is passed to both nodes: SAME padding is computed per axis, and on the
    axis where a node has a kernel of 1 and stride 1 it pads nothing, so the pair pads exactly
    like the original. 1-D and 3-D convs and kernels with ``kh == 1`` or ``kw == 1`` fall back
    to weight-svd, with a note.
``tucker2`` (Kim et al. 2015)
    1x1 Conv ``C -> r_in``, core Conv ``r_in -> r_out`` with the original kernel and geometry,
    1x1 Conv ``r_out -> M`` with the bias. The channel factors are the leading left singular
    vectors of the two channel unfoldings of ``W`` (HOSVD, each computed with the configured
    method, RSI by default); the core is ``W`` projected onto them. 1-D, 2-D and 3-D kernels
    alike; 1x1 kernels fall back to weight-svd (Tucker-2 of a matrix is three matrices where
    two suffice), with a note.

Every Conv attribute is kept: strides, pads (asymmetric too), dilations, auto_pad (NOTSET,
SAME_UPPER, SAME_LOWER, VALID), group; bias or none; weights from initializers, ``Constant``
nodes or behind Identity/Transpose/Cast; float16/bfloat16 weights are factorized in float32 and
stored back in their own type.

Grouped convs (``group = g > 1``) are factorized per group, each group at the same rank ``r``,
and expressed with grouped convs (``group=g`` on every new node), so the parameter count is
``g`` times that of one group and the break-even rank is one group's. All three schemes support
groups. Depthwise convs (one input channel per group) are skipped where no rank can save
parameters (weight-svd and tucker2 with a channel multiplier of 1); spatial-svd can still split
a depthwise ``kh x kw`` kernel into ``kh x 1`` and ``1 x kw`` depthwise kernels and does.

Left alone, with a reason: weight not constant / not float / NaN / fewer than 3 dimensions,
both inputs constant, output channels not divisible by ``group``, ``kernel_shape`` disagreeing
with the weight, and depthwise convs that cannot gain.

Rank conventions
----------------
The rank policy chooses one rank ``r`` per node. weight-svd and spatial-svd use it for every
group. Tucker-2 uses ``r_in = min(r, C/g)`` and ``r_out = min(r, M/g)`` (the same rank for both
channel modes, clamped), so ``max_rank = max(C/g, M/g)`` makes the full Tucker decomposition
reachable with ``--force``. Ranks default to multiples of 16 (``default_multiple_of``): the
onnxruntime CPU kernels pad conv channels to 16 on AVX-512, so those ranks cost nothing extra.

References
----------
M. Jaderberg, A. Vedaldi, A. Zisserman, "Speeding up convolutional neural networks with low rank
expansions", BMVC 2014.
Y.-D. Kim, E. Park, S. Yoo, T. Choi, L. Yang, D. Shin, "Compression of deep convolutional neural
networks for fast and low power mobile applications", ICLR 2016.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper

from onnx_lowrank.core import linalg
from onnx_lowrank.config import LowRankConfig

from .graph import Candidate, ConstantWeight, GraphContext, Rewrite, attr
from .matmul import check_weight
from .skip import CONSTANT_FOLDABLE, Skip, missing_operand

__all__ = [
    "ConvCandidate",
    "ConvFactors",
    "ConvGeometry",
    "SpatialSVDCandidate",
    "Tucker2Candidate",
    "TuckerFactors",
    "WeightSVDCandidate",
    "match_conv",
]

#: onnxruntime pads conv channels to 16 on AVX-512 (see DESIGN.md): such ranks are free.
CONV_MULTIPLE_OF = 16

DEPTHWISE_REASON = "depthwise conv (one input channel per group): factorization cannot reduce parameters"


# ------------------------------------------------------------------------------------------
# Geometry
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConvGeometry:
    """The attributes of a Conv node, completed with their defaults.

    ``pads`` is ONNX's ``[x1_begin, ..., xd_begin, x1_end, ..., xd_end]``; it is ignored by
    onnxruntime when ``auto_pad`` is not ``NOTSET``.
    """

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]
    auto_pad: str
    group: int

    @property
    def ndim(self) -> int:
        return len(self.kernel)

    @classmethod
    def of(cls, node: onnx.NodeProto, kernel: Sequence[int]) -> ConvGeometry:
        d = len(kernel)
        auto_pad = attr(node, "auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
        return cls(
            kernel=tuple(int(k) for k in kernel),
            strides=tuple(int(s) for s in attr(node, "strides", [1] * d)),
            dilations=tuple(int(s) for s in attr(node, "dilations", [1] * d)),
            pads=tuple(int(p) for p in attr(node, "pads", [0] * (2 * d))),
            auto_pad=auto_pad or "NOTSET",
            group=int(attr(node, "group", 1)),
        )

    def attributes(self, *, group: int | None = None) -> dict[str, Any]:
        """Attributes for a node with this geometry; default values are omitted, as exporters do."""
        out: dict[str, Any] = {"kernel_shape": list(self.kernel)}
        if self.auto_pad != "NOTSET":
            out["auto_pad"] = self.auto_pad
        elif any(self.pads):
            out["pads"] = list(self.pads)
        if any(s != 1 for s in self.strides):
            out["strides"] = list(self.strides)
        if any(s != 1 for s in self.dilations):
            out["dilations"] = list(self.dilations)
        group = self.group if group is None else group
        if group != 1:
            out["group"] = group
        return out

    def problem(self) -> str | None:
        """Why the attributes do not fit the kernel's rank (a malformed node), or ``None``."""
        d = self.ndim
        for name, values, want in (("strides", self.strides, d), ("dilations", self.dilations, d),
                                   ("pads", self.pads, 2 * d)):
            if len(values) != want:
                return f"{name} {list(values)} do not fit a {d}-D kernel"
        if self.auto_pad not in ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"):
            return f"unknown auto_pad {self.auto_pad!r}"
        return None

    def axis(self, keep: int) -> ConvGeometry:
        """This geometry restricted to spatial axis ``keep``: kernel 1, stride 1, no pads, no
        dilation on the other axes (the halves of spatial-svd)."""
        d = self.ndim

        def pick(values: Sequence[int], neutral: int) -> tuple[int, ...]:
            return tuple(v if i == keep else neutral for i, v in enumerate(values))

        pads = pick(self.pads[:d], 0) + pick(self.pads[d:], 0)
        return ConvGeometry(pick(self.kernel, 1), pick(self.strides, 1), pick(self.dilations, 1),
                            pads, self.auto_pad, self.group)

    @staticmethod
    def pointwise(d: int, group: int) -> ConvGeometry:
        """A 1x1 (x1) conv: no padding, stride 1."""
        return ConvGeometry((1,) * d, (1,) * d, (1,) * d, (0,) * (2 * d), "NOTSET", group)


def conv_pads(geometry: ConvGeometry, spatial: Sequence[int]) -> list[tuple[int, int]]:
    """(begin, end) padding per spatial axis, resolving ``auto_pad`` for an input of ``spatial`` size."""
    d = geometry.ndim
    if geometry.auto_pad == "VALID":
        return [(0, 0)] * d
    if geometry.auto_pad == "NOTSET":
        return [(geometry.pads[i], geometry.pads[i + d]) for i in range(d)]
    out = []
    for size, k, s, dil in zip(spatial, geometry.kernel, geometry.strides, geometry.dilations):
        total = max((-(-size // s) - 1) * s + (k - 1) * dil + 1 - size, 0)
        small, large = total // 2, total - total // 2
        out.append((small, large) if geometry.auto_pad == "SAME_UPPER" else (large, small))
    return out


#: At most this many patch rows per calibration sample enter the Gram matrix (an evenly
#: strided subset beyond it): a 112x112 feature map has 12544 rows, and the Gram matrix of a
#: few thousand well-spread patches already pins down the input statistics.
MAX_PATCHES_PER_SAMPLE = 4096


def conv_patches(x: np.ndarray, geometry: ConvGeometry) -> np.ndarray:
    """im2col: the receptive fields of a (group 1) Conv as rows ``(C * prod(kernel))``.

    Rows are ordered like ``W.reshape(M, -1)``'s columns (channel-major, then kernel taps), so
    ``patches @ W.reshape(M, -1).T`` is the conv's output at every position, without bias.
    """
    d = geometry.ndim
    if x.ndim == d + 1:
        x = x[None]
    n, c = x.shape[:2]
    pads = conv_pads(geometry, x.shape[2:])
    if any(p for pair in pads for p in pair):
        x = np.pad(x, [(0, 0), (0, 0), *pads])
    span = [(k - 1) * dil + 1 for k, dil in zip(geometry.kernel, geometry.dilations)]
    windows = np.lib.stride_tricks.sliding_window_view(x, span, axis=tuple(range(2, 2 + d)))
    pick = (slice(None), slice(None)) + tuple(slice(None, None, s) for s in geometry.strides) \
        + tuple(slice(None, None, dil) for dil in geometry.dilations)
    windows = windows[pick]  # [N, C, *out, *kernel]
    order = [0, *range(2, 2 + d), 1, *range(2 + d, 2 + 2 * d)]
    rows = windows.transpose(order).reshape(-1, c * math.prod(geometry.kernel))
    step = -(-rows.shape[0] // (MAX_PATCHES_PER_SAMPLE * n))
    return rows[::step] if step > 1 else rows


# ------------------------------------------------------------------------------------------
# Factor containers (only read by the candidate that made them)
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConvFactors:
    """Per-group factors ``W_j ~= a[j] @ b[j]`` of a two-node scheme (weight-svd, spatial-svd)."""

    a: list[np.ndarray]
    b: list[np.ndarray]
    singular_values: list[np.ndarray]

    @property
    def rank(self) -> int:
        return int(self.a[0].shape[1])


@dataclass(frozen=True)
class TuckerFactors:
    """Per-group Tucker-2 factors: ``W_j ~= core[j] x_0 u_out[j] x_1 u_in[j]``.

    ``u_in[j]`` (C/g x r_in) and ``u_out[j]`` (M/g x r_out) have orthonormal columns;
    ``core[j]`` is ``[r_out, r_in, k...]``.
    """

    u_in: list[np.ndarray]
    core: list[np.ndarray]
    u_out: list[np.ndarray]


# ------------------------------------------------------------------------------------------
# Candidates
# ------------------------------------------------------------------------------------------


class ConvCandidate(Candidate):
    """What all Conv schemes share: the weight's dimensions, the geometry, the bias, the note.

    Attributes
    ----------
    note : str or None
        Why the scheme differs from the requested one (a fallback), for the report row.
    """

    scheme = "weight-svd"

    def __init__(
        self,
        node: onnx.NodeProto,
        label: str,
        weight: ConstantWeight,
        geometry: ConvGeometry,
        *,
        note: str | None = None,
        fallback_from: str | None = None,
    ) -> None:
        g = geometry.group
        view = type(self).matrix_view
        if weight.lazy:
            # Read from disk when factorized, then dropped: planning holds no weight.
            matrix: Any = functools.partial(_view_of, weight, view)
        else:
            matrix = view(weight.value)
        super().__init__(node, label, weight, matrix, view=f"conv:{type(self).__name__}:g{g}",
                         shape=type(self).matrix_shape(weight.shape))
        self.geometry = geometry
        self.groups = g
        self.weight_shape = tuple(weight.shape)  # [M, C/g, k...]
        self.out_channels = int(weight.shape[0])  # M
        self.in_per_group = int(weight.shape[1])  # C/g
        self.out_per_group = self.out_channels // g  # M/g
        self.kernel_size = int(math.prod(weight.shape[2:]))
        self.note = note
        if fallback_from:
            self.scheme = f"{type(self).scheme} (fallback from {fallback_from})"

    @staticmethod
    def matrix_view(w: np.ndarray) -> np.ndarray:
        """The scheme's matrix view of a weight ``[M, C/g, k...]``."""
        raise NotImplementedError

    @staticmethod
    def matrix_shape(shape: Sequence[int]) -> tuple[int, int]:
        """The shape of :meth:`matrix_view` for a weight of ``shape`` (without reading it)."""
        raise NotImplementedError

    @property
    def default_multiple_of(self) -> int:
        return CONV_MULTIPLE_OF

    @property
    def activation(self) -> str | None:
        # Whitening needs the scheme's input features: weight-svd (group 1) provides them; the
        # other schemes factorize data-free and the report says so.
        return None

    @property
    def bias(self) -> list[str]:
        return list(self.node.input[2:3]) if len(self.node.input) > 2 and self.node.input[2] else []

    def macs(
        self, rank: int, input_shape: Sequence[Any], output_shape: Sequence[Any]
    ) -> tuple[int, int] | None:
        """Multiply-accumulates of the original node and of its replacement at ``rank``.

        Parameters
        ----------
        rank : int
            The rank chosen by the policy (clamped to :attr:`max_rank` as the pass does).
        input_shape, output_shape : sequence
            ``[N, C, *spatial]`` and ``[N, M, *out_spatial]`` of the Conv, from shape inference.

        Returns
        -------
        (before, after) or None
            ``None`` when a needed dimension is unknown (not a positive int). Bias additions are
            not counted (they are the same before and after).
        """
        d = self.geometry.ndim
        if not (_known(input_shape, d + 2) and _known(output_shape, d + 2)):
            return None
        out_pixels = int(output_shape[0]) * math.prod(int(s) for s in output_shape[2:])
        before = out_pixels * self.out_channels * self.in_per_group * self.kernel_size
        after = self._macs_after(min(max(int(rank), 1), self.max_rank),
                                 [int(s) for s in input_shape], [int(s) for s in output_shape])
        return before, after

    def _macs_after(self, rank: int, input_shape: list[int], output_shape: list[int]) -> int:
        raise NotImplementedError

    def _node(self, inputs: list[str], output: str, role: str, geometry: ConvGeometry, ctx: GraphContext,
              group: int | None = None) -> onnx.NodeProto:
        return helper.make_node("Conv", inputs, [output], name=ctx.unique(f"{self.label}/lowrank_{role}"),
                                **geometry.attributes(group=group))


class _TwoFactorCandidate(ConvCandidate):
    """A scheme with two nodes and per-group factors ``W_j ~= A_j @ B_j`` of column blocks."""

    @property
    def block_shape(self) -> tuple[int, int]:
        """One group's column block of the matrix view."""
        return self.shape[0], self.shape[1] // self.groups

    def blocks(self, matrix: np.ndarray) -> list[np.ndarray]:
        """The groups' column blocks (views) of ``matrix``, the held matrix view."""
        cols = self.block_shape[1]
        return [matrix[:, j * cols:(j + 1) * cols] for j in range(self.groups)]

    @property
    def max_rank(self) -> int:
        return min(self.block_shape)

    def factored_params(self, rank: int) -> int:
        k, n = self.block_shape
        return self.groups * rank * (k + n)

    def spectrum(self, k: int) -> tuple[np.ndarray, float]:
        """Per-rank singular values ``sqrt(sum_j sigma_{j,i}^2)`` over the groups, and ``||W||_F^2``.

        With one rank for every group, the energy kept at rank ``r`` is the sum over groups of
        each group's leading ``r`` squared singular values, which is what these values add up
        to; with one group they are the plain singular values.
        """
        want = min(max(k, 1), self.max_rank)
        if self._spectrum is None or len(self._spectrum[0]) < want:
            energy = np.zeros(want)
            with self.held() as matrix:
                for block in self.blocks(matrix):
                    s2 = linalg.squared_singular_values(block, want)
                    energy[: len(s2)] += s2
                total = linalg.squared_frobenius_norm(matrix)
            self._spectrum = (np.sqrt(energy), total)
        return self._spectrum

    def factorize(self, rank: int, config: LowRankConfig) -> ConvFactors:
        a, b, s = [], [], []
        with self.held() as matrix:
            for block in self.blocks(matrix):
                f = linalg.factorize(block, rank, method=config.method, power_iters=config.power_iters,
                                     oversample=config.oversample, seed=config.seed)
                a.append(f.a)
                b.append(f.b)
                s.append(f.singular_values)
        return ConvFactors(a, b, s)

    def truncate(self, factors: Any, rank: int) -> ConvFactors | None:
        if not isinstance(factors, ConvFactors) or factors.rank < rank:
            return None
        return ConvFactors([np.ascontiguousarray(a[:, :rank]) for a in factors.a],
                           [np.ascontiguousarray(b[:rank]) for b in factors.b],
                           [sv[:rank] for sv in factors.singular_values])

    def relative_error(self, factors: ConvFactors) -> float:
        """``||W - A B||_F / ||W||_F`` over all groups (the groups' residuals add up)."""
        num = 0.0
        with self.held() as matrix:
            for block, a, b in zip(self.blocks(matrix), factors.a, factors.b):
                num += linalg.squared_residual_norm(block, a, b)
            den = linalg.squared_frobenius_norm(matrix)
        if den == 0.0:
            return 0.0 if num == 0.0 else float("inf")
        return math.sqrt(num / den)

    def _kernels(self, factors: ConvFactors) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def _geometries(self) -> tuple[ConvGeometry, ConvGeometry]:
        raise NotImplementedError

    def rewrite(self, ctx: GraphContext, factors: ConvFactors, names: dict[str, str]) -> Rewrite:
        first_kernel, second_kernel = self._kernels(factors)
        inits = self.factor_initializers(ctx, {"a": first_kernel, "b": second_kernel}, names)
        hidden = ctx.unique(f"{self.label}/lowrank_hidden")
        first_geo, second_geo = self._geometries()
        nodes = [
            self._node([self.node.input[0], names["a"]], hidden, "a", first_geo, ctx),
            self._node([hidden, names["b"], *self.bias], self.node.output[0], "b", second_geo, ctx),
        ]
        return Rewrite(nodes, inits)


class WeightSVDCandidate(_TwoFactorCandidate):
    """weight-svd: ``Conv(k, geometry) C -> g*r`` then ``Conv(1x1) g*r -> M`` (both ``group=g``).

    The matrix view is ``W.reshape(M, -1).T`` (``C/g * prod(k)`` x ``M``); group ``j`` owns
    columns ``j*M/g .. (j+1)*M/g``.
    """

    scheme = "weight-svd"

    @staticmethod
    def matrix_view(w: np.ndarray) -> np.ndarray:
        return w.reshape(w.shape[0], -1).T

    @staticmethod
    def matrix_shape(shape: Sequence[int]) -> tuple[int, int]:
        return math.prod(shape[1:]), shape[0]

    # -- calibration: whitening by the input patches (group 1; grouped convs stay data-free) --
    @property
    def activation(self) -> str | None:
        return self.node.input[0] if self.groups == 1 else None

    def features(self, activation: np.ndarray) -> np.ndarray:
        return conv_patches(np.asarray(activation), self.geometry)

    def spectrum(self, k: int) -> tuple[np.ndarray, float]:
        if self.whitener is not None:
            return Candidate.spectrum(self, k)
        return super().spectrum(k)

    def factorize(self, rank: int, config: LowRankConfig) -> ConvFactors:
        if self.whitener is None:
            return super().factorize(rank, config)
        f = self.whitener.factorize(self.matrix, rank, side="rows", method=config.method,
                                    power_iters=config.power_iters, oversample=config.oversample, seed=config.seed)
        return ConvFactors([f.a], [f.b], [f.singular_values])

    def whitened_error(self, factors: ConvFactors) -> float | None:
        if self.whitener is None:
            return None
        return self.whitener.relative_error(self.matrix, factors.a[0], factors.b[0], "rows")

    def _kernels(self, factors: ConvFactors) -> tuple[np.ndarray, np.ndarray]:
        r = factors.rank
        k = self.weight_shape[2:]
        first = np.concatenate([a.T.reshape(r, self.in_per_group, *k) for a in factors.a], axis=0)
        second = np.concatenate([b.T for b in factors.b], axis=0)  # [M, r]
        return first, second.reshape(self.out_channels, r, *([1] * len(k)))

    def _geometries(self) -> tuple[ConvGeometry, ConvGeometry]:
        return self.geometry, ConvGeometry.pointwise(self.geometry.ndim, self.groups)

    def _macs_after(self, rank: int, input_shape: list[int], output_shape: list[int]) -> int:
        out_pixels = output_shape[0] * math.prod(output_shape[2:])
        first = out_pixels * self.groups * rank * self.in_per_group * self.kernel_size
        second = out_pixels * self.out_channels * rank
        return first + second


class SpatialSVDCandidate(_TwoFactorCandidate):
    """spatial-svd: ``Conv(kh x 1) C -> g*r`` then ``Conv(1 x kw) g*r -> M`` (both ``group=g``).

    The matrix view is ``(C/g * kh) x (M * kw)`` with ``W[m, c, i, j]`` at row ``c*kh + i`` and
    column ``m*kw + j``; group ``j`` owns the columns of its output channels.
    """

    scheme = "spatial-svd"

    @staticmethod
    def matrix_view(w: np.ndarray) -> np.ndarray:
        m, cg, kh, kw = w.shape
        return w.transpose(1, 2, 0, 3).reshape(cg * kh, m * kw)

    @staticmethod
    def matrix_shape(shape: Sequence[int]) -> tuple[int, int]:
        m, cg, kh, kw = shape
        return cg * kh, m * kw

    def _kernels(self, factors: ConvFactors) -> tuple[np.ndarray, np.ndarray]:
        r = factors.rank
        _, cg, kh, kw = self.weight_shape
        mg = self.out_per_group
        first = np.concatenate([a.T.reshape(r, cg, kh, 1) for a in factors.a], axis=0)
        second = np.concatenate(
            [b.reshape(r, mg, kw).transpose(1, 0, 2).reshape(mg, r, 1, kw) for b in factors.b], axis=0)
        return first, second

    def _geometries(self) -> tuple[ConvGeometry, ConvGeometry]:
        return self.geometry.axis(0), self.geometry.axis(1)

    def _macs_after(self, rank: int, input_shape: list[int], output_shape: list[int]) -> int:
        n, _, _, in_w = input_shape
        _, _, out_h, out_w = output_shape
        kh, kw = self.geometry.kernel
        # The vertical node keeps the input width (kernel 1, stride 1, no pad horizontally).
        first = n * out_h * in_w * self.groups * rank * self.in_per_group * kh
        second = n * out_h * out_w * self.out_channels * rank * kw
        return first + second


class Tucker2Candidate(ConvCandidate):
    """Tucker-2: ``Conv(1x1) C -> g*r_in``, ``Conv(k, geometry) -> g*r_out``, ``Conv(1x1) -> M``.

    ``r_in = min(r, C/g)``, ``r_out = min(r, M/g)`` for the policy's rank ``r`` (see :meth:`ranks`). The matrix view
    (shown in the report; the input side as rows, for input whitening) is the input-channel
    unfolding ``C/g x (M * prod(k))``.

    Notes
    -----
    Energy for Tucker-2: ``spectrum`` returns values whose cumulative squares at rank ``r`` are
    ``min(E_in(r), E_out(r))``, the smaller of the energies kept by the two channel unfoldings'
    leading ``r`` singular values (summed over groups). The energy policy therefore picks the
    smallest ``r`` at which *each* mode keeps the requested fraction, and ``optimal_error``
    reports ``sqrt(max(tail_in, tail_out)) / ||W||``, a lower bound of the error of any
    Tucker-2 approximation at ``(r_in, r_out)``; HOSVD's error lies between it and
    ``sqrt(tail_in + tail_out) / ||W||``.
    """

    scheme = "tucker2"

    @staticmethod
    def matrix_view(w: np.ndarray) -> np.ndarray:
        return np.swapaxes(w, 0, 1).reshape(w.shape[1], -1)

    @staticmethod
    def matrix_shape(shape: Sequence[int]) -> tuple[int, int]:
        return shape[1], shape[0] * math.prod(shape[2:])

    def group_weights(self, matrix: np.ndarray) -> list[np.ndarray]:
        """Each group's weight ``[M/g, C/g, prod(k)]`` as a view of ``matrix``, the held view."""
        mg = self.out_per_group
        w = np.swapaxes(matrix.reshape(self.in_per_group, self.out_channels, self.kernel_size), 0, 1)
        return [w[j * mg:(j + 1) * mg] for j in range(self.groups)]

    @property
    def mode_ranks(self) -> tuple[int, int]:
        """Ranks of the input and output channel unfoldings of one group: ``r_in`` and ``r_out``
        never need more (``C/g`` and ``M/g``, unless the kernel is too small to span them)."""
        cg, mg, k = self.in_per_group, self.out_per_group, self.kernel_size
        return min(cg, mg * k), min(mg, cg * k)

    def ranks(self, rank: int) -> tuple[int, int]:
        """``(r_in, r_out)`` for the policy's rank: the same rank for both modes, clamped."""
        cap_in, cap_out = self.mode_ranks
        return min(rank, cap_in), min(rank, cap_out)

    @property
    def max_rank(self) -> int:
        return max(self.mode_ranks)

    def factored_params(self, rank: int) -> int:
        r_in, r_out = self.ranks(rank)
        return self.groups * (self.in_per_group * r_in + r_in * r_out * self.kernel_size
                              + r_out * self.out_per_group)

    def _unfoldings(self, wj: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mode_in = np.swapaxes(wj, 0, 1).reshape(self.in_per_group, -1)
        mode_out = wj.reshape(self.out_per_group, -1)
        return mode_in, mode_out

    def spectrum(self, k: int) -> tuple[np.ndarray, float]:
        want = min(max(k, 1), self.max_rank)
        if self._spectrum is None or len(self._spectrum[0]) < want:
            energies = np.zeros((2, want))  # per mode, summed over the groups
            with self.held() as matrix:
                for wj in self.group_weights(matrix):
                    for mode, unfolding in enumerate(self._unfoldings(wj)):
                        s2 = linalg.squared_singular_values(unfolding, want)
                        energies[mode, : len(s2)] += s2
                total = linalg.squared_frobenius_norm(matrix)
            kept = np.cumsum(energies, axis=1)
            both = np.minimum(np.minimum(kept[0], kept[1]), total)
            steps = np.clip(np.diff(both, prepend=0.0), 0.0, None)
            self._spectrum = (np.sqrt(steps), total)
        return self._spectrum

    def factorize(self, rank: int, config: LowRankConfig) -> TuckerFactors:
        """HOSVD on the two channel modes (each by the configured method), core by projection."""
        r_in, r_out = self.ranks(rank)
        u_in, core, u_out = [], [], []
        with self.held() as matrix:
            for wj in self.group_weights(matrix):
                mode_in, mode_out = self._unfoldings(wj)
                ui = self._basis(mode_in, r_in, config)
                uo = self._basis(mode_out, r_out, config)
                c = np.einsum("mo,mck,ci->oik", uo, wj.astype(np.float64), ui, optimize=True)
                u_in.append(ui.astype(matrix.dtype))
                u_out.append(uo.astype(matrix.dtype))
                core.append(c.astype(matrix.dtype))
        return TuckerFactors(u_in, core, u_out)

    @staticmethod
    def _basis(unfolding: np.ndarray, rank: int, config: LowRankConfig) -> np.ndarray:
        """Orthonormal basis (float64) of the leading ``rank`` left singular vectors."""
        f = linalg.factorize(unfolding, rank, method=config.method, power_iters=config.power_iters,
                             oversample=config.oversample, seed=config.seed)
        # a = U sqrt(S): QR recovers an orthonormal basis of the same span, also when trailing
        # singular values are zero (their columns of a are zero; QR completes them).
        q, _ = np.linalg.qr(f.a.astype(np.float64))
        return q

    def relative_error(self, factors: TuckerFactors) -> float:
        num = 0.0
        with self.held() as matrix:
            for j, wj in enumerate(self.group_weights(matrix)):
                ui, c, uo = (x.astype(np.float64) for x in (factors.u_in[j], factors.core[j], factors.u_out[j]))
                approx = np.einsum("mo,oik,ci->mck", uo, c, ui, optimize=True)
                approx -= wj  # in place: one float64 temporary per group
                num += float(np.einsum("mck,mck->", approx, approx))
            den = linalg.squared_frobenius_norm(matrix)
        if den == 0.0:
            return 0.0 if num == 0.0 else float("inf")
        return math.sqrt(num / den)

    def rewrite(self, ctx: GraphContext, factors: TuckerFactors, names: dict[str, str]) -> Rewrite:
        d = self.geometry.ndim
        ones = [1] * d
        k = self.weight_shape[2:]
        r_in, r_out = factors.u_in[0].shape[1], factors.u_out[0].shape[1]
        arrays = {
            "a": np.concatenate([u.T for u in factors.u_in], axis=0).reshape(-1, self.in_per_group, *ones),
            "b": np.concatenate(factors.core, axis=0).reshape(self.groups * r_out, r_in, *k),
            "c": np.concatenate(factors.u_out, axis=0).reshape(self.out_channels, r_out, *ones),
        }
        inits = self.factor_initializers(ctx, arrays, names)
        hidden_in = ctx.unique(f"{self.label}/lowrank_hidden")
        hidden_out = ctx.unique(f"{self.label}/lowrank_hidden")
        pointwise = ConvGeometry.pointwise(d, self.groups)
        nodes = [
            self._node([self.node.input[0], names["a"]], hidden_in, "a", pointwise, ctx),
            self._node([hidden_in, names["b"]], hidden_out, "b", self.geometry, ctx),
            self._node([hidden_out, names["c"], *self.bias], self.node.output[0], "c", pointwise, ctx),
        ]
        return Rewrite(nodes, inits)

    def _macs_after(self, rank: int, input_shape: list[int], output_shape: list[int]) -> int:
        r_in, r_out = self.ranks(rank)
        in_pixels = input_shape[0] * math.prod(input_shape[2:])
        out_pixels = output_shape[0] * math.prod(output_shape[2:])
        first = in_pixels * self.groups * r_in * self.in_per_group  # 1x1 at the input resolution
        core = out_pixels * self.groups * r_out * r_in * self.kernel_size
        last = out_pixels * self.out_channels * r_out
        return first + core + last


# ------------------------------------------------------------------------------------------
# Matching
# ------------------------------------------------------------------------------------------


def match_conv(node: onnx.NodeProto, label: str, ctx: GraphContext, config: LowRankConfig) -> Candidate | Skip:
    """A candidate for a Conv node under ``config.conv_scheme``, or the :class:`Skip` saying why it is left alone."""
    if len(node.input) < 2 or not node.input[1]:
        return missing_operand("Conv", "a weight input")
    weight = ctx.constant(node.input[1])
    if weight is None:
        return Skip(ctx.why_not_constant(node.input[1]))
    if ctx.constant(node.input[0]) is not None:
        return CONSTANT_FOLDABLE
    shape = weight.shape  # known without reading a lazily loaded weight
    if len(shape) < 3:
        return Skip(f"weight {weight.name!r} has shape {list(shape)}; a Conv weight is [M, C/group, k1, ...]")
    reason = check_weight(weight, ndim=len(shape))
    if reason:
        return Skip(reason)
    if weight.size == 0:
        return Skip(f"weight {weight.name!r} is empty {list(shape)}")
    geometry = ConvGeometry.of(node, shape[2:])
    declared = attr(node, "kernel_shape", None)
    if declared is not None and tuple(int(k) for k in declared) != tuple(shape[2:]):
        return Skip(f"kernel_shape {list(declared)} disagrees with weight {weight.name!r} {list(shape)}")
    problem = geometry.problem()
    if problem:
        return Skip(problem)
    g = geometry.group
    if g < 1 or shape[0] % g:
        return Skip(f"{shape[0]} output channels are not divisible by group={g}")

    scheme, note = _scheme_for(config.conv_scheme, geometry)
    classes = {"weight-svd": WeightSVDCandidate, "spatial-svd": SpatialSVDCandidate, "tucker2": Tucker2Candidate}
    fallback = config.conv_scheme if scheme != config.conv_scheme else None
    cand = classes[scheme](node, label, weight, geometry, note=note, fallback_from=fallback)
    if g > 1 and shape[1] == 1 and cand.factored_params(1) >= cand.params_before:
        return Skip(DEPTHWISE_REASON)
    return cand


def _scheme_for(requested: str, geometry: ConvGeometry) -> tuple[str, str | None]:
    """The scheme applied to a conv of this geometry, and a note when it is not the requested one."""
    kernel = geometry.kernel
    shown = "x".join(str(k) for k in kernel)
    if requested == "spatial-svd" and (len(kernel) != 2 or min(kernel) == 1):
        why = f"a {len(kernel)}-D kernel" if len(kernel) != 2 else f"a {shown} kernel"
        return "weight-svd", f"spatial-svd needs a 2-D kernel with kh > 1 and kw > 1, got {why}: used weight-svd"
    if requested == "tucker2" and math.prod(kernel) == 1:
        return "weight-svd", (f"tucker2 of a {shown} kernel is a plain channel mix (three nodes where two "
                              "suffice): used weight-svd")
    return requested, None


def _known(shape: Sequence[Any] | None, ndim: int) -> bool:
    return (shape is not None and len(shape) == ndim
            and all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0 for s in shape))


def _view_of(weight: ConstantWeight, view: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """A lazily loaded weight's matrix view, read now (picklable for remote workers)."""
    return view(weight.value)
