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
    "svd",
]

logger = logging.getLogger(__name__)

# Cholesky-QR is accepted only while the Cholesky factor's diagonal spread stays below this
# bound (a cheap lower estimate of cond(Y)). With the Gram matrix formed in float64 from float32
# data, Q = Y R^-1 loses about eps32 * cond(Y) of orthogonality; 1e-4 keeps that loss below
# ~1e-3 even when the diagonal underestimates cond(Y) by 10x. For float64 data the Gram matrix
# has the working precision, the loss is eps64 * cond(Y)^2, and 1e-6 keeps it below ~1e-4.
_CHOLQR_MIN_DIAG_RATIO = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-6}

# The second Cholesky-QR pass of the final basis sees the Gram matrix of the first pass's Q;
# if that is farther than this (max-norm) from the identity, the first pass was unhealthy and
# the basis is recomputed by Householder QR. A healthy first pass is at ~1e-5 in float32.
_ORTHOGONALITY_TOL = 0.1

# Row-block size (elements) for the float64 residual in the error measures: bounds their
# temporary memory to ~32 MB however large W is.
_RESIDUAL_BLOCK_ELEMENTS = 1 << 22

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


def _as_matrix(W: Any, name: str = "W") -> np.ndarray:
    """Return W as a 2-D finite floating-point ndarray, or raise ValueError."""
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
    # min/max propagate NaN and expose +-inf without the boolean temporary of isfinite(W).all().
    if not (np.isfinite(arr.min()) and np.isfinite(arr.max())):
        bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        raise ValueError(f"{name} contains non-finite values (NaN or Inf): {bad} of {arr.size} entries")
    return arr


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
# Orthonormalization
# --------------------------------------------------------------------------------------------


