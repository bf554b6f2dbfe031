"""Orthonormal bases of thin blocks: Cholesky-QR in tiers, Householder QR as the fallback.

The power iterations and the final Rayleigh-Ritz step of :func:`~onnx_lowrank.core.linalg.rsi`
need a basis of range(Y) for thin blocks Y (m x l, l = rank + oversample). Householder QR is
memory bound and costs about three products with W here; Cholesky-QR (one syrk, an l x l
Cholesky and triangular inverse, one thin GEMM) is accepted whenever its conditioning estimate
says it is safe. numpy has no trtri/trmm, hence the blocked triangular helpers.
"""

from __future__ import annotations

import logging

import numpy as np

# The package's name, as before linalg was split into modules: one logger for all of linalg.
logger = logging.getLogger(__package__)

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
#   Needed because a power iteration without its middle normalization (factorization's
#   _SKIP_MAX_COND) leaves the final sketch with cond(Y) ~ cond(W W^T) on it (~400 for the
#   2048 x 2048 benchmark matrix).
_FUSED_MAX_COND = 1e4
# - Second Cholesky-QR pass: the first pass's Q must be nearly orthonormal already, otherwise
#   the first pass was unhealthy and Householder QR takes over.
_SECOND_PASS_MIN_RATIO = 0.1

# Power iterations of the condition estimate: 6 leave it 1-10% below cond(Y) on the sketches
# of 17 test spectra without a gap (4: up to 20% below; each step costs ~0.03 ms).
_COND_POWER_STEPS = 6

# Below this size the triangular inverse is left to LAPACK (getrf/getri); above it the
# recursive 2 x 2 block formula turns most of the work into GEMMs, ~2x faster at l ~ 256.
_TRI_INV_BLOCK = 64
# Smallest block that _times_upper still splits (smaller GEMMs lose more speed than flops).
_TRI_MUL_BLOCK = 96


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
