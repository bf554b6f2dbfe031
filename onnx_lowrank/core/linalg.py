"""Low-rank factorization of weight matrices: randomized subspace iteration and exact SVD.

This module is numpy-only on purpose (no ONNX, no scipy): it is the numerical engine that
every pass, rank policy and report uses, and it must be importable and testable on its own.

Every factorization returns two factors ``A`` (m x r) and ``B`` (r x n) with ``W ~= A @ B``;
the square roots of the singular values are split into both factors
(``A = U sqrt(S)``, ``B = sqrt(S) V^T``). Balanced factors keep the intermediate activation
``X @ A`` on the same scale as the output, which matters once the factors are stored in float16.

Public functions
----------------
rsi, rsvd, svd, factorize
    Randomized subspace iteration (HMT 2011, Algorithm 4.4), the same without power
    iterations, the exact truncated SVD, and a dispatcher returning a :class:`Factorization`.
singular_values
    Leading singular values (exact up to a size limit, randomized beyond it).
relative_frobenius_error, relative_spectral_error
    How far ``A @ B`` is from ``W``.
optimal_frobenius_error, energy_rank
    Eckart-Young bounds computed from singular values, so a report can say how close a
    factorization is to the best possible one and which rank keeps a given energy.

References
----------
N. Halko, P.-G. Martinsson, J. A. Tropp, "Finding structure with randomness: probabilistic
algorithms for constructing approximate matrix decompositions", SIAM Review 53(2), 2011.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "Factorization",
    "energy_rank",
    "factorize",
    "optimal_frobenius_error",
    "relative_frobenius_error",
    "relative_spectral_error",
    "rsi",
    "rsvd",
    "singular_values",
    "squared_frobenius_norm",
    "squared_residual_norm",
    "squared_singular_values",
    "svd",
]

logger = logging.getLogger(__name__)

# Tolerances of the fast orthonormalization (see _orthonormalize and _final_basis). The ratio
# min/max of the Cholesky factor's diagonal is a cheap lower estimate of 1/cond(Y).
# - A Gram matrix formed in float32 loses eps32 * cond(Y)^2 of orthogonality: accepted while
#   the ratio is above 3e-3 (cond ~300, loss ~5e-3, harmless for an intermediate basis whose
#   only job is to keep the columns from collapsing onto the dominant singular vectors).
_FAST_GRAM_MIN_RATIO = 3e-3
# - A Gram matrix formed in float64 (from float32 data) loses only eps32 * cond(Y) (float64
#   data: eps64 * cond(Y)^2). For an intermediate basis even a loss of ~0.1 is harmless, and
#   Householder QR of float32 data corrupts the directions below eps32 * sigma_max(Y) just the
#   same, so Cholesky-QR is accepted down to 1e-6 ...
_CHOLQR_MIN_RATIO = 1e-6
# - ... and for the first pass of the final basis (CholeskyQR2: the second pass restores
#   orthogonality as long as the first one's Q has cond <~ 10) down to 1e-5 for float32 data.
_FINAL_MIN_RATIO = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-6}
# - The final basis is used without being formed (Q = Y L^-T folded into the small factors)
#   while cond(Y) <~ 100 by the diagonal ratio ...
_FUSED_MIN_RATIO = 1e-2
# - ... or while the power estimate of cond(Y) (_spectrum_estimate) is <= 1e4. Folding adds
#   float32 rounding of ~eps32 * cond(Y) <~ 1e-3 to the weakest columns of A only (the strong
#   ones stay at eps32); CholeskyQR2 of a float32 Y has rounding of the same size when it forms
#   Q. Measured against CholeskyQR2: Frobenius errors equal within 2e-9 relative on 29 matrix
#   and rank cases fused at cond(Y) 18 to 9800.
#   Needed because a power iteration without its middle normalization (below) leaves the final
#   sketch with cond(Y) ~ cond(W W^T) on it (~400 for the 2048 x 2048 benchmark matrix).
_FUSED_MAX_COND = 1e4
# - Second Cholesky-QR pass: the first pass's Q must be nearly orthonormal already, otherwise
#   the first pass was unhealthy and Householder QR takes over.
_SECOND_PASS_MIN_RATIO = 0.1

# A power iteration (one application of W W^T) skips the normalization between its W^T and W
# products while the estimate of cond(W W^T) on the sketch is at most this: float32 then still
# keeps >= 3 digits (eps32 * 1e4 ~ 1.2e-3) in the weakest direction of the unnormalized
# product, and the next normalization (or the final basis) takes over from there. Measured:
# slowly decaying spectra (sigma_i = i^-0.5, estimates ~100-650) skip, with Frobenius errors
# equal to those of the every-product scheme within 6e-9 relative; sigma_i = i^-1 at rank
# 128 (estimate 4e4), i^-3 (1e12) and geometric spectra (1e13) keep the normalization after
# every product.
_SKIP_MAX_COND = 1e4
# Power iterations of the condition estimate: 6 leave it 1-10% below cond(Y) on the sketches
# of 17 test spectra without a gap (4: up to 20% below; each step costs ~0.03 ms).
_COND_POWER_STEPS = 6

# Below this size the triangular inverse is left to LAPACK (getrf/getri); above it the
# recursive 2 x 2 block formula turns most of the work into GEMMs, ~2x faster at l ~ 256.
_TRI_INV_BLOCK = 64
# Smallest block that _times_upper still splits (smaller GEMMs lose more speed than flops).
_TRI_MUL_BLOCK = 96

# Row-block size (elements) for the float64 residual in the error measures: bounds its
# temporary memory to ~2 MiB (~6 MiB for the widest transformer weights, whose blocks keep at
# least _MIN_BLOCK_ROWS rows so that the GEMMs stay efficient) however large W is. The Gram
# matrices of the exact spectra use blocks of at least n rows (see squared_singular_values).
_RESIDUAL_BLOCK_ELEMENTS = 1 << 18
_MIN_BLOCK_ROWS = 64

# energy_rank: cumulative energies are compared with a relative slack of this size so that
# hand-made spectra give the answer a human expects (0.5 + 0.3 < 0.8 in binary floating point).
_ENERGY_RTOL = 1e-9


@dataclass(frozen=True)
class Factorization:
    """Result of :func:`factorize`: ``W ~= a @ b``.

    Attributes
    ----------
    a : numpy.ndarray
        Left factor, shape (m, r), ``U_r sqrt(S_r)``.
    b : numpy.ndarray
        Right factor, shape (r, n), ``sqrt(S_r) V_r^T``.
    singular_values : numpy.ndarray
        The r singular values (estimates for the randomized methods) in descending order,
        float64, shape (r,).
    method : str
        ``"rsi"``, ``"rsvd"`` or ``"svd"``; ``"svd"`` also when a randomized method was asked
        for at ``rank >= min(m, n)``, where the exact SVD is used.
    """

    a: np.ndarray
    b: np.ndarray
    singular_values: np.ndarray
    method: str

    @property
    def rank(self) -> int:
        """Number of columns of ``a`` (= rows of ``b``)."""
        return int(self.a.shape[1])


# --------------------------------------------------------------------------------------------
# Validation (public functions only; the private helpers trust their inputs)
# --------------------------------------------------------------------------------------------


def _as_matrix(W: Any, name: str = "W", *, check_finite: bool = True) -> np.ndarray:
    """Return W as a 2-D finite floating-point ndarray, or raise ValueError.

    ``check_finite=False`` leaves the finiteness check to the caller (:func:`_finite_magnitude`,
    which proves it as a by-product of the range check of the randomized methods).
    """
    arr = np.asarray(W)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D matrix, got an array with shape {arr.shape}")
    if arr.dtype.kind != "f":
        raise ValueError(
            f"{name} must be a floating-point array (float16, float32 or float64), got dtype "
            f"{arr.dtype}; convert it first, e.g. {name}.astype(numpy.float32)"
        )
    if arr.size == 0:
        raise ValueError(f"{name} must not be empty, got shape {arr.shape}")
    if not check_finite:
        return arr
    # A finite sum proves every entry finite (NaN and Inf propagate) in one SIMD pass without
    # the boolean temporary of isfinite(W).all(); only a non-finite sum (bad entries, or an
    # overflow of huge finite ones) pays for the entry-wise check. float16 accumulates in
    # float32, where 65504-sized entries cannot overflow a sum of any realistic length.
    with np.errstate(over="ignore", invalid="ignore"):
        total = arr.sum(dtype=np.float32 if arr.dtype.itemsize < 4 else None)
    if not np.isfinite(total):
        _raise_if_not_finite(arr, name)
    return arr


def _raise_if_not_finite(arr: np.ndarray, name: str) -> None:
    """Entry-wise finiteness check with the count of bad entries in the message."""
    bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
    if bad:
        raise ValueError(f"{name} contains non-finite values (NaN or Inf): {bad} of {arr.size} entries")


def _finite_magnitude(arr: np.ndarray, name: str = "W") -> float:
    """Magnitude of W for :func:`_rsi_core`'s range check; ValueError if W has NaN or Inf.

    The randomized methods need the range check anyway, so it doubles as the finiteness check
    (no pass of its own). Fast path, for float32/float64 W in C or Fortran order: one BLAS
    pass s2 = sum(w^2) (0.4 ms at 2048 x 2048, against 0.7 ms for max + min and 0.7 ms for
    the sum of :func:`_as_matrix`). A finite s2 proves every entry finite (NaN and Inf
    propagate); ``sqrt(s2) <= 2^(E-4)`` and ``sqrt(s2 / size) >= 2^-(E-4)`` prove
    2^-E <= max|W| <= 2^E (E = _SAFE_EXPONENT; the factor 2^4 covers any rounding of the
    float32 sum), so W needs no rescaling and 1.0 is returned. Otherwise (huge or tiny
    entries, float16, strided views) the exact max|W| = max(W.max(), -W.min()): max and
    min also propagate NaN and reach any Inf.
    """
    if arr.dtype in (np.float32, np.float64) and (arr.flags.c_contiguous or arr.flags.f_contiguous):
        flat = arr.reshape(-1, order="A")  # a view for C- and Fortran-ordered W
        with np.errstate(over="ignore", invalid="ignore"):
            s2 = float(np.dot(flat, flat))
        bound = 2.0 ** (2 * (_SAFE_EXPONENT - 4))
        if np.isfinite(s2) and arr.size / bound <= s2 <= bound:
            return 1.0
    hi = float(arr.max())
    lo = float(arr.min())
    if not (np.isfinite(hi) and np.isfinite(lo)):
        _raise_if_not_finite(arr, name)
    return max(hi, -lo)


def _check_rank(rank: Any) -> int:
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if rank < 1:
        raise ValueError(f"rank must be a positive integer (>= 1), got {rank}")
    return int(rank)


def _check_nonneg_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def _dtypes(arr: np.ndarray, compute_dtype: Any) -> tuple[np.dtype, np.dtype]:
    """(output dtype, compute dtype) for an input array.

    float16 (and anything of 4 bytes or less) computes and returns float32: numpy has no
    half-precision LAPACK and float16 GEMMs are emulated and slow. Wider floats (float64,
    longdouble) compute and return float64, LAPACK's widest real type.
    """
    out = np.dtype(np.float32) if arr.dtype.itemsize <= 4 else np.dtype(np.float64)
    if compute_dtype is None:
        return out, out
    comp = np.dtype(compute_dtype)
    if comp not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"compute_dtype must be None, numpy.float32 or numpy.float64, got {compute_dtype!r}")
    return out, comp


def _prepare(W: np.ndarray, comp: np.dtype) -> np.ndarray:
    """W in the compute dtype without copying when possible.

    C- or Fortran-ordered W is passed to BLAS as it is (numpy hands transposed layouts to
    gemm as a flag); only arbitrarily strided views are made contiguous, once, instead of
    once per matrix product.
    """
    if W.dtype != comp:
        return W.astype(comp, order="K")
    if not (W.flags.c_contiguous or W.flags.f_contiguous):
        return np.ascontiguousarray(W)
    return W


def _check_spectrum(values: Any, name: str = "singular_values") -> np.ndarray:
    s = np.asarray(values, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array, got shape {s.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError(f"{name} contains non-finite values (NaN or Inf)")
    if np.any(s < 0):
        raise ValueError(f"{name} must be non-negative")
    # Descending order is what "leading values" means; sorting costs nothing at these sizes and
    # makes the functions correct for callers that pass eigenvalue-ordered (ascending) values.
    return np.sort(s)[::-1]


def _check_total_energy(total_energy: Any, s: np.ndarray) -> float:
    if total_energy is None:
        return float(np.sum(s * s))
    total = float(total_energy)
    if not np.isfinite(total) or total < 0:
        raise ValueError(f"total_energy must be a finite non-negative number, got {total_energy!r}")
    head = float(np.sum(s * s))
    # The leading values cannot hold more energy than the whole matrix; allow for rounding.
    if head > total * (1 + 1e-6) + np.finfo(np.float64).tiny:
        raise ValueError(
            f"total_energy={total:.6g} is smaller than the energy of the given singular values "
            f"({head:.6g}); pass ||W||_F^2"
        )
    return total


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


def _gaussian(rng: np.random.Generator, shape: tuple[int, int], dtype: np.dtype) -> np.ndarray:
    """Standard normal matrix by the Box-Muller transform of ``rng``'s uniforms.

    Why not ``rng.standard_normal``: its ziggurat costs ~6 ms for a 2048 x 266 float32 block
    here, as much as half a product with W; Box-Muller on uniforms is vectorized (log, sqrt,
    cos, sin run as SIMD loops) and ~2x faster. The samples are exactly Gaussian; in float32
    the tail is cut at ~5.8 sigma (u >= 2^-24), irrelevant for a sketch.
    """
    count = shape[0] * shape[1]
    half = (count + 1) // 2
    u = rng.random((2, half), dtype=dtype)
    # In place in u's two rows: no temporaries (each would be a fresh 1 MB allocation; 1.8 ms
    # instead of 2.1-4.6 ms, the same values bit for bit).
    radius = np.log1p(np.negative(u[0], out=u[0]), out=u[0])  # 1 - u in (0, 1]: never log(0)
    radius *= dtype.type(-2.0)
    np.sqrt(radius, out=radius)
    angle = np.multiply(u[1], dtype.type(2.0 * np.pi), out=u[1])
    out = np.empty(2 * half, dtype=dtype)
    np.cos(angle, out=out[:half])
    out[:half] *= radius
    np.sin(angle, out=out[half:])
    out[half:] *= radius
    return out[:count].reshape(shape)


def _tril_inv(L: np.ndarray) -> np.ndarray:
    """Inverse of a lower-triangular matrix by recursive 2 x 2 blocks.

    numpy has no trtri/trsm; np.linalg.inv ignores the structure (LU + solve with the
    identity). [[L11, 0], [L21, L22]]^-1 = [[L11^-1, 0], [-L22^-1 L21 L11^-1, L22^-1]].
    """
    k = L.shape[0]
    if k <= _TRI_INV_BLOCK:
        return np.linalg.inv(L)
    h = k // 2
    inv11 = _tril_inv(L[:h, :h])
    inv22 = _tril_inv(L[h:, h:])
    out = np.zeros_like(L)
    out[:h, :h] = inv11
    out[h:, h:] = inv22
    out[h:, :h] = -(inv22 @ (L[h:, :h] @ inv11))
    return out


def _times_upper(Y: np.ndarray, U: np.ndarray) -> np.ndarray:
    """Y @ U for an upper-triangular U, skipping the zero lower-left blocks.

    numpy has no trmm. [Y1 Y2] @ [[U11, U12], [0, U22]] = [Y1 U11, Y @ [U12; U22]]: one GEMM for
    the right half, then the same on the left. At l = 266 (blocks 133, 67, 66) that is 69% of
    the flops of Y @ U; measured 1.29 against 1.55 ms for 2048 x 266 x 266 in float32. The
    blocks are written in place (numpy passes column slices of ``out`` to BLAS as they are).
    """
    out = np.empty((Y.shape[0], U.shape[1]), dtype=np.result_type(Y, U))
    k = U.shape[0]
    while k >= _TRI_MUL_BLOCK:
        h = k // 2
        np.matmul(Y[:, :k], U[:k, h:k], out=out[:, h:k])
        k = h
    np.matmul(Y[:, :k], U[:k, :k], out=out[:, :k])
    return out


def _gram64(Y: np.ndarray) -> np.ndarray:
    """Y^T Y in float64 (numpy sends X.T @ X to syrk, half the flops of a GEMM)."""
    Y64 = Y if Y.dtype == np.float64 else Y.astype(np.float64)
    return Y64.T @ Y64


def _cholesky_inverse(G: np.ndarray, min_ratio: float) -> tuple[np.ndarray | None, float]:
    """(L^-1, diag ratio) for G = L L^T, or (None, ratio) when G is too ill-conditioned."""
    try:
        L = np.linalg.cholesky(G)
    except np.linalg.LinAlgError:
        return None, 0.0
    d = np.diagonal(L)
    if not np.all(np.isfinite(d)) or d.max() <= 0.0:
        return None, 0.0
    ratio = float(d.min() / d.max())
    if ratio <= min_ratio:
        return None, ratio
    return _tril_inv(L), ratio


def _householder(Y: np.ndarray) -> np.ndarray:
    """Householder QR (LAPACK geqrf + orgqr): slow but robust for rank-deficient and zero Y."""
    logger.debug("Cholesky-QR rejected for a %d x %d block; using Householder QR", *Y.shape)
    Q, _ = np.linalg.qr(Y, mode="reduced")
    return Q


def _spectrum_estimate(G: np.ndarray, Linv: np.ndarray) -> tuple[float, float]:
    """Estimates of (||Y||_2, cond(Y)) for G = Y^T Y = L L^T.

    Power iterations on G and on G^-1 = L^-T L^-1 (l x l matrix-vector products, ~0.3 ms at
    l = 266 in the pipeline, against ~4 ms for the orthonormalization itself). The min/max
    ratio of L's diagonal, the tiers' test, underestimates cond(Y) of a Gaussian sketch 5-10x
    (1.9 against 15 for the first sketch of the 2048 x 2048 benchmark matrix); the power
    estimate is 7% low there (14.0). Both are lower bounds, so the larger one is returned.
    """
    # Deterministic starts weighted towards the large columns of Y (diag G) and, for G^-1,
    # towards the columns that Cholesky found weakest (diag L^-1 = 1 / diag L).
    x = np.diagonal(G).copy()
    y = np.diagonal(Linv) ** 2
    for _ in range(_COND_POWER_STEPS):
        x = G @ x
        y = (Linv @ y) @ Linv  # L^-T L^-1 y, as a row vector
        x *= 1.0 / np.sqrt(x @ x)
        y *= 1.0 / np.sqrt(y @ y)
    w = Linv @ y
    big = float(x @ (G @ x))  # Rayleigh quotients: <= lambda_max(G), <= 1 / lambda_min(G)
    small_inv = float(w @ w)
    d = np.diagonal(Linv)
    diag = float(d.max() / d.min())
    if not (big > 0.0 and small_inv > 0.0 and np.isfinite(big * small_inv)):
        return float(np.sqrt(max(big, 0.0))), np.inf
    return float(np.sqrt(big)), max(float(np.sqrt(big * small_inv)), diag)


def _orthonormalize(Y: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Well-conditioned basis Q of range(Y) for the next power-iteration product, ||Y||, cond(Y).

    Cholesky-QR, Q = Y L^-T with L L^T = Y^T Y: one syrk, an l x l Cholesky and triangular
    inverse, one thin GEMM. Householder QR of the same 2048 x 266 float32 block costs about
    three products with W (geqrf/orgqr are memory bound), which is why scikit-learn's
    randomized_svd spends most of its time outside the products with W.
    Tiers: float32 Gram (fastest) -> float64 Gram (mixed precision, for cond(Y) up to ~1e6)
    -> Householder (zero or rank-deficient Y, or spectra falling by more than ~1e6 across the
    sketch). The estimates of ||Y||_2 and cond(Y) (:func:`_spectrum_estimate`; after
    Householder 1.0 and inf) tell the caller whether, and at which scale, the next
    normalization may be skipped.
    """
    if Y.dtype == np.float32:
        G = (Y.T @ Y).astype(np.float64)
        Linv, _ = _cholesky_inverse(G, _FAST_GRAM_MIN_RATIO)
        if Linv is not None:
            return (_times_upper(Y, Linv.T.astype(np.float32)), *_spectrum_estimate(G, Linv))
    G = _gram64(Y)
    Linv, _ = _cholesky_inverse(G, _CHOLQR_MIN_RATIO)
    if Linv is not None:
        return (_times_upper(Y, Linv.T.astype(Y.dtype)), *_spectrum_estimate(G, Linv))
    return _householder(Y), 1.0, np.inf