def _cholqr_step(Y: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
    """One Cholesky-QR pass: Q = Y R^-1 with R^T R = Y^T Y.

    Returns (Q, G) where G is the Gram matrix, or (None, None) when Y is too ill-conditioned
    for Cholesky-QR (the caller then uses Householder QR).

    Why: Householder QR of a tall thin matrix runs at a fraction of GEMM speed (geqrf + orgqr
    are memory bound; on a 2048 x 266 float32 block it costs about three products with W),
    while Cholesky-QR is one syrk, an l x l Cholesky and inverse, and one thin GEMM. The Gram
    matrix is formed in float64 even for float32 Y (mixed-precision Cholesky-QR): its
    condition number is cond(Y)^2, which float32 would lose for cond(Y) > ~3000, and the
    orthogonality loss of Q drops from eps32 * cond(Y)^2 to eps32 * cond(Y).
    """
    Y64 = Y if Y.dtype == np.float64 else Y.astype(np.float64)
    G = Y64.T @ Y64  # numpy dispatches X.T @ X to syrk (half the flops of a gemm)
    try:
        L = np.linalg.cholesky(G)
    except np.linalg.LinAlgError:
        return None, None
    d = np.diagonal(L)
    if not np.all(np.isfinite(d)) or d.min() <= _CHOLQR_MIN_DIAG_RATIO[Y.dtype] * d.max():
        return None, None
    # numpy has no triangular solve; the explicit inverse of the small l x l factor followed by
    # one GEMM is as accurate here (it is applied once, to a well-conditioned factor) and faster
    # than np.linalg.solve on the m right-hand sides.
    L_inv = np.linalg.inv(L)
    Q = Y @ L_inv.T.astype(Y.dtype)
    return Q, G


def _householder(Y: np.ndarray) -> np.ndarray:
    """Householder QR (LAPACK geqrf + orgqr); robust for rank-deficient and zero Y."""
    Q, _ = np.linalg.qr(Y, mode="reduced")
    return Q


def _orthonormalize(Y: np.ndarray, *, final: bool) -> np.ndarray:
    """Orthonormal basis of range(Y).

    Intermediate power-iteration steps only need a well-conditioned basis of the same range
    (its job is to stop the columns from collapsing onto the dominant singular vector), so one
    Cholesky-QR pass suffices. The final basis Q must be orthonormal to working precision,
    because Q Q^T W is the approximation: there a second pass (CholeskyQR2) restores
    orthogonality, and its Gram matrix tells whether the first pass worked.
    """
    Q, _ = _cholqr_step(Y)
    if Q is not None and final:
        Q2, G2 = _cholqr_step(Q)
        if Q2 is not None:
            off = np.abs(G2 - np.eye(G2.shape[0])).max()
            Q = Q2 if off <= _ORTHOGONALITY_TOL else None
        else:
            Q = None
    if Q is None:
        logger.debug("Cholesky-QR rejected for a %s x %s block; using Householder QR", *Y.shape)
        return _householder(Y)
    return Q


# --------------------------------------------------------------------------------------------
# Cores (no validation)
# --------------------------------------------------------------------------------------------


def _split_factors(
    U: np.ndarray, s: np.ndarray, Vt: np.ndarray, out: np.dtype
) -> tuple[np.ndarray, np.ndarray]:
    root = np.sqrt(s)
    A = (U * root.astype(U.dtype)).astype(out, copy=False)
    B = (Vt * root.astype(Vt.dtype)[:, None]).astype(out, copy=False)
    return A, B


def _exact_core(
    W: np.ndarray, rank: int, out: np.dtype, comp: np.dtype
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Truncated exact SVD via LAPACK gesdd in the compute dtype."""
    Wc = _prepare(W, comp)
    U, s, Vt = np.linalg.svd(Wc, full_matrices=False)
    r = min(rank, s.shape[0])
    A, B = _split_factors(U[:, :r], s[:r], Vt[:r], out)
    return A, B, s[:r].astype(np.float64)


def _rsi_core(
    W: np.ndarray,
    rank: int,
    power_iters: int,
    oversample: int,
    seed: int | None,
    out: np.dtype,
    comp: np.dtype,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """HMT 2011 Algorithm 4.4 followed by Algorithm 5.1 (direct SVD of Q^T W)."""
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
    # Drawn directly in the compute dtype: no float64 n x ell temporary and its cast.
    omega = rng.standard_normal((n, ell), dtype=comp)
    Y = Wc @ omega
    # Power iterations. W.T is a view: BLAS receives the transpose flag, W is never copied.
    for _ in range(power_iters):
        Q = _orthonormalize(Y, final=False)
        Z = _orthonormalize(Wc.T @ Q, final=False)
        Y = Wc @ Z
    Q = _orthonormalize(Y, final=True)
    # B = Q^T W, computed as (W^T Q)^T: same GEMM, transposed result is a free view.
    Bt = Wc.T @ Q  # n x ell
    U_small, s, Vt = _small_svd(Bt, rank, comp)
    U = Q @ U_small.astype(comp)
    A, B = _split_factors(U, s, Vt, out)
    return A, B, s, "rsi" if power_iters else "rsvd"


def _small_svd(
    Bt: np.ndarray, rank: int, comp: np.dtype
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Leading ``rank`` singular triplets of B = Bt^T (ell x n, ell small).

    Returns (U_small (ell x r, float64), s (r, float64), Vt (r x n, compute dtype)).

    float32 data: eigendecomposition of the float64 Gram matrix B B^T. It squares the
    condition number, which costs 8 of float64's 16 digits, still more than float32 data
    carries, and it is ~8x faster than an SVD of the ell x n block. Vt is formed as
    S^-1 U^T B; components whose singular value is below the float32 noise floor are dropped
    (their A and B parts set to zero) instead of being divided by ~0, so zero or
    rank-deficient W give zeros and never NaN.
    float64 data: the Gram matrix would lose half of the digits the data has, so the SVD of B
    itself is computed (LAPACK gesdd).
    """
    if comp == np.float64:
        U_small, s, Vt = np.linalg.svd(Bt.T, full_matrices=False)
        return U_small[:, :rank], s[:rank], Vt[:rank]
    B64 = Bt.astype(np.float64)
    lam, V = np.linalg.eigh(B64.T @ B64)  # ascending eigenvalues of B B^T (ell x ell)
    lam = lam[::-1][:rank]
    U_small = V[:, ::-1][:, :rank]
    s = np.sqrt(np.clip(lam, 0.0, None))
    # Noise floor of float32 data: singular values below sqrt(ell) * eps32 * s_max are rounding
    # noise of the float32 products; dividing by them would blow up the balanced factors.
    floor = s[0] * Bt.shape[1] ** 0.5 * np.finfo(np.float32).eps if s.size else 0.0
    keep = s > floor
    inv = np.zeros_like(s)
    inv[keep] = 1.0 / s[keep]
    s = np.where(keep, s, 0.0)
    # Vt = S^-1 U^T B = (Bt @ (U S^-1))^T, one thin float32 GEMM.
    Vt = (Bt @ (U_small * inv).astype(np.float32)).T
    return U_small, s, Vt


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
    Algorithm 4.4 of HMT 2011 (randomized subspace iteration) with the basis
    re-orthonormalized after *every* product with W or W^T (without it, float32 rounding
    collapses the sketch onto the dominant singular vectors), then Algorithm 5.1: the SVD of
    the small ``Q^T W`` gives the factors.

    Speed: the cost is dominated by the 2q + 2 products of W with a thin matrix, which are
    done in the input's precision without copying or transposing W. The orthonormalizations
    use Cholesky-QR with the Gram matrix in float64 (a second pass for the final basis),
    falling back to Householder QR when the block is too ill-conditioned (zero, rank
    deficient or fast decaying spectra). The small SVD uses the float64 Gram matrix for
    float32 data and LAPACK's SVD for float64 data. See docs/performance.md.

    Accuracy measured on 2048 x 2048 float32 with sigma_i = i^-0.5, rank 256, p = 10: the
    Frobenius error is ~1.01x the Eckart-Young optimum at q = 2 (1.25x at q = 0), the
    spectral error ~1.15x sigma_{r+1}.

    References
    ----------
    N. Halko, P.-G. Martinsson, J. A. Tropp, "Finding structure with randomness:
    probabilistic algorithms for constructing approximate matrix decompositions",
    SIAM Review 53(2), 217-288, 2011. Algorithms 4.4 and 5.1.
    """
    arr = _as_matrix(W)
    rank = _check_rank(rank)
    power_iters = _check_nonneg_int(power_iters, "power_iters")
    oversample = _check_nonneg_int(oversample, "oversample")
    out, comp = _dtypes(arr, compute_dtype)
    A, B, _, _ = _rsi_core(arr, rank, power_iters, oversample, seed, out, comp)
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
    arr = _as_matrix(W)
    rank = _check_rank(rank)
    power_iters = _check_nonneg_int(power_iters, "power_iters")
    oversample = _check_nonneg_int(oversample, "oversample")
    out, comp = _dtypes(arr, compute_dtype)
    if method == "svd":
        A, B, s = _exact_core(arr, rank, out, comp)
        used = "svd"
    elif method in ("rsi", "rsvd"):
        q = power_iters if method == "rsi" else 0
        A, B, s, used = _rsi_core(arr, rank, q, oversample, seed, out, comp)
    else:
        raise ValueError(f"method must be one of 'rsi', 'rsvd', 'svd', got {method!r}")
    return Factorization(a=A, b=B, singular_values=np.asarray(s, dtype=np.float64), method=used)


# --------------------------------------------------------------------------------------------
# Spectra and error measures
# --------------------------------------------------------------------------------------------


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


def _residual_row_blocks(W: np.ndarray, A: np.ndarray, B: np.ndarray):
    """Yield float64 blocks of W - A @ B, a few rows at a time (bounded temporary memory)."""
    m, n = W.shape
    rows = max(1, _RESIDUAL_BLOCK_ELEMENTS // max(n, 1))
    B64 = B.astype(np.float64)
    for i in range(0, m, rows):
        Wi = W[i : i + rows].astype(np.float64)
        yield Wi - A[i : i + rows].astype(np.float64) @ B64


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
    The residual is formed a block of rows at a time, so the extra memory stays ~32 MB
    for any size of W.
    """
    arr = _as_matrix(W)
    A, B = _check_factors(arr, A, B)
    num = 0.0
    for E in _residual_row_blocks(arr, A, B):
        num += float(np.einsum("ij,ij->", E, E))
    den = float(np.einsum("ij,ij->", arr, arr, dtype=np.float64))
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
