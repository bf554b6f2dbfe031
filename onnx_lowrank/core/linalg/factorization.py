"""Factorizations ``W ~= A @ B``: randomized subspace iteration, randomized SVD, exact SVD.

Every factorization returns two factors ``A`` (m x r) and ``B`` (r x n); the square roots of the
singular values are split into both (``A = U sqrt(S)``, ``B = sqrt(S) V^T``) so that the
intermediate activation ``X @ A`` stays on the scale of the output (it matters in float16).

References
----------
N. Halko, P.-G. Martinsson, J. A. Tropp, "Finding structure with randomness: probabilistic
algorithms for constructing approximate matrix decompositions", SIAM Review 53(2), 2011.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from onnx_lowrank.core.linalg._checks import (
    _SAFE_EXPONENT,
    _as_matrix,
    _check_nonneg_int,
    _check_rank,
    _dtypes,
    _finite_magnitude,
    _prepare,
)
from onnx_lowrank.core.linalg._orthonormal import _final_basis, _gram64, _orthonormalize, _times_upper

__all__ = ["Factorization", "factorize", "rsi", "rsvd", "svd"]

# A power iteration (one application of W W^T) skips the normalization between its W^T and W
# products while the estimate of cond(W W^T) on the sketch is at most this: float32 then still
# keeps >= 3 digits (eps32 * 1e4 ~ 1.2e-3) in the weakest direction of the unnormalized
# product, and the next normalization (or the final basis) takes over from there. Measured:
# slowly decaying spectra (sigma_i = i^-0.5, estimates ~100-650) skip, with Frobenius errors
# equal to those of the every-product scheme within 6e-9 relative; sigma_i = i^-1 at rank
# 128 (estimate 4e4), i^-3 (1e12) and geometric spectra (1e13) keep the normalization after
# every product.
_SKIP_MAX_COND = 1e4


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

