"""The one frozen configuration shared by the CLI, the Python API and the graph pass."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["ConfigError", "LowRankConfig", "METHODS", "OP_TYPES", "DEFAULT_OP_TYPES", "CONV_SCHEMES"]

METHODS = ("rsi", "rsvd", "svd")
#: Op families the pass can factorize (``Gather``: embedding tables, rows looked up by index).
OP_TYPES = ("MatMul", "Gemm", "Conv", "Gather")
#: Families factorized unless ``op_types`` says otherwise (why Gather is not among them:
#: docs/embeddings.md).
DEFAULT_OP_TYPES = ("MatMul", "Gemm", "Conv")
CONV_SCHEMES = ("weight-svd", "spatial-svd", "tucker2")
WHITEN_MODES = ("auto", "full", "diag", "none")
LATENCY_MODES = ("off", "model", "measure")
ALLOCATIONS = ("auto", "energy", "weighted", "measured")

#: Used when the caller names no rank policy: keep half of every layer's parameters. It is the
#: design card's headline example and a predictable starting point; energy would hide how much
#: is removed.
DEFAULT_RATIO = 0.5


class ConfigError(ValueError):
    """An impossible option value; the message says which option and what is allowed."""


@dataclass(frozen=True)
class LowRankConfig:
    """What to factorize and how.

    Parameters
    ----------
    method : {"rsi", "rsvd", "svd"}
        Factorization: randomized subspace iteration (default), randomized SVD without power
        iterations, or the exact LAPACK SVD.
    rank : int, optional
        Fixed rank for every layer (clamped to ``min(m, n)``).
    ratio : float, optional
        Keep this fraction of each layer's parameters, ``0 < ratio <= 1``.
    energy : float, optional
        Keep this fraction of each layer's squared singular values, ``0 < energy <= 1``.
        At most one of ``rank``, ``ratio``, ``energy``; with none, ``ratio=0.5``.
    power_iters : int
        Power iterations ``q`` of RSI (ignored by ``rsvd`` and ``svd``).
    oversample : int
        Extra sketch columns ``p`` of the randomized methods.
    seed : int
        Seed of the random sketch; the same seed gives byte-identical output.
    force : bool
        Factorize layers even when the rank does not reduce parameters (rank clamped to
        ``min(m, n)``); how exactness at full rank is checked.
    multiple_of : int, optional
        Round ranks up to a multiple of this (down when rounding up would reach the break-even
        rank). ``None`` means 1 for MatMul/Gemm and 16 for Conv where that stays profitable.
    min_params : int
        Leave layers with fewer weight parameters than this dense.
    include, exclude : tuple of str
        Regular expressions matched (``re.search``) against node and weight names. A layer is
        a target when it matches some ``include`` (or ``include`` is empty) and no ``exclude``.
    op_types : tuple of str
        Operator families to consider, a subset of :data:`OP_TYPES` (default
        :data:`DEFAULT_OP_TYPES`: ``Gather`` embedding tables are opt-in).
    conv_scheme : {"weight-svd", "spatial-svd", "tucker2"}
        How Conv weights are factorized.
    target_params, target_flops : float, optional
        Global budget instead of a per-layer policy: keep at most this fraction of the candidate
        layers' parameters (MACs) in total, ranks chosen across layers to minimize the summed
        normalized (whitened, with calibration data) truncation error.
    whiten : {"auto", "full", "diag", "none"}
        With calibration data, factorize for the layer's output error: ``full`` (Cholesky of the
        input Gram matrix, SVD-LLM), ``diag`` (per-feature scaling, ASVD) or ``none``.
        ``auto`` is ``full`` when calibration data is given.
    whiten_eps : float
        Relative jitter of the Gram matrix (see :data:`onnx_lowrank.core.whitening.DEFAULT_EPS`).
    max_error : float, optional
        With calibration data: search the smallest global budget whose relative output error
        on held-out samples stays at or below this.
    holdout : float
        Fraction of the calibration samples held out for ``max_error`` when no validation set
        is given.
    jobs : int
        Factorize this many weights in parallel, each in a thread with one BLAS thread; 0 (the
        default) is one job per core. The output is byte-identical for every value.
    dask : str, optional
        Run the factorizations as tasks on a dask.distributed cluster: a scheduler address
        (``tcp://host:8786``) or ``local:N`` for a local cluster of N worker processes. Results
        are identical to the local run.
    allocation : {"auto", "energy", "weighted", "measured"}
        How a global budget is spent: ``energy``, by normalized (whitened) spectral energy per
        parameter; ``weighted``, the same energies weighted by each layer's measured output
        sensitivity (two onnxruntime probes per layer; needs calibration data); ``measured``,
        by the measured output loss of each layer alone at up to 7 candidate ranks (AIMET's
        idea, run by onnxruntime; needs calibration data). ``auto`` (the default) is
        ``weighted`` when calibration data is given, else ``energy``.
    latency : {"off", "model", "measure"}
        Keep a layer dense when the factorized form would not run faster in onnxruntime:
        predicted by a cost model, or measured once per layer shape on this machine.
    """

    method: str = "rsi"
    rank: int | None = None
    ratio: float | None = None
    energy: float | None = None
    power_iters: int = 2
    oversample: int = 10
    seed: int = 0
    force: bool = False
    multiple_of: int | None = None
    min_params: int = 0
    include: tuple[str, ...] = field(default_factory=tuple)
    exclude: tuple[str, ...] = field(default_factory=tuple)
    op_types: tuple[str, ...] = DEFAULT_OP_TYPES
    conv_scheme: str = "weight-svd"
    target_params: float | None = None
    target_flops: float | None = None
    whiten: str = "auto"
    whiten_eps: float = 1e-3
    max_error: float | None = None
    holdout: float = 0.2
    latency: str = "off"
    allocation: str = "auto"
    jobs: int = 0
    dask: str | None = None

    def __post_init__(self) -> None:
        # Accept lists from callers but store tuples so the config stays hashable and frozen.
        for name in ("include", "exclude", "op_types"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            object.__setattr__(self, name, tuple(value))
        self._validate()

    def _validate(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        policies = [n for n in ("rank", "ratio", "energy", "target_params", "target_flops", "max_error")
                    if getattr(self, n) is not None]
        if len(policies) > 1:
            raise ConfigError(
                f"choose one rank policy, got {' and '.join('--' + p.replace('_', '-') for p in policies)}"
            )
        for name in ("target_params", "target_flops"):
            value = getattr(self, name)
            if value is not None and not (_is_real(value) and 0.0 < value <= 1.0):
                raise ConfigError(
                    f"--{name.replace('_', '-')} must be in (0, 1] (the fraction of the candidate layers' "
                    f"{'parameters' if name == 'target_params' else 'MACs'} to keep), got {value!r}"
                )
        if self.max_error is not None and not (_is_real(self.max_error) and self.max_error > 0):
            raise ConfigError(f"--max-error must be > 0, got {self.max_error!r}")
        if self.whiten not in WHITEN_MODES:
            raise ConfigError(f"--whiten must be one of {', '.join(WHITEN_MODES)}, got {self.whiten!r}")
        if not (_is_real(self.whiten_eps) and 0.0 <= self.whiten_eps < 1.0):
            raise ConfigError(f"--whiten-eps must be in [0, 1), got {self.whiten_eps!r}")
        if not (_is_real(self.holdout) and 0.0 < self.holdout < 1.0):
            raise ConfigError(f"--holdout must be in (0, 1), got {self.holdout!r}")
        if not _is_int(self.jobs) or self.jobs < 0:
            raise ConfigError(f"--jobs must be an integer >= 0 (0 = one per core), got {self.jobs!r}")
        if self.dask is not None and not (isinstance(self.dask, str) and self.dask.strip()):
            raise ConfigError(f"--dask takes a scheduler address or local:N, got {self.dask!r}")
        if isinstance(self.dask, str) and self.dask.startswith("local:"):
            n = self.dask[len("local:"):]
            if not n.isdigit() or int(n) < 1:
                raise ConfigError(f"--dask local:N needs a positive number of workers, got {self.dask!r}")
        if self.allocation not in ALLOCATIONS:
            raise ConfigError(f"--allocation must be one of {', '.join(ALLOCATIONS)}, got {self.allocation!r}")
        if self.allocation in ("measured", "weighted") and self.target_params is None and self.target_flops is None \
                and self.max_error is None:
            raise ConfigError(f"--allocation {self.allocation} spends a global budget: give --target-params or "
                              "--target-flops")
        if self.latency not in LATENCY_MODES:
            raise ConfigError(f"--latency must be one of {', '.join(LATENCY_MODES)}, got {self.latency!r}")
        if self.rank is not None and (not _is_int(self.rank) or self.rank < 1):
            raise ConfigError(f"--rank must be a positive integer, got {self.rank!r}")
        if self.ratio is not None and not (_is_real(self.ratio) and 0.0 < self.ratio <= 1.0):
            raise ConfigError(
                f"--ratio must be in (0, 1] (the fraction of each layer's parameters to keep), "
                f"got {self.ratio!r}"
            )
        if self.energy is not None and not (_is_real(self.energy) and 0.0 < self.energy <= 1.0):
            raise ConfigError(
                f"--energy must be in (0, 1] (the fraction of squared singular values to keep), "
                f"got {self.energy!r}"
            )
        if not _is_int(self.power_iters) or self.power_iters < 0:
            raise ConfigError(f"--power-iters must be an integer >= 0, got {self.power_iters!r}")
        if not _is_int(self.oversample) or self.oversample < 0:
            raise ConfigError(f"--oversample must be an integer >= 0, got {self.oversample!r}")
        if not _is_int(self.seed) or self.seed < 0:
            raise ConfigError(f"--seed must be an integer >= 0, got {self.seed!r}")
        if self.multiple_of is not None and (not _is_int(self.multiple_of) or self.multiple_of < 1):
            raise ConfigError(f"--multiple-of must be a positive integer, got {self.multiple_of!r}")
        if not _is_int(self.min_params) or self.min_params < 0:
            raise ConfigError(f"--min-params must be an integer >= 0, got {self.min_params!r}")
        unknown = [t for t in self.op_types if t not in OP_TYPES]
        if unknown or not self.op_types:
            raise ConfigError(
                f"--op-types takes a comma-separated subset of {','.join(OP_TYPES)}, "
                f"got {','.join(self.op_types) or 'nothing'}"
            )
        if self.conv_scheme not in CONV_SCHEMES:
            raise ConfigError(
                f"--conv-scheme must be one of {', '.join(CONV_SCHEMES)}, got {self.conv_scheme!r}"
            )
        for option, patterns in (("--include", self.include), ("--exclude", self.exclude)):
            for pattern in patterns:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ConfigError(f"{option} {pattern!r} is not a valid regular expression: {exc}") from None

    @property
    def policy(self) -> tuple[str, float]:
        """The rank policy in force as ``(name, value)``: rank, ratio (the default), energy,
        target_params, target_flops or max_error."""
        for name in ("target_params", "target_flops", "max_error"):
            if getattr(self, name) is not None:
                return name, getattr(self, name)
        if self.rank is not None:
            return "rank", self.rank
        if self.energy is not None:
            return "energy", self.energy
        return "ratio", self.ratio if self.ratio is not None else DEFAULT_RATIO

    def allocation_for(self, calibrated: bool) -> str:
        """The allocation in force: ``auto`` resolved, ``"none"`` when no global budget is spent.

        Parameters
        ----------
        calibrated : bool
            Whether calibration data is given.

        Returns
        -------
        str
            ``"energy"``, ``"weighted"``, ``"measured"`` or ``"none"`` (a per-layer policy).
        """
        if self.policy[0] not in ("target_params", "target_flops", "max_error"):
            return "none"
        if self.allocation == "auto":
            return "weighted" if calibrated else "energy"
        return self.allocation

    def runs_model(self, calibrated: bool) -> bool:
        """Whether optimizing runs the whole model in onnxruntime repeatedly (it must be in memory)."""
        return self.max_error is not None or self.allocation_for(calibrated) in ("weighted", "measured")

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON view of the configuration (used in reports)."""
        data = asdict(self)
        for key in ("include", "exclude", "op_types"):
            data[key] = list(data[key])
        data["policy"] = list(self.policy)
        return data


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
