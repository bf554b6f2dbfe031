"""Export -> low rank -> int8 -> benchmark: onnx-lowrank as one step of an export pipeline.

The recipe, end to end on a small PyTorch MLP trained here on scikit-learn's digits:

1. train the model (a few seconds on a CPU) and export it with ``torch.onnx.export``: the
   torch.export-based exporter (``dynamo=True``, PyTorch's default, needs ``onnxscript``) hands
   back an ``onnx_ir.Model`` directly; without onnxscript the legacy TorchScript exporter writes a
   file that ``onnx_ir.load`` reads;
2. apply :class:`onnx_lowrank.ir_pass.LowRankPass` in an ``onnx_ir.passes.PassManager``:
   calibrated on 256 training images with a global budget of 25% of the layers' parameters by
   default (``--data-free`` for the data-free variant), and save the result;
3. quantize the low-rank model with ``onnxruntime.quantization.quantize_dynamic`` (int8 weights);
4. benchmark original, low-rank and low-rank + int8 (and int8 alone, for comparison) with
   ``onnx-lowrank bench`` on the 540 held-out images, and print size and accuracy of each step.

Run::

    pip install 'onnx-lowrank[ir,dev]' torch==2.13.0   # CPU build; dev brings scikit-learn
    python examples/export_compress_quantize.py --out-dir recipe/

A ``summary.json`` with the numbers of each step is written to ``--out-dir``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

#: Hidden width of the MLP: wide enough that its 512x512 layer has room to lose rank.
HIDDEN = 512
#: Training images used as calibration data (like the bundled demo; never held-out ones).
CALIBRATION_SAMPLES = 256


def _require(module: str, install: str) -> None:
    if importlib.util.find_spec(module) is None:
        sys.exit(f"this example needs {module}: {install}")


def load_digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The split of the bundled demo model: 70/30 stratified, ``random_state=0``, pixels / 16."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    return x_train, y_train, x_test, y_test


def train_mlp(x: np.ndarray, y: np.ndarray, *, epochs: int, seed: int):
    """A 64 -> 512 -> 512 -> 10 ReLU MLP trained with Adam (full determinism on one CPU thread)."""
    import torch

    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, HIDDEN), torch.nn.ReLU(),
        torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.ReLU(),
        torch.nn.Linear(HIDDEN, 10),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in torch.randperm(len(xs), generator=generator).split(64):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(xs[batch]), ys[batch])
            loss.backward()
            optimizer.step()
    return model.eval()


def export(model, out_dir: Path, exporter: str):
    """``torch.onnx.export`` the model; return ``(onnx_ir.Model, exporter used)``."""
    import onnx_ir as ir
    import torch

    example = (torch.zeros(1, 64),)
    dynamo = exporter == "dynamo" or (exporter == "auto" and importlib.util.find_spec("onnxscript") is not None)
    if dynamo:
        # PyTorch's default exporter: an ONNXProgram whose .model is already an onnx_ir.Model.
        program = torch.onnx.export(model, example, dynamo=True, input_names=["pixels"], output_names=["logits"],
                                    dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
        return program.model, "torch.onnx.export(dynamo=True)"
    path = out_dir / "exported.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter says it is legacy
        torch.onnx.export(model, example, str(path), dynamo=False, input_names=["pixels"], output_names=["logits"],
                          dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}})
    return ir.load(path), "torch.onnx.export(dynamo=False) + onnx_ir.load"


def quantize(source: Path, target: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_dynamic logs a pre-processing hint on every call
    try:
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)


def bench(paths: list[Path], heldout: Path, json_path: Path, runs: int) -> dict:
    """``onnx-lowrank bench ORIGINAL COMPRESSED...`` (the CLI's own entry point); returns its JSON."""
    from onnx_lowrank.cli import main as cli_main

    argv = ["bench", *map(str, paths), "--inputs", str(heldout), "--runs", str(runs), "--json", str(json_path)]
    print("\n$ onnx-lowrank " + " ".join(argv), flush=True)
    code = cli_main(argv)
    if code != 0:
        sys.exit(f"onnx-lowrank bench failed with exit code {code}")
    return json.loads(json_path.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, help="where to write the models and summary.json (default: a new temporary directory)")
    parser.add_argument("--budget", type=float, default=0.25,
                        help="fraction of the layers' parameters to keep (global allocation, --target-params; default 0.25)")
    parser.add_argument("--data-free", action="store_true", help="no calibration images (ranks by weight spectra only)")
    parser.add_argument("--exporter", choices=("auto", "dynamo", "legacy"), default="auto",
                        help="auto: dynamo=True when onnxscript is installed, else the legacy exporter")
    parser.add_argument("--epochs", type=int, default=15, help="training epochs (default 15)")
    parser.add_argument("--runs", type=int, default=50, help="timed bench rounds (default 50; 0 skips latency)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    _require("torch", "pip install torch")
    _require("onnx_ir", "pip install 'onnx-lowrank[ir]'")
    _require("sklearn", "pip install scikit-learn  (the digits data set)")
    import onnx_ir as ir
    import torch

    from onnx_lowrank import LowRankConfig
    from onnx_lowrank.ir_pass import LowRankPass

    torch.set_num_threads(1)
    out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="onnx-lowrank-recipe-"))
    out_dir.mkdir(parents=True, exist_ok=True)

    # 1. train and export
    start = time.perf_counter()
    x_train, y_train, x_test, y_test = load_digits_split()
    model = train_mlp(x_train, y_train, epochs=args.epochs, seed=args.seed)
    with torch.no_grad():
        torch_acc = float((model(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean())
    print(f"1. trained a 64-{HIDDEN}-{HIDDEN}-10 MLP on {len(x_train)} digits images in "
          f"{time.perf_counter() - start:.1f}s: held-out accuracy {torch_acc:.4f} (PyTorch)")
    exported, how = export(model, out_dir, args.exporter)
    original = out_dir / "original.onnx"
    ir.save(exported, original)
    print(f"   exported with {how} -> {original}")

    # 2. low rank, as an onnx-ir pass
    calibration = None if args.data_free else {"pixels": x_train[:CALIBRATION_SAMPLES]}
    lowrank_pass = LowRankPass(LowRankConfig(target_params=args.budget), calibration=calibration)
    result = ir.passes.PassManager([lowrank_pass])(exported)
    lowrank = out_dir / "lowrank.onnx"
    ir.save(result.model, lowrank)
    how = "data-free" if calibration is None else f"calibrated on {CALIBRATION_SAMPLES} training images"
    print(f"\n2. PassManager([LowRankPass(LowRankConfig(target_params={args.budget:g}))]), {how}: "
          f"modified={result.modified} -> {lowrank}")
    print(lowrank_pass.last_report.format_table())

    # 3. int8
    int8 = out_dir / "lowrank.int8.onnx"
    quantize(lowrank, int8)
    int8_only = out_dir / "original.int8.onnx"
    quantize(original, int8_only)
    print(f"\n3. quantize_dynamic(int8 weights) -> {int8} (and {int8_only.name} for comparison)")

    # 4. benchmark
    heldout = out_dir / "heldout.npz"
    np.savez(heldout, pixels=x_test, labels=y_test)
    steps = [("original", original), ("low-rank", lowrank), ("low-rank + int8", int8), ("int8 only", int8_only)]
    report = bench([p for _, p in steps], heldout, out_dir / "bench.json", args.runs)

    # Entry i of "models" describes steps[i]; the first compressed one's comparison is top level.
    rows = []
    for i, ((name, path), entry) in enumerate(zip(steps, report["models"])):
        accuracy = report["accuracy"] if i == 1 else entry.get("accuracy", {})
        metrics = next(iter(accuracy.values()), {}) if accuracy else {}
        latency = report.get("latency", {}).get("CPUExecutionProvider", {}) if i == 1 else \
            next(iter(entry.get("latency", {}).values()), {})
        task = metrics.get("task_accuracy_compressed",
                           next(iter(report["accuracy"].values()))["task_accuracy_original"] if i == 0 else None)
        rows.append({
            "step": name, "path": str(path), "size_bytes": entry["size_bytes"], "params": entry["params"],
            "heldout_accuracy": task, "top1_agreement": metrics.get("top1_agreement", 1.0 if i == 0 else None),
            "rel_l2": metrics.get("rel_l2", 0.0 if i == 0 else None),
            "latency_ratio": (1.0 if report.get("latency") else None) if i == 0 else latency.get("ratio"),
        })
    summary = {"exporter": how, "budget": args.budget, "calibrated": calibration is not None,
               "torch_accuracy": torch_acc, "steps": rows}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    base = rows[0]["size_bytes"]
    print("\nsummary (held-out accuracy on 540 digits images)")
    print(f"  {'step':<16} {'size':>10} {'x smaller':>9} {'accuracy':>9} {'top-1 vs original':>18} {'time ratio':>10}")
    for row in rows:
        agree = f"{row['top1_agreement']:.4f}" if row["top1_agreement"] is not None else "n/a"
        acc = f"{row['heldout_accuracy']:.4f}" if row["heldout_accuracy"] is not None else "n/a"
        ratio = f"{row['latency_ratio']:.2f}" if row["latency_ratio"] is not None else "n/a"
        print(f"  {row['step']:<16} {row['size_bytes'] / 1024:>7.1f} KiB {base / row['size_bytes']:>9.2f} "
              f"{acc:>9} {agree:>18} {ratio:>10}")
    print(f"written to {out_dir} (summary.json, bench.json, the models)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
