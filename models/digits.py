"""Build the default demo model: a small MLP trained on scikit-learn's digits.

Usage::

    python -m models.digits [--out-dir onnx_lowrank/data] [--seed 0]

Writes two files into ``out_dir``:

``digits_mlp.onnx``
    MLP 64 -> 256 -> 256 -> 10 (ReLU) exported with ``onnx.helper`` (opset 17,
    ir_version 8).  Its layers mirror what real exporters emit, so all of our
    passes are exercised:

    * ``fc1``: ``Gemm`` with ``transB=1`` and bias ``C`` (PyTorch ``Linear``
      style, weight stored ``[out, in] = [256, 64]``),
    * ``fc2``: ``MatMul`` with weight ``[in, out] = [256, 256]`` followed by
      ``Add`` of the bias (TF / dynamo style),
    * ``fc3``: ``Gemm`` with ``transB=1`` (weight ``[10, 256]``).

    Input ``pixels`` float32 ``[batch, 64]``, output ``logits`` float32
    ``[batch, 10]``.  The held-out accuracy is stored in ``metadata_props``
    (``heldout_accuracy``, ``heldout_correct``, ``heldout_total``) and in the
    ``doc_string``.

``digits_heldout.npz``
    The held-out split: ``pixels`` (float32 ``[N, 64]``, pixels scaled to
    [0, 1]) and ``labels`` (int64 ``[N]``).

The data split is always ``train_test_split(test_size=0.3, random_state=0,
stratify=y)``; ``seed`` only controls weight init and minibatch order.
Everything is deterministic: running the script twice produces byte-identical
files (the npz is written with fixed zip timestamps).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import time
import zipfile
from pathlib import Path

import numpy as np

MODEL_FILENAME = "digits_mlp.onnx"
HELDOUT_FILENAME = "digits_heldout.npz"
CALIBRATION_FILENAME = "digits_calibration.npz"
#: Training images shipped as calibration data for the demo (never the held-out ones).
CALIBRATION_SAMPLES = 256
INPUT_NAME = "pixels"
OUTPUT_NAME = "logits"
LABELS_KEY = "labels"
OPSET = 17
IR_VERSION = 8
PRODUCER_NAME = "onnx-lowrank models/digits.py"
PRODUCER_VERSION = "1"

LAYER_SIZES = (64, 256, 256, 10)
EPOCHS = 200
BATCH_SIZE = 64
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 1e-4  # decoupled (AdamW style), multiplied by the learning rate
TEST_SIZE = 0.3
SPLIT_RANDOM_STATE = 0

DEFAULT_OUT_DIR = Path(__file__).resolve().parents[1] / "onnx_lowrank" / "data"


# --------------------------------------------------------------------------- data
def load_split():
    """Return ``(x_train, x_test, y_train, y_test)``; pixels float32 in [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    return train_test_split(
        x, y, test_size=TEST_SIZE, random_state=SPLIT_RANDOM_STATE, stratify=y
    )


# ----------------------------------------------------------------------- training
def _init_params(rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    """PyTorch ``nn.Linear`` default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

    Weights are kept in ``[in, out]`` layout during training (float64).
    """
    params = []
    for fan_in, fan_out in zip(LAYER_SIZES[:-1], LAYER_SIZES[1:]):
        bound = 1.0 / np.sqrt(fan_in)
        w = rng.uniform(-bound, bound, size=(fan_in, fan_out))
        b = rng.uniform(-bound, bound, size=(fan_out,))
        params.append((w, b))
    return params


def train_mlp(x: np.ndarray, y: np.ndarray, *, seed: int = 0):
    """Train the MLP with Adam(W) on softmax cross-entropy, in pure numpy.

    Returns a list of ``(W[in, out], b[out])`` float32 pairs.
    """
    rng = np.random.default_rng(seed)
    params = _init_params(rng)
    flat = [p for wb in params for p in wb]
    m = [np.zeros_like(p) for p in flat]
    v = [np.zeros_like(p) for p in flat]
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    x = x.astype(np.float64)
    n = x.shape[0]
    onehot = np.eye(LAYER_SIZES[-1])[y]
    step = 0
    for _epoch in range(EPOCHS):
        order = rng.permutation(n)
        for start in range(0, n, BATCH_SIZE):
            idx = order[start : start + BATCH_SIZE]
            xb, tb = x[idx], onehot[idx]
            # forward
            acts = [xb]
            h = xb
            for i, (w, b) in enumerate(params):
                z = h @ w + b
                h = np.maximum(z, 0.0) if i < len(params) - 1 else z
                acts.append(h)
            logits = acts[-1]
            logits = logits - logits.max(axis=1, keepdims=True)
            probs = np.exp(logits)
            probs /= probs.sum(axis=1, keepdims=True)
            # backward (mean cross-entropy)
            grad = (probs - tb) / xb.shape[0]
            grads: list[np.ndarray] = []
            for i in range(len(params) - 1, -1, -1):
                w, _ = params[i]
                h_in = acts[i]
                grads = [h_in.T @ grad, grad.sum(axis=0)] + grads
                if i > 0:
                    grad = (grad @ w.T) * (h_in > 0.0)
            # AdamW update
            step += 1
            c1 = 1.0 - beta1**step
            c2 = 1.0 - beta2**step
            for j, (p, g) in enumerate(zip(flat, grads)):
                m[j] = beta1 * m[j] + (1.0 - beta1) * g
                v[j] = beta2 * v[j] + (1.0 - beta2) * (g * g)
                if p.ndim == 2:  # decay weights only, not biases
                    p *= 1.0 - LEARNING_RATE * WEIGHT_DECAY
                p -= LEARNING_RATE * (m[j] / c1) / (np.sqrt(v[j] / c2) + eps)
    return [(w.astype(np.float32), b.astype(np.float32)) for w, b in params]


def numpy_forward(params, x: np.ndarray) -> np.ndarray:
    """float32 reference forward pass; ``params`` as returned by ``train_mlp``."""
    h = x.astype(np.float32)
    for i, (w, b) in enumerate(params):
        h = h @ w + b
        if i < len(params) - 1:
            h = np.maximum(h, 0.0)
    return h


# ------------------------------------------------------------------------- export
def export_onnx(params, *, heldout_correct: int, heldout_total: int):
    """Build the ONNX ModelProto (see module docstring for the structure)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    (w1, b1), (w2, b2), (w3, b3) = params
    acc = heldout_correct / heldout_total
    inits = [
        # PyTorch Linear layout [out, in], consumed by Gemm(transB=1)
        numpy_helper.from_array(np.ascontiguousarray(w1.T), "fc1.weight"),
        numpy_helper.from_array(b1, "fc1.bias"),
        # TF / dynamo layout [in, out], consumed by MatMul + Add
        numpy_helper.from_array(np.ascontiguousarray(w2), "fc2.weight"),
        numpy_helper.from_array(b2, "fc2.bias"),
        numpy_helper.from_array(np.ascontiguousarray(w3.T), "fc3.weight"),
        numpy_helper.from_array(b3, "fc3.bias"),
    ]
    nodes = [
        helper.make_node(
            "Gemm", [INPUT_NAME, "fc1.weight", "fc1.bias"], ["fc1/Gemm_output_0"],
            name="fc1/Gemm", alpha=1.0, beta=1.0, transB=1,
        ),
        helper.make_node("Relu", ["fc1/Gemm_output_0"], ["relu1/Relu_output_0"], name="relu1/Relu"),
        helper.make_node(
            "MatMul", ["relu1/Relu_output_0", "fc2.weight"], ["fc2/MatMul_output_0"], name="fc2/MatMul"
        ),
        helper.make_node("Add", ["fc2/MatMul_output_0", "fc2.bias"], ["fc2/Add_output_0"], name="fc2/Add"),
        helper.make_node("Relu", ["fc2/Add_output_0"], ["relu2/Relu_output_0"], name="relu2/Relu"),
        helper.make_node(
            "Gemm", ["relu2/Relu_output_0", "fc3.weight", "fc3.bias"], [OUTPUT_NAME],
            name="fc3/Gemm", alpha=1.0, beta=1.0, transB=1,
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "digits_mlp",
        inputs=[helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", LAYER_SIZES[0]])],
        outputs=[helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", LAYER_SIZES[-1]])],
        initializer=inits,
        doc_string="MLP 64-256-256-10 (ReLU) for 8x8 digit images",
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name=PRODUCER_NAME,
        producer_version=PRODUCER_VERSION,
        doc_string=(
            "MLP 64->256->256->10 (ReLU) trained in numpy on scikit-learn's digits "
            "(8x8 images, pixels/16 in [0,1], input 'pixels' [batch,64] -> 'logits' [batch,10]). "
            f"Held-out accuracy {acc:.6f} ({heldout_correct}/{heldout_total}) on the 30% stratified "
            "split (train_test_split random_state=0) stored in digits_heldout.npz. "
            "Built by `python -m models.digits`."
        ),
    )
    model.ir_version = IR_VERSION
    helper.set_model_props(
        model,
        {
            "dataset": "sklearn.datasets.load_digits",
            "heldout_accuracy": repr(acc),
            "heldout_correct": str(heldout_correct),
            "heldout_total": str(heldout_total),
        },
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def save_npz_deterministic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like ``np.savez_compressed`` but with fixed zip timestamps (byte-stable)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arrays[key]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue(), compresslevel=9)


# ----------------------------------------------------------------------- analysis
def energy_profile(weight: np.ndarray, fractions=(0.90, 0.95, 0.99)) -> dict:
    """Smallest rank keeping each fraction of the squared-singular-value energy."""
    s = np.linalg.svd(weight.astype(np.float64), compute_uv=False)
    cum = np.cumsum(s**2) / np.sum(s**2)
    ranks = {f: int(np.searchsorted(cum, f - 1e-12) + 1) for f in fractions}
    return {"shape": tuple(weight.shape), "full_rank": int(min(weight.shape)), "ranks": ranks, "s": s}


def truncated_accuracy(params, layer: int, rank: int, x: np.ndarray, y: np.ndarray) -> float:
    """Held-out accuracy after a rank-``rank`` SVD truncation of one layer only."""
    w, b = params[layer]
    u, s, vt = np.linalg.svd(w.astype(np.float64), full_matrices=False)
    w_r = ((u[:, :rank] * s[:rank]) @ vt[:rank]).astype(np.float32)
    new = list(params)
    new[layer] = (w_r, b)
    return float(np.mean(numpy_forward(new, x).argmax(axis=1) == y))


# --------------------------------------------------------------------------- main
def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_digits_model(out_dir, *, seed: int = 0, verbose: bool = False) -> dict:
    """Train, export and verify the digits MLP; write both files into ``out_dir``.

    Returns a dict with ``heldout_accuracy``, ``ort_accuracy``, ``train_accuracy``,
    ``heldout_correct``/``heldout_total``, file paths, sizes and sha256s,
    ``train_seconds`` and the per-layer ``energy`` profile.
    """
    import onnx
    import onnxruntime as ort

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    x_train, x_test, y_train, y_test = load_split()

    # Single-threaded BLAS: the matrices are tiny, and multithreaded OpenBLAS
    # slows down badly when the CPUs are busy (results are identical either way).
    from threadpoolctl import threadpool_limits

    t0 = time.perf_counter()
    with threadpool_limits(limits=1, user_api="blas"):
        params = train_mlp(x_train, y_train, seed=seed)
    train_seconds = time.perf_counter() - t0

    np_pred = numpy_forward(params, x_test).argmax(axis=1)
    correct = int(np.sum(np_pred == y_test))
    total = int(y_test.shape[0])
    acc = correct / total
    train_acc = float(np.mean(numpy_forward(params, x_train).argmax(axis=1) == y_train))

    model = export_onnx(params, heldout_correct=correct, heldout_total=total)
    model_path = out_dir / MODEL_FILENAME
    heldout_path = out_dir / HELDOUT_FILENAME
    onnx.save_model(model, str(model_path))
    save_npz_deterministic(
        heldout_path, {INPUT_NAME: x_test.astype(np.float32), LABELS_KEY: y_test.astype(np.int64)}
    )
    calibration_path = out_dir / CALIBRATION_FILENAME
    save_npz_deterministic(calibration_path, {INPUT_NAME: x_train[:CALIBRATION_SAMPLES].astype(np.float32)})

    # verify with onnxruntime on the files as written
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    with np.load(heldout_path) as data:
        xs, ys = data[INPUT_NAME], data[LABELS_KEY]
    ort_logits = sess.run([OUTPUT_NAME], {INPUT_NAME: xs})[0]
    ort_pred = ort_logits.argmax(axis=1)
    ort_acc = float(np.mean(ort_pred == ys))
    if ort_acc != acc:
        raise RuntimeError(f"onnxruntime accuracy {ort_acc} != numpy accuracy {acc}")
    max_abs_diff = float(np.max(np.abs(ort_logits - numpy_forward(params, xs))))

    # singular value energy profile (weights in the [in, out] layout; SVD is layout-invariant)
    energy = {}
    for i, (w, _) in enumerate(params):
        prof = energy_profile(w)
        prof["accuracy_at_rank"] = {
            r: truncated_accuracy(params, i, r, x_test, y_test) for r in sorted(set(prof["ranks"].values()))
        }
        energy[f"fc{i + 1}"] = prof

    result = {
        "heldout_accuracy": acc,
        "heldout_correct": correct,
        "heldout_total": total,
        "ort_accuracy": ort_acc,
        "ort_numpy_max_abs_logit_diff": max_abs_diff,
        "ort_numpy_pred_mismatches": int(np.sum(ort_pred != np_pred)),
        "train_accuracy": train_acc,
        "train_seconds": train_seconds,
        "model_path": model_path,
        "heldout_path": heldout_path,
        "model_bytes": model_path.stat().st_size,
        "heldout_bytes": heldout_path.stat().st_size,
        "model_sha256": _sha256(model_path),
        "heldout_sha256": _sha256(heldout_path),
        "calibration_path": calibration_path,
        "calibration_sha256": _sha256(calibration_path),
        "num_params": int(sum(w.size + b.size for w, b in params)),
        "energy": energy,
    }
    if verbose:
        _print_report(result)
    return result


def _print_report(r: dict) -> None:
    print(f"trained in {r['train_seconds']:.1f}s, {r['num_params']} params")
    print(f"train accuracy    {r['train_accuracy']:.4f}")
    print(
        f"held-out accuracy {r['heldout_accuracy']:.4f} ({r['heldout_correct']}/{r['heldout_total']}) numpy; "
        f"onnxruntime {r['ort_accuracy']:.4f} (max |logit diff| {r['ort_numpy_max_abs_logit_diff']:.2e}, "
        f"{r['ort_numpy_pred_mismatches']} prediction mismatches)"
    )
    print("singular value energy profile (rank keeping X% of sum s^2; held-out acc. if only this layer is truncated):")
    for name, p in r["energy"].items():
        parts = ", ".join(
            f"{int(f * 100)}%: r={k} (acc {p['accuracy_at_rank'][k]:.4f})" for f, k in p["ranks"].items()
        )
        print(f"  {name} {p['shape'][0]}x{p['shape'][1]} (full rank {p['full_rank']}): {parts}")
    for key in ("model", "heldout"):
        print(f"wrote {r[key + '_path']} ({r[key + '_bytes']} bytes, sha256 {r[key + '_sha256']})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.digits", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help="default: %(default)s")
    parser.add_argument("--seed", type=int, default=0, help="init / minibatch-order seed (default: 0)")
    args = parser.parse_args(argv)
    build_digits_model(args.out_dir, seed=args.seed, verbose=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
