"""Activation-aware factorization: minimize the error of the layer's output, not of its weight.

A layer computes ``y = x W`` on input rows ``x``. With calibration inputs stacked in ``X``, the
output error of a factorization is ``||X (W - A B)||_F``. Writing the Gram matrix
``G = X^T X = L L^T`` gives ``||X M||_F = ||L^T M||_F`` for every ``M``, so the best rank-r
factorization for the output is the truncated SVD of ``L^T W`` with ``L^T`` undone in the first
factor (SVD-LLM, Wang et al. 2024). ``diag`` uses only the diagonal of ``G`` (per-feature RMS,
as in ASVD, Yuan et al. 2023): cheaper, and blind to correlated inputs.

Layers whose weight multiplies from the left (``y = W x``) have their inputs along the columns
of the matrix view; ``side="cols"`` applies the same idea from the right: factor ``W L``.

Numpy only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from onnx_lowrank.core import linalg

__all__ = ["Whitener", "make_whitener", "WHITEN_MODES", "DEFAULT_EPS"]

logger = logging.getLogger(__name__)

WHITEN_MODES = ("full", "diag", "none")

#: Relative jitter added to G: ``G + eps * trace(G) / K * I``. Directions the calibration data
#: never excited get weight ~eps instead of 0; measured on a real detector, eps from 1e-8 to 1e-2
#: changed held-out error little, but small eps amplified directions unseen in calibration
#: (false detections on out-of-domain photos), so the default sits on the safe side.
DEFAULT_EPS = 1e-3

#: Exponent of the per-feature RMS in ``diag`` mode (ASVD, Yuan et al. 2023).
ASVD_ALPHA = 0.5


@dataclass
class Whitener:
    """A square root ``L`` of the regularized Gram matrix, ``L L^T = G + jitter``.

    ``L`` is lower triangular (Cholesky), or ``V sqrt(lambda)`` when Cholesky failed and the
    symmetric eigendecomposition was used instead, or diagonal for ``diag``.
    """

    L: np.ndarray
    method: str  # "cholesky", "eigh", "diag", or "identity (<why>)" when whitening cannot apply
    eps: float

    @property
    def is_diagonal(self) -> bool:
        return self.method == "diag" or self.method.startswith("identity")

    @property
    def diagonal(self) -> np.ndarray:
        """The diagonal of a diagonal ``L`` (stored as a vector when K is large: lookups)."""
        return self.L if self.L.ndim == 1 else np.diag(self.L)

    @property
    def fallback(self) -> str | None:
        """Why whitening fell back to plain factorization, or ``None``."""
        return self.method[len("identity ("):-1] if self.method.startswith("identity") else None

    def apply(self, W: np.ndarray, side: str) -> np.ndarray:
        """``L^T W`` (inputs along rows) or ``W L`` (inputs along columns)."""
        W64 = W.astype(np.float64, copy=False)
        if self.is_diagonal:
            d = self.diagonal
            return d[:, None] * W64 if side == "rows" else W64 * d[None, :]
        return self.L.T @ W64 if side == "rows" else W64 @ self.L

    def undo(self, A: np.ndarray, B: np.ndarray, side: str) -> tuple[np.ndarray, np.ndarray]:
        """Factors of ``W`` from factors of the whitened matrix."""
        if self.is_diagonal:
            d = self.diagonal
            if side == "rows":
                return A / d[:, None], B
            return A, B / d[None, :]
        if side == "rows":  # L^T W ~= A' B'  =>  W ~= (L^-T A') B'
            return np.linalg.solve(self.L.T, A), B
        return A, np.linalg.solve(self.L.T, B.T).T  # W L ~= A' B'  =>  W ~= A' (B' L^-1)

    def factorize(self, W: np.ndarray, rank: int, *, side: str, method: str = "rsi",
                  power_iters: int = 2, oversample: int = 10, seed: int = 0) -> linalg.Factorization:
        """Output-optimal rank-``rank`` factorization of ``W`` (see module docstring).

        The singular values returned are those of the whitened matrix (the output's spectrum).
        """
        target = self.apply(W, side)
        # Compute in float64: L can be ill-conditioned, and its inverse is applied afterwards.
        f = linalg.factorize(target, rank, method=method, power_iters=power_iters,
                             oversample=oversample, seed=seed, compute_dtype=np.float64)
        A, B = self.undo(f.a, f.b, side)
        dtype = W.dtype if W.dtype in (np.float32, np.float64) else np.float32
        return linalg.Factorization(a=A.astype(dtype), b=B.astype(dtype),
                                    singular_values=f.singular_values, method=f.method)

    def relative_error(self, W: np.ndarray, A: np.ndarray, B: np.ndarray, side: str) -> float:
        """``||L^T (W - A B)|| / ||L^T W||``: the relative output error on the calibration data."""
        W64 = W.astype(np.float64)
        residual = self.apply(W64 - A.astype(np.float64) @ B.astype(np.float64), side)
        denom = np.linalg.norm(self.apply(W64, side))
        return float(np.linalg.norm(residual) / denom) if denom > 0 else 0.0


def make_whitener(G: np.ndarray, mode: str = "full", *, eps: float = DEFAULT_EPS) -> Whitener:
    """Square root of the regularized Gram matrix of a layer's inputs.

    Parameters
    ----------
    G : ndarray, shape (K, K) or (K,)
        ``X^T X`` accumulated over calibration inputs (float64), or only its diagonal when the
        inputs are one-hot rows (a table lookup: the diagonal holds how often each row was read).
    mode : {"full", "diag"}
        Full Cholesky whitening (SVD-LLM) or the per-feature diagonal scaling (ASVD).
    eps : float
        Relative jitter: ``G + eps * trace(G) / K * I`` (see :data:`DEFAULT_EPS`).

    Returns
    -------
    Whitener

    Notes
    -----
    Cholesky fails on a Gram matrix that is not numerically positive definite (inputs that are
    always zero, fewer samples than features, rounding): the jitter is then raised tenfold
    twice, and finally the symmetric eigendecomposition with eigenvalues clipped at
    the jitter is used, which always succeeds. ``diag`` scales feature ``i`` by
    ``G_ii^(alpha/2)`` with ``alpha = 0.5`` (see :data:`ASVD_ALPHA`). An all-zero ``G`` (a layer never excited)
    gives the identity, i.e. plain factorization.
    """
    G = np.asarray(G, dtype=np.float64)
    if G.ndim == 1:
        return _diagonal_whitener(G, mode, eps)
    K = G.shape[0]
    G = 0.5 * (G + G.T)  # accumulated sums can lose exact symmetry
    if not np.all(np.isfinite(G)):
        logger.warning("calibration activations contain NaN or Inf: falling back to plain factorization")
        return Whitener(np.eye(K), "identity (non-finite calibration activations)", eps)
    scale = float(np.trace(G)) / K if K else 0.0
    if scale <= 0.0:
        logger.warning("calibration Gram matrix is zero: falling back to plain factorization")
        return Whitener(np.eye(K), "identity (layer input is zero on the calibration data)", eps)
    if mode == "diag":
        # ASVD's scaling S = diag(rms(x_i))^alpha with alpha = 0.5 (their best on LLMs): alpha = 1
        # (the exact diagonal whitening) over-trusts a few loud features and was worse than no
        # scaling at all on the digits MLP's hidden layer.
        d = (np.diag(G) + eps * scale) ** (ASVD_ALPHA / 2)
        return Whitener(np.diag(d), "diag", eps)
    jitter = eps
    for _ in range(3):  # eps, 10 eps, 100 eps: beyond that the "whitening" is mostly jitter
        try:
            L = np.linalg.cholesky(G + jitter * scale * np.eye(K))
            if np.all(np.isfinite(L)):
                return Whitener(L, "cholesky", jitter)
        except np.linalg.LinAlgError:
            pass
        jitter *= 10.0
    w, V = np.linalg.eigh(G)
    w = np.maximum(w, 0.0) + eps * scale
    logger.info("Cholesky failed on the Gram matrix; using its eigendecomposition")
    return Whitener(V * np.sqrt(w)[None, :], "eigh", eps)


def _diagonal_whitener(counts: np.ndarray, mode: str, eps: float) -> Whitener:
    """Whitener of a diagonal Gram matrix given as a vector (one-hot inputs: row counts).

    ``full`` is then exact: ``L = diag(sqrt(c + jitter))`` minimizes the output error on the
    calibration inputs, i.e. each row's error weighted by how often it was read. A row never
    read gets the jitter's small weight; its factor row then becomes (nearly) its least-squares
    projection on the subspace the frequent rows chose, not noise. ``diag`` softens the weights
    as for features (ASVD's exponent).
    """
    K = counts.shape[0]
    if not np.all(np.isfinite(counts)):
        return Whitener(np.ones(K), "identity (non-finite calibration activations)", eps)
    scale = float(counts.sum()) / K if K else 0.0
    if scale <= 0.0:
        return Whitener(np.ones(K), "identity (layer input is zero on the calibration data)", eps)
    exponent = 0.5 if mode == "full" else ASVD_ALPHA / 2
    return Whitener((counts + eps * scale) ** exponent, "diag", eps)
