"""Speed and accuracy of onnx_lowrank.core.linalg.rsi against scikit-learn, exact SVD and the GEMM floor.

For each shape, a float32 matrix with singular values sigma_i = i^-0.5 (a slowly decaying
spectrum like trained weights) is factorized at the given rank with q power iterations and
p oversampling by

- ours:     ``onnx_lowrank.core.linalg.rsi(W, rank, power_iters=q, oversample=p, seed=0)``
- sklearn:  ``sklearn.utils.extmath.randomized_svd(W, rank, n_iter=q, n_oversamples=p,
            random_state=0)`` (skipped if scikit-learn is not installed)
- svd:      ``numpy.linalg.svd(W, full_matrices=False)`` (float32; only for max(m, n) <= 4096
            unless --exact, it takes minutes beyond)
- floor:    the 2q + 2 bare products of W (or W^T) with a thin n x (rank + p) float32 matrix
            that any randomized subspace iteration must do.

Timings are medians over --repeats rounds; within a round the methods run one after the
other (interleaved), so a burst of load on this shared machine hits all of them alike.
Errors are relative Frobenius errors divided by the Eckart-Young optimum (1.0 is optimal).

Run:  python benchmarks/bench_linalg.py            # the table in docs/performance.md
      python benchmarks/bench_linalg.py --quick    # 2048 x 2048 only, 3 rounds
      python benchmarks/bench_linalg.py --shapes 1024x1024:128,768x3072:256 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from onnx_lowrank.core import linalg  # noqa: E402

DEFAULT_SHAPES = "2048x2048:256,4096x4096:512,768x3072:256,3072x768:256,4096x11008:256"
QUICK_SHAPES = "2048x2048:256"
EXACT_MAX_DIM = 4096  # numpy.linalg.svd above this takes minutes on 2 cores
DENSE_ORTHO_MAX_DIM = 2048  # above this a full QR of a Gaussian matrix is itself slow


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    shapes = []
    for item in text.split(","):
        dims, _, rank = item.strip().partition(":")
        m, _, n = dims.partition("x")
        try:
            shapes.append((int(m), int(n), int(rank) if rank else 256))
        except ValueError:
            raise SystemExit(f"bad shape {item!r}: expected MxN:RANK, e.g. 2048x2048:256") from None
    return shapes


def random_orthonormal(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """n x k matrix with orthonormal columns.

    Up to 2048 rows: Q of a Gaussian matrix (Haar distributed). Beyond, a block-diagonal
    orthogonal matrix (Haar blocks of <= 512) with random row and column permutations: exact
    orthonormality at a fraction of the cost. Randomized methods with a Gaussian test matrix
    are rotation invariant, so their accuracy depends on the spectrum only, not on how the
    singular vectors look; this just keeps the set-up time of big shapes in seconds.
    """
    if n <= DENSE_ORTHO_MAX_DIM:
        Q, _ = np.linalg.qr(rng.standard_normal((n, k)))
        return Q
    cols = rng.permutation(n)[:k]  # which columns of the n x n orthogonal matrix to keep
    out = np.zeros((n, k), dtype=np.float32)
    for block in np.array_split(np.arange(n), -(-n // 512)):
        Qb, _ = np.linalg.qr(rng.standard_normal((block.size, block.size)))
        inside = np.nonzero((cols >= block[0]) & (cols <= block[-1]))[0]
        out[block[0] : block[-1] + 1, inside] = Qb[:, cols[inside] - block[0]]
    return out[rng.permutation(n)]


def test_matrix(m: int, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """float32 m x n matrix with sigma_i = i^-0.5 and its exact singular values."""
    rng = np.random.default_rng(seed)
    k = min(m, n)
    s = np.arange(1, k + 1, dtype=np.float64) ** -0.5
    U = random_orthonormal(m, k, rng).astype(np.float32)
    V = random_orthonormal(n, k, rng).astype(np.float32)
    W = (U * s.astype(np.float32)) @ V.T
    return np.ascontiguousarray(W, dtype=np.float32), s


def gemm_floor(W: np.ndarray, ell: int, power_iters: int) -> Callable[[], None]:
    """The 2q + 2 thin products of RSI with nothing else around them."""
    rng = np.random.default_rng(1)
    X = rng.standard_normal((W.shape[1], ell)).astype(W.dtype)
    Yt = rng.standard_normal((W.shape[0], ell)).astype(W.dtype)

    def run() -> None:
        for _ in range(power_iters + 1):
            W @ X
            W.T @ Yt

    return run


def timed(fn: Callable[[], object], gap: float = 0.0) -> float:
    # OpenBLAS worker threads busy-wait for ~0.1 s after a call; numpy and scipy (used by
    # scikit-learn) load separate OpenBLAS copies, so without a pause one method's spinning
    # threads steal the cores of the next one.
    time.sleep(gap)
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def blas_info() -> str:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "threadpoolctl not installed"
    for pool in threadpool_info():
        if pool.get("user_api") == "blas" and "numpy" in pool.get("filepath", ""):
            return (
                f"{pool.get('internal_api')} {pool.get('version')} ({pool.get('architecture')}), "
                f"{pool.get('num_threads')} threads"
            )
    return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=None, help=f"comma-separated MxN:RANK (default {DEFAULT_SHAPES})")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds per shape (median reported)")
    parser.add_argument("--power-iters", type=int, default=2)
    parser.add_argument("--oversample", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help=f"only {QUICK_SHAPES}, 3 rounds")
    parser.add_argument("--exact", action="store_true", help="time numpy.linalg.svd at every shape")
    parser.add_argument("--no-exact", action="store_true", help="never time numpy.linalg.svd")
    parser.add_argument(
        "--exact-max-dim", type=int, default=EXACT_MAX_DIM, help="time numpy.linalg.svd only up to this max(m, n)"
    )
    parser.add_argument("--gap", type=float, default=0.3, help="seconds of pause before each timed call")
    args = parser.parse_args(argv)
    shapes = parse_shapes(args.shapes or (QUICK_SHAPES if args.quick else DEFAULT_SHAPES))
    repeats = 3 if args.quick else max(1, args.repeats)
    q, p = args.power_iters, args.oversample

    try:
        from sklearn.utils.extmath import randomized_svd
    except ImportError:
        randomized_svd = None

    print(f"# numpy {np.__version__}, BLAS: {blas_info()}, nproc {os.cpu_count()}, {platform.machine()}")
    print(f"# OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}, q={q}, p={p}, {repeats} rounds")
    header = (
        f"{'shape':>11} {'rank':>5} | {'ours ms':>8} {'sklearn':>8} {'np.svd':>8} {'floor':>7} | "
        f"{'sk/ours':>7} {'svd/ours':>8} {'ours/floor':>10} | {'err/opt ours':>12} {'sklearn':>8}"
    )
    print(header)
    print("-" * len(header))
    for m, n, rank in shapes:
        W, s = test_matrix(m, n)
        ell = min(rank + p, m, n)
        optimum = linalg.optimal_frobenius_error(s, rank)
        methods: dict[str, Callable[[], object]] = {
            "ours": lambda: linalg.rsi(W, rank, power_iters=q, oversample=p, seed=0),
            "floor": gemm_floor(W, ell, q),
        }
        if randomized_svd is not None:
            methods["sklearn"] = lambda: randomized_svd(W, rank, n_iter=q, n_oversamples=p, random_state=0)
        run_exact = not args.no_exact and (args.exact or max(m, n) <= args.exact_max_dim)
        times: dict[str, list[float]] = {name: [] for name in methods}
        for name, fn in methods.items():  # warm-up: first-touch allocation, BLAS thread start
            fn()
        for _ in range(repeats):
            for name, fn in methods.items():
                times[name].append(timed(fn, args.gap))
        if run_exact:
            # Interleaving a multi-second SVD adds nothing; two runs bound the noise.
            times["svd"] = [
                timed(lambda: np.linalg.svd(W, full_matrices=False), args.gap) for _ in range(min(repeats, 2))
            ]
        med = {name: statistics.median(v) for name, v in times.items()}

        A, B = linalg.rsi(W, rank, power_iters=q, oversample=p, seed=0)
        err_ours = linalg.relative_frobenius_error(W, A, B) / optimum
        err_sk = float("nan")
        if randomized_svd is not None:
            U, S, Vt = randomized_svd(W, rank, n_iter=q, n_oversamples=p, random_state=0)
            err_sk = linalg.relative_frobenius_error(W, U * S, Vt) / optimum

        def ms(name: str) -> str:
            return f"{med[name] * 1e3:.0f}" if name in med else "-"

        def ratio(a: str, b: str) -> str:
            return f"{med[a] / med[b]:.2f}" if a in med and b in med else "-"

        print(
            f"{f'{m}x{n}':>11} {rank:>5} | {ms('ours'):>8} {ms('sklearn'):>8} {ms('svd'):>8} {ms('floor'):>7} | "
            f"{ratio('sklearn', 'ours'):>7} {ratio('svd', 'ours'):>8} {ratio('ours', 'floor'):>10} | "
            f"{err_ours:>12.4f} {err_sk:>8.4f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