def _final_basis(Y: np.ndarray, *, allow_fused: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Basis of range(Y) for the Rayleigh-Ritz step, as (X, T) with Q = X @ T orthonormal.

    T is None when X itself is orthonormal. The final basis must be orthonormal to working
    precision (Q Q^T W is the approximation), not just well-conditioned:
    - fused (float32, cond(Y) <~ 1e4): X = Y, T = L^-T from the float64 Gram; Q is never
      formed, T is folded into the small l x l problem and the two final thin GEMMs;
    - CholeskyQR2: a second pass on the first pass's Q restores orthogonality to eps;
    - Householder QR when Cholesky-QR is rejected.
    """
    G = _gram64(Y)
    Linv, ratio = _cholesky_inverse(G, _FINAL_MIN_RATIO[Y.dtype])
    if Linv is None:
        return _householder(Y), None
    if allow_fused and (ratio > _FUSED_MIN_RATIO or _spectrum_estimate(G, Linv)[1] <= _FUSED_MAX_COND):
        return Y, Linv.T
    Q1 = _times_upper(Y, Linv.T.astype(Y.dtype))
    Linv2, _ = _cholesky_inverse(_gram64(Q1), _SECOND_PASS_MIN_RATIO)
    if Linv2 is None:
        return _householder(Y), None
    return _times_upper(Q1, Linv2.T.astype(Y.dtype)), None


# --------------------------------------------------------------------------------------------
# Cores (no validation)
# --------------------------------------------------------------------------------------------


def _exact_core(
    W: np.ndarray, rank: int, out: np.dtype, comp: np.dtype
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Truncated exact SVD via LAPACK gesdd in the compute dtype."""
    Wc = _prepare(W, comp)
    U, s, Vt = np.linalg.svd(Wc, full_matrices=False)
    r = min(rank, s.shape[0])
    root = np.sqrt(s[:r])
    A = (U[:, :r] * root.astype(U.dtype)).astype(out, copy=False)
    B = (Vt[:r] * root.astype(Vt.dtype)[:, None]).astype(out, copy=False)
    return A, B, s[:r].astype(np.float64)


#: Weights whose largest magnitude lies outside [2^-40, 2^40] are rescaled by a power of two
#: before the randomized methods run: their float32 products (Y = W Omega, the Gram matrices of
#: the thin factors) would overflow or underflow (seen: |w| ~ 1e19 broke eigh, |w| ~ 1e-23
#: gave zero factors, subnormal weights NaN). A power of two is exact, so ordinary weights are
#: untouched and rescaled ones lose nothing.
_SAFE_EXPONENT = 40


def _rsi_core(
    W: np.ndarray,
    rank: int,
    power_iters: int,
    oversample: int,
    seed: int | None,
    out: np.dtype,
    comp: np.dtype,
    magnitude: float | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """:func:`_rsi_unscaled` on ``W`` brought to a safe range by an exact power of two.

    ``magnitude`` is :func:`_finite_magnitude`'s answer when the caller has it already.
    """
    peak = _finite_magnitude(W) if magnitude is None else magnitude
    if peak == 0.0 or not np.isfinite(peak) or abs(np.log2(peak)) <= _SAFE_EXPONENT:
        return _rsi_unscaled(W, rank, power_iters, oversample, seed, out, comp)
    e = -int(np.round(np.log2(peak)))  # W * 2^e has its largest entry near 1
    e -= e % 2  # even, so that 2^(-e/2) splits exactly into the two factors
    scaled = np.ldexp(W.astype(comp if W.dtype != comp else W.dtype), e)
    A, B, s, used = _rsi_unscaled(scaled, rank, power_iters, oversample, seed, out, comp)
    half = -e // 2
    A = np.ldexp(A, half).astype(out, copy=False)
    B = np.ldexp(B, half).astype(out, copy=False)
    return A, B, np.ldexp(np.asarray(s, dtype=np.float64), -e), used


def _rsi_unscaled(
    W: np.ndarray,
    rank: int,
    power_iters: int,
    oversample: int,
    seed: int | None,
    out: np.dtype,
    comp: np.dtype,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """HMT 2011 Algorithm 4.4 followed by Algorithm 5.1 (SVD of the small Q^T W).

    The 2q + 2 products with W are the floor of the cost; everything else is kept to thin
    l-column operations (l = rank + oversample). W is never copied or transposed in memory:
    ``Wc.T`` is a view that numpy passes to BLAS as a transpose flag.
    """
    m, n = W.shape
    k = min(m, n)
    if rank >= k:
        # The whole spectrum is asked for: the exact SVD is both cheaper and exact.
        A, B, s = _exact_core(W, rank, out, comp)
        return A, B, s, "svd"
    # Sketch size clamped to min(m, n): more columns than that cannot add to the range.
    ell = min(rank + oversample, k)
    Wc = _prepare(W, comp)
    rng = np.random.default_rng(seed)
    Y = Wc @ _gaussian(rng, (n, ell), comp)
    # One power iteration applies W W^T. Its input is always orthonormalized (HMT 2011,
    # Section 4.5: unnormalized iterations collapse the float32 columns onto the dominant
    # singular vector). The normalization between W^T and W is skipped when W W^T spreads the
    # sketch by at most _SKIP_MAX_COND, so that float32 still resolves the weakest direction of
    # the unnormalized product to ~eps32 * 1e4 ~ 1e-3; the next normalization (or the final
    # basis) takes over from there. The spread is estimated from the orthonormalized input:
    # cond(Y)^2 while Y = W @ (orthonormal or Gaussian), cond(Y) itself once Y = W W^T @
    # (orthonormal). The first estimate can be low (up to 31x in the measurements) where a
    # flat tail of the spectrum fills the weakest columns of W Omega; the directions that lose
    # digits are then tail directions, which do not enter the rank-r error (measured: errors
    # equal to those of the every-product scheme within 6e-9 relative on 68 matrix and rank
    # cases; see docs/performance.md).
    squared = True
    for _ in range(power_iters):
        Q, norm, cond = _orthonormalize(Y)
        Z = Wc.T @ Q
        exposed = cond * cond if squared else cond
        if exposed <= _SKIP_MAX_COND:
            # Unnormalized, W W^T Q would carry ||W||^2: its float32 Gram matrix overflows
            # for ||W|| >~ 1e9 (and underflows for tiny W). 1 / ||Y|| ~ 1 / ||W|| keeps the
            # product at the scale of W, as a normalization would.
            Z *= Z.dtype.type(1.0 / norm)
            squared = False
        else:
            Z = _orthonormalize(Z)[0]
            squared = True
        Y = Wc @ Z
    fused = comp == np.float32
    X, T = _final_basis(Y, allow_fused=fused)
    # B^T = (Q^T W)^T = W^T Q: the last product with W, as a view-transposed GEMM.
    Bt = Wc.T @ X  # n x ell (times T when fused)
    if comp == np.float64:
        # The Gram matrix below would square the condition number and lose half of the 16
        # digits float64 data has: take the SVD of the small ell x n block itself (gesdd).
        U_small, s, Vt = np.linalg.svd(Bt.T, full_matrices=False)
        U_small, s, Vt = U_small[:, :rank], s[:rank], Vt[:rank]
        root = np.sqrt(s)
        A = (X @ (U_small * root)).astype(out, copy=False)
        B = (Vt * root[:, None]).astype(out, copy=False)
        return A, B, s, "rsi" if power_iters else "rsvd"
    # float32 data: eigendecomposition of the float64 Gram matrix Q^T W W^T Q (ell x ell).
    # It squares the condition number, which costs 8 of float64's 16 digits, still more than
    # float32 data carries, and it is ~8x faster than an SVD of the ell x n block.
    H = _gram64(Bt)
    if T is not None:
        # T^T H T = (H T)^T T for symmetric H: two products with the upper-triangular T.
        H = _times_upper(_times_upper(H, T).T, T)
    _, V = np.linalg.eigh(H)  # ascending eigenvalues
    V = V[:, ::-1][:, :rank]  # eigenvectors of the top `rank` eigenvalues, descending
    M = V if T is None else T @ V  # Q @ V = X @ M: left singular vectors of Q Q^T W
    # C = U^T W = M^T X^T W = M^T Bt^T: one thin GEMM, written C-contiguous (r x n).
    C = M.T.astype(np.float32) @ Bt.T
    # The singular values are taken as the row norms of C, not as sqrt(eigenvalues): the
    # Gram matrix resolves sigma only down to ~1e-8 sigma_1, the row norms to float32
    # precision, and they are consistent with the rows by construction, so dividing a row by
    # its own norm can never blow up (zero rows, from zero or rank-deficient W, stay zero).
    s = np.sqrt(np.einsum("ij,ij->i", C, C, dtype=np.float64))
    order = np.argsort(-s, kind="stable")  # rounding can swap near-equal neighbours
    if np.any(order != np.arange(order.size)):
        s, M, C = s[order], M[:, order], C[order]
    root = np.sqrt(s)
    inv_root = np.zeros_like(root)
    np.divide(1.0, root, out=inv_root, where=root > 0.0)
    # A = U S^1/2 = X M S^1/2 and B = S^1/2 V^T = S^-1/2 C.
    A = X @ (M * root).astype(np.float32)
    C *= inv_root.astype(np.float32)[:, None]  # in place: C is not needed any more
    B = C
    return A.astype(out, copy=False), B.astype(out, copy=False), s, "rsi" if power_iters else "rsvd"


# --------------------------------------------------------------------------------------------
# Public factorization API
# --------------------------------------------------------------------------------------------


def rsi(
    W: Any,
    rank: int,
    *,
    power_iters: int = 2,
    oversample: int = 10,
    seed: int | None = 0,
    compute_dtype: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Rank-``rank`` factorization ``W ~= A @ B`` by randomized subspace iteration.

    Parameters
    ----------
    W : array_like, shape (m, n)
        Real floating-point matrix (float16, float32 or float64), finite.
    rank : int
        Target rank r >= 1. ``rank >= min(m, n)`` returns the exact full SVD factors
        (``A @ B == W`` to rounding) with r = min(m, n).
    power_iters : int, default 2
        Number q of power iterations (multiplications by W^T and W). Each one raises the
        decay of the unwanted spectrum by two powers; q = 2 is within ~1.5% of the optimal
        Frobenius error on slowly decaying spectra (see Notes), q = 0 is plain RSVD.
    oversample : int, default 10
        Extra sketch columns p (HMT 2011 recommend 5-10); the sketch has
        ``min(rank + oversample, min(m, n))`` columns.
    seed : int or None, default 0
        Seed of ``numpy.random.default_rng`` for the Gaussian test matrix. A fixed seed
        gives bit-identical factors on the same machine and BLAS.
    compute_dtype : {None, numpy.float32, numpy.float64}, default None
        Working precision of the large products. None computes in float32 for float16 and
        float32 input and in float64 for float64 input.

    Returns
    -------
    A : numpy.ndarray, shape (m, r)
        ``U_r sqrt(S_r)``.
    B : numpy.ndarray, shape (r, n)
        ``sqrt(S_r) V_r^T``.
        Both factors are float32 for float16 and float32 input (numpy has no half-precision
        LAPACK; cast them back with ``.astype(numpy.float16)`` if needed) and float64 for
        float64 input, whatever ``compute_dtype`` is.

    Raises
    ------
    ValueError
        If W is not a 2-D floating-point array, contains NaN or Inf, or if rank,
        power_iters or oversample is not a valid integer.

    Notes
    -----
    Algorithm 4.4 of HMT 2011 (randomized subspace iteration), then Algorithm 5.1: the SVD of
    the small ``Q^T W`` gives the factors. Without normalization, float32 rounding collapses
    the sketch onto the dominant singular vectors, so the input of every power iteration
    (one application of W W^T) is orthonormalized. The normalization between W^T and W
    inside an iteration is skipped only while W W^T spreads the sketch by less than 1e4
    (estimated from the condition number of the sketch), where float32 still keeps >= 3
    digits in the weakest direction; steeper spectra (e.g. sigma_i = i^-1 at rank 128, or
    i^-3) are orthonormalized after *every* product with W or W^T.

    Speed: the cost is dominated by the 2q + 2 products of W with a thin matrix, which are
    done in the input's precision without copying or transposing W. The orthonormalizations
    use Cholesky-QR with the Gram matrix in float32 or float64 (a second pass or an implicit
    basis for the final one), falling back to Householder QR when the block is too
    ill-conditioned (zero, rank deficient or fast decaying spectra). The small SVD uses the
    float64 Gram matrix for float32 data and LAPACK's SVD for float64 data. See
    docs/performance.md.

    Accuracy measured on 2048 x 2048 float32 with sigma_i = i^-0.5, rank 256, p = 10: the
    Frobenius error is ~1.01x the Eckart-Young optimum at q = 2 (1.25x at q = 0), the
    spectral error ~1.15x sigma_{r+1}.

    References
    ----------
    N. Halko, P.-G. Martinsson, J. A. Tropp, "Finding structure with randomness:
    probabilistic algorithms for constructing approximate matrix decompositions",
    SIAM Review 53(2), 217-288, 2011. Algorithms 4.4 and 5.1.
    """
    arr = _as_matrix(W, check_finite=False)
    magnitude = _finite_magnitude(arr)  # also the finiteness check
    rank = _check_rank(rank)
    power_iters = _check_nonneg_int(power_iters, "power_iters")
    oversample = _check_nonneg_int(oversample, "oversample")
    out, comp = _dtypes(arr, compute_dtype)
    A, B, _, _ = _rsi_core(arr, rank, power_iters, oversample, seed, out, comp, magnitude)
    return A, B


def rsvd(
    W: Any,
    rank: int,
    *,
    oversample: int = 10,
    seed: int | None = 0,
    compute_dtype: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Plain randomized SVD: :func:`rsi` with ``power_iters=0``.

    Parameters
    ----------
    W : array_like, shape (m, n)
        Real floating-point matrix, finite.
    rank : int
        Target rank r >= 1 (``rank >= min(m, n)`` gives the exact SVD factors).
    oversample : int, default 10
        Extra sketch columns.
    seed : int or None, default 0
        Seed of the Gaussian test matrix.
    compute_dtype : {None, numpy.float32, numpy.float64}, default None
        Working precision (see :func:`rsi`).

    Returns
    -------
    A : numpy.ndarray, shape (m, r)
    B : numpy.ndarray, shape (r, n)

    Notes
    -----
    One pass of W plus the projection: two products with W in total, about a third of the
    cost of ``rsi(power_iters=2)``, but on slowly decaying spectra (typical of trained
    weights) its Frobenius error is ~25% above the optimum instead of ~1.5%.

    References
    ----------
    N. Halko, P.-G. Martinsson, J. A. Tropp, SIAM Review 53(2), 2011, Algorithms 4.1 and 5.1.
    """
    return rsi(W, rank, power_iters=0, oversample=oversample, seed=seed, compute_dtype=compute_dtype)


def svd(W: Any, rank: int, *, compute_dtype: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact truncated SVD factors (LAPACK gesdd): the Eckart-Young optimum.

    Parameters
    ----------
    W : array_like, shape (m, n)
        Real floating-point matrix, finite.
    rank : int
        Target rank r >= 1; clamped to min(m, n).
    compute_dtype : {None, numpy.float32, numpy.float64}, default None
        Precision of the SVD (None: float32 for float16/float32 input, float64 otherwise).

    Returns
    -------
    A : numpy.ndarray, shape (m, r)
        ``U_r sqrt(S_r)``.
    B : numpy.ndarray, shape (r, n)
        ``sqrt(S_r) V_r^T``. Output dtypes as in :func:`rsi`.

    Notes
    -----
    Costs O(m n min(m, n)) whatever the rank: ~3 s for 2048 x 2048 on 2 cores, 10-20x slower
    than :func:`rsi`. Use it as the reference or for small matrices.

    References
    ----------
    C. Eckart, G. Young, "The approximation of one matrix by another of lower rank",
    Psychometrika 1, 1936. N. Halko, P.-G. Martinsson, J. A. Tropp, SIAM Review 53(2), 2011.
    """
    arr = _as_matrix(W)
    rank = _check_rank(rank)
    out, comp = _dtypes(arr, compute_dtype)
    A, B, _ = _exact_core(arr, rank, out, comp)
    return A, B


def factorize(
    W: Any,
    rank: int,
    *,
    method: str = "rsi",
    power_iters: int = 2,
    oversample: int = 10,
    seed: int | None = 0,
    compute_dtype: Any = None,
) -> Factorization:
    """Factorize W with the named method and return the factors with the singular values.

    Parameters
    ----------
    W : array_like, shape (m, n)
        Real floating-point matrix, finite.
    rank : int
        Target rank r >= 1; the result has ``min(rank, m, n)`` components.
    method : {"rsi", "rsvd", "svd"}, default "rsi"
        Randomized subspace iteration (:func:`rsi`), plain randomized SVD (:func:`rsvd`,
        ignores ``power_iters``) or exact SVD (:func:`svd`, ignores the randomized options).
    power_iters, oversample, seed, compute_dtype
        As in :func:`rsi`.

    Returns
    -------
    Factorization
        ``a``, ``b``, ``singular_values`` (float64, descending; estimates for the randomized
        methods) and ``method`` (the one actually used: ``"svd"`` when ``rank >= min(m, n)``).

    Notes
    -----
    The randomized estimates of the leading singular values are accurate to a fraction of a
    percent with q = 2 on slowly decaying spectra; use :func:`singular_values` when exact
    values are needed.

    References
    ----------
    N. Halko, P.-G. Martinsson, J. A. Tropp, SIAM Review 53(2), 2011.
    """
    arr = _as_matrix(W, check_finite=False)
    magnitude = _finite_magnitude(arr)  # also the finiteness check
    rank = _check_rank(rank)
    power_iters = _check_nonneg_int(power_iters, "power_iters")
    oversample = _check_nonneg_int(oversample, "oversample")
    out, comp = _dtypes(arr, compute_dtype)
    if method == "svd":
        A, B, s = _exact_core(arr, rank, out, comp)
        used = "svd"
    elif method in ("rsi", "rsvd"):
        q = power_iters if method == "rsi" else 0
        A, B, s, used = _rsi_core(arr, rank, q, oversample, seed, out, comp, magnitude)
    else:
        raise ValueError(f"method must be one of 'rsi', 'rsvd', 'svd', got {method!r}")
    return Factorization(a=A, b=B, singular_values=np.asarray(s, dtype=np.float64), method=used)


# --------------------------------------------------------------------------------------------
# Spectra and error measures
# --------------------------------------------------------------------------------------------


def squared_singular_values(W: Any, k: int, *, exact_limit: int = 2048) -> np.ndarray:
    """The leading ``min(k, m, n)`` squared singular values of W (energies), descending, float64.

    Rank policies, allocation and error bounds only use energies. Up to ``exact_limit`` on the
    small side they are the eigenvalues of the float64 Gram matrix of the small side: exact to
    about 1e-16 of ``||W||_2^2`` in absolute terms (enough for tail sums), and far cheaper than
    LAPACK's SVD of a tall matrix (4608 x 512: 0.2 s instead of 4 s here). Beyond, the RSI
    estimate of :func:`singular_values`, squared.
    """
    arr = _as_matrix(W)
    k = min(_check_rank(k), min(arr.shape))
    if min(arr.shape) > exact_limit:
        return np.square(singular_values(arr, k=k, exact_limit=exact_limit))
    # The Gram matrix of the small side (n x n), accumulated over float64 blocks of the long
    # side: no float64 copy of W (a 1280 x 1000 classifier's is 10 MiB next to a 7.6 MiB Gram).
    # Blocks have at least n rows: each later block's n x n product is as large as the Gram
    # matrix, and thinner blocks would only add products and page faults (2.3x slower for
    # 8192 x 2048). The first block's product is the Gram matrix itself.
    tall = arr if arr.shape[0] >= arr.shape[1] else arr.T
    rows = max(_block_rows(tall.shape[1]), tall.shape[1])
    gram = None
    for i in range(0, tall.shape[0], rows):
        block = tall[i : i + rows].astype(np.float64)
        if gram is None:
            gram = block.T @ block  # syrk
        else:
            gram += block.T @ block
        del block  # eigvalsh copies the Gram matrix: the last block need not stay resident
    return np.clip(np.linalg.eigvalsh(gram)[::-1][:k], 0.0, None)


def singular_values(
    W: Any,
    *,
    k: int | None = None,
    exact_limit: int = 2048,
    power_iters: int = 2,
    oversample: int = 10,
    seed: int | None = 0,
) -> np.ndarray:
    """Leading singular values of W, descending, float64.

    Parameters
    ----------
    W : array_like, shape (m, n)
        Real floating-point matrix, finite.
    k : int or None, default None
        Number of values; None returns all min(m, n) of them (always exact).
    exact_limit : int, default 2048
        When ``min(m, n) <= exact_limit`` (or k is None) the values are exact: LAPACK SVD
        without vectors, in float64. Above it, the top-k values are estimated by :func:`rsi`
        (the exact SVD of a 4096 x 4096 matrix takes tens of seconds here).
    power_iters, oversample, seed
        Options of the randomized estimate (see :func:`rsi`).

    Returns
    -------
    numpy.ndarray, shape (min(k, m, n),)
        Singular values in descending order.

    Notes
    -----
    The randomized estimates are lower bounds of the true values in exact arithmetic
    (Rayleigh-Ritz on a subspace); with q = 2 the leading ones are accurate to well under 1%
    on the slowly decaying spectra of trained weights.

    References
    ----------
    N. Halko, P.-G. Martinsson, J. A. Tropp, SIAM Review 53(2), 2011.
    """
    arr = _as_matrix(W)
    if k is not None:
        k = _check_rank(k)
    if not isinstance(exact_limit, (int, np.integer)) or isinstance(exact_limit, bool):
        raise ValueError(f"exact_limit must be an integer, got {exact_limit!r}")
    power_iters = _check_nonneg_int(power_iters, "power_iters")
    oversample = _check_nonneg_int(oversample, "oversample")
    small = min(arr.shape)
    if k is None or small <= exact_limit or k >= small:
        s = np.linalg.svd(arr.astype(np.float64), compute_uv=False)
        return s if k is None else s[:k]
    out, comp = _dtypes(arr, None)
    _, _, s, _ = _rsi_core(arr, k, power_iters, oversample, seed, out, comp)
    return np.asarray(s, dtype=np.float64)


def _block_rows(n: int) -> int:
    """Rows per block of a float64 temporary with ``n`` columns (see _RESIDUAL_BLOCK_ELEMENTS)."""
    return max(_MIN_BLOCK_ROWS, _RESIDUAL_BLOCK_ELEMENTS // max(n, 1))


def _residual_row_blocks(W: np.ndarray, A: np.ndarray, B: np.ndarray):
    """Yield float64 blocks of A @ B - W, a few rows at a time (bounded temporary memory).

    The sign is the residual's opposite: the block is A_i @ B minus W_i in place, one float64
    temporary per block; every caller uses the residual's norm only.
    """
    m, n = W.shape
    rows = _block_rows(n)
    B64 = B.astype(np.float64)
    for i in range(0, m, rows):
        E = A[i : i + rows].astype(np.float64) @ B64
        E -= W[i : i + rows]
        yield E


def _check_factors(W: np.ndarray, A: Any, B: Any) -> tuple[np.ndarray, np.ndarray]:
    A = np.asarray(A)
    B = np.asarray(B)
    if A.ndim != 2 or B.ndim != 2:
        raise ValueError(f"A and B must be 2-D, got shapes {A.shape} and {B.shape}")
    m, n = W.shape
    if A.shape[0] != m or B.shape[1] != n or A.shape[1] != B.shape[0]:
        raise ValueError(f"shapes do not chain: W {W.shape}, A {A.shape}, B {B.shape}; need A (m, r) and B (r, n)")
    for name, x in (("A", A), ("B", B)):
        if x.dtype.kind != "f":
            raise ValueError(f"{name} must be a floating-point array, got dtype {x.dtype}")
        if x.size and not np.all(np.isfinite(x)):
            raise ValueError(f"{name} contains non-finite values (NaN or Inf)")
    return A, B


def squared_frobenius_norm(W: Any) -> float:
    """``||W||_F^2`` accumulated in float64, without a float64 copy of W.

    Parameters
    ----------
    W : array_like
        Real floating-point array of any shape.

    Returns
    -------
    float
        The sum of the squares of W's entries.

    Notes
    -----
    ``np.sum(np.square(W, dtype=np.float64))`` would hold a float64 copy of W (10 MiB for a
    1280 x 1000 float32 classifier); einsum casts through a small buffer instead.
    """
    arr = np.asarray(W)
    axes = "abcdefghijklmnopqrstuvwxyz"[: arr.ndim]
    return float(np.einsum(f"{axes},{axes}->", arr, arr, dtype=np.float64))


def squared_residual_norm(W: Any, A: Any, B: Any) -> float:
    """``||W - A B||_F^2`` in float64, the residual formed ~2 MiB of rows at a time.

    Parameters
    ----------
    W : array_like, shape (m, n)
    A : array_like, shape (m, r)
    B : array_like, shape (r, n)

    Returns
    -------
    float
    """
    arr = _as_matrix(W)
    A, B = _check_factors(arr, A, B)
    return float(sum(np.einsum("ij,ij->", E, E) for E in _residual_row_blocks(arr, A, B)))


def relative_frobenius_error(W: Any, A: Any, B: Any) -> float:
    """Relative Frobenius error ``||W - A B||_F / ||W||_F``, computed in float64.

    Parameters
    ----------
    W : array_like, shape (m, n)
    A : array_like, shape (m, r)
    B : array_like, shape (r, n)

    Returns
    -------
    float
        The relative error; 0.0 when W and A @ B are both zero, inf when only W is zero.

    Notes
    -----
    The residual is formed a block of rows at a time, so the extra memory stays ~2 MiB
    for any size of W.
    """
    arr = _as_matrix(W)
    num = squared_residual_norm(arr, A, B)
    den = squared_frobenius_norm(arr)
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return float(np.sqrt(num / den))


def relative_spectral_error(W: Any, A: Any, B: Any) -> float:
    """Relative spectral error ``||W - A B||_2 / ||W||_2`` (largest singular values), float64.

    Parameters
    ----------
    W : array_like, shape (m, n)
    A : array_like, shape (m, r)
    B : array_like, shape (r, n)

    Returns
    -------
    float
        The relative error; 0.0 when W and A @ B are both zero, inf when only W is zero.

    Notes
    -----
    Exact (LAPACK SVD without vectors of the float64 residual), so it costs about as much as
    an exact SVD of W; meant for tests, reports on small layers and benchmarks.
    """
    arr = _as_matrix(W)
    A, B = _check_factors(arr, A, B)
    E = np.concatenate(list(_residual_row_blocks(arr, A, B)), axis=0)
    num = float(np.linalg.norm(E, 2))
    den = float(np.linalg.norm(arr.astype(np.float64), 2))
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den


def optimal_frobenius_error(
    singular_values: Any, rank: int, *, total_energy: float | None = None
) -> float:
    """Eckart-Young optimum of the relative Frobenius error of a rank-``rank`` approximation.

    ``sqrt(sum_{i > rank} s_i^2 / total)`` with ``total = sum_i s_i^2``.

    Parameters
    ----------
    singular_values : array_like, shape (k,)
        Singular values of W (any order; they are sorted descending). All of them, or only
        the leading ones when ``total_energy`` is given.
    rank : int
        Rank r >= 0 of the approximation; r >= k gives the tail of the given values
        (0.0 when all values are given).
    total_energy : float, optional
        ``||W||_F^2``. Lets the caller pass only the leading singular values (e.g. the
        randomized estimates): the tail energy is then ``total_energy - sum_{i <= r} s_i^2``.

    Returns
    -------
    float
        The optimal relative error in [0, 1]; 0.0 for a zero matrix.

    References
    ----------
    C. Eckart, G. Young, Psychometrika 1, 1936.
    """
    s = _check_spectrum(singular_values)
    rank = _check_nonneg_int(rank, "rank")
    total = _check_total_energy(total_energy, s)
    if total == 0.0:
        return 0.0
    if total_energy is None:
        # Summing the tail directly is exact to rounding; total - head would cancel when the
        # tail is tiny.
        tail = float(np.sum(s[rank:] ** 2))
    else:
        tail = max(total - float(np.sum(s[:rank] ** 2)), 0.0)
    return float(min(np.sqrt(tail / total), 1.0))


def energy_rank(singular_values: Any, energy: float, *, total_energy: float | None = None) -> int:
    """Smallest rank r whose leading singular values keep ``energy`` of the squared total.

    Parameters
    ----------
    singular_values : array_like, shape (k,)
        Singular values of W (any order; sorted descending here).
    energy : float
        Fraction in (0, 1] of ``sum s_i^2`` (or of ``total_energy``) to keep.
    total_energy : float, optional
        ``||W||_F^2``, when only the leading singular values are given.

    Returns
    -------
    int
        The smallest r with ``sum_{i <= r} s_i^2 >= energy * total`` (compared with a
        relative slack of 1e-9 so that rounding does not push a hand-made exact answer up
        by one). At least 1 for a nonzero matrix; **0 for a zero matrix** (there is nothing
        to keep: a rank policy should leave such a layer alone or drop it).

    Raises
    ------
    ValueError
        If energy is outside (0, 1], or if the given leading values do not reach the
        requested energy of ``total_energy`` (more values are needed to answer).
    """
    s = _check_spectrum(singular_values)
    energy = float(energy)
    if not (0.0 < energy <= 1.0):
        raise ValueError(f"energy must be in (0, 1], got {energy!r}")
    total = _check_total_energy(total_energy, s)
    if total == 0.0:
        return 0
    cumulative = np.cumsum(s * s)
    target = energy * total * (1.0 - _ENERGY_RTOL)
    r = int(np.searchsorted(cumulative, target, side="left")) + 1
    if r > s.size:
        # Only possible with total_energy: the given values hold less than the target.
        # A shortfall within float32 rounding of ||W||_F^2 counts as reached.
        if cumulative[-1] >= energy * total * (1.0 - 1e-6):
            return int(s.size)
        raise ValueError(
            f"the {s.size} given singular values hold {cumulative[-1] / total:.4g} of the energy, "
            f"less than the requested {energy}; pass more singular values"
        )
    return max(r, 1)
