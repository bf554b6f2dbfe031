"""Whole-model `onnx-lowrank optimize --ratio 0.5` on the real models: time per stage, peak RSS.

    python benchmarks/bench_whole_model.py [--repeat N]   # needs the models extra (models are built and cached)

Rows: the CLI on a 1 MiB model of four random MatMuls (the fixed cost of a run: threads, their
BLAS buffers, the allocator), on MiniLM as built (weights in an external data file), on the same
MiniLM saved as one file (no external data, the usual format below 2 GB) and on
EfficientNet-Lite0 (one file);
and the Python API on the single-file MiniLM, given a loaded ``ModelProto`` (``onnx.load``, then
``optimize(model)``, then ``save_model``) and given the path (``optimize(path)``, ``save_model``).

Each run is a fresh interpreter that reports its own peak RSS (VmHWM) when done; the baseline is
the peak of an interpreter that only imports numpy, onnx, onnxruntime and onnx_lowrank, and
each row gives its peak above it, in MiB and as a multiple of the model's weight bytes (issue
6's target: at most 2x). EfficientNet-Lite0 runs with the default jobs (one per core) and with
``--jobs 1``: each job thread has its own BLAS buffers and temporaries. Writes
benchmarks/results/whole_model.json; docs/performance.md quotes it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from models import registry  # noqa: E402

MiB = 2**20

_PRELUDE = """
import json, sys, time
import numpy, onnx, onnxruntime, onnx_lowrank, onnx_lowrank.cli

def _status(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024

def _done(**extra):
    print(json.dumps({"peak_rss": _status("VmHWM"), **extra}))
"""

BASELINE = _PRELUDE + "_done()\n"

CLI = _PRELUDE + """
from onnx_lowrank.cli import main
code = main(sys.argv[1:])
_done(code=code)
"""

API_MODEL_PROTO = _PRELUDE + """
from onnx_lowrank import LowRankConfig, optimize, save_model
model = onnx.load(sys.argv[1])
loaded = _status("VmRSS")
result, report = optimize(model, LowRankConfig(ratio=0.5))
start = time.perf_counter()
save_model(result, sys.argv[2])
seconds = dict(report.seconds, save=time.perf_counter() - start)
_done(rss_after_load=loaded, seconds=seconds)
"""

API_PATH = _PRELUDE + """
from onnx_lowrank import LowRankConfig, optimize, save_model
result, report = optimize(sys.argv[1], LowRankConfig(ratio=0.5))
start = time.perf_counter()
save_model(result, sys.argv[2], input_path=sys.argv[1])
seconds = dict(report.seconds, save=time.perf_counter() - start)
_done(seconds=seconds)
"""


def child(code: str, *args: str) -> dict:
    """Run ``python -c code args``; its last stdout line is its JSON report, plus wall seconds."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{args} failed:\n{proc.stderr}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = wall
    return result


def single_file_copy(path: Path, directory: Path) -> Path:
    """The model saved as one file (its external data inline), made once."""
    import onnx

    out = directory / f"{path.parent.name}_single.onnx"
    if not out.exists() or out.stat().st_mtime < path.stat().st_mtime:
        directory.mkdir(parents=True, exist_ok=True)
        onnx.save(onnx.load(path), out)
    return out


def tiny_model(directory: Path) -> Path:
    """Four 256 x 256 MatMuls with random weights (1 MiB): the fixed cost of a run, whatever the model."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    out = directory / "tiny_1mib.onnx"
    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i in range(4):
        inits.append(numpy_helper.from_array(rng.standard_normal((256, 256)).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"], name=f"mm{i}"))
        prev = f"h{i}"
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 256])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [2, 256])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), out)
    return out


def weights_digest(path: Path) -> str:
    """Digest of the initializers' names and bytes (identical results whatever the file format)."""
    import onnx

    h = hashlib.sha256()
    for t in onnx.load(path).graph.initializer:
        h.update(t.name.encode())
        h.update(t.raw_data)
    return h.hexdigest()[:16]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=1, help="runs per row; the lowest peak and wall time are kept")
    ap.add_argument("--dir", default=str(Path(tempfile.gettempdir()) / "onnx-lowrank-bench"),
                    help="where the single-file copy and the outputs go")
    args = ap.parse_args()
    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    minilm = Path(registry.get("minilm").build())
    effnet = Path(registry.get("efficientnet_lite0").build())
    minilm_single = single_file_copy(minilm, work)

    baseline = min(child(BASELINE)["peak_rss"] for _ in range(max(args.repeat, 2)))
    print(f"baseline: {baseline / MiB:.1f} MiB (numpy, onnx, onnxruntime, onnx_lowrank imported)")
    rows = [
        ("tiny_1mib", tiny_model(work), "cli", "one file", []),
        ("minilm", minilm, "cli", "external data file", []),
        ("minilm_single_file", minilm_single, "cli", "one file", []),
        ("efficientnet_lite0", effnet, "cli", "one file", []),
        ("efficientnet_lite0_jobs1", effnet, "cli", "one file", ["--jobs", "1"]),
        ("minilm_api_model_proto", minilm_single, "api_model_proto", "one file", []),
        ("minilm_api_path", minilm_single, "api_path", "one file", []),
    ]
    out: dict[str, dict] = {}
    for name, path, how, layout, extra in rows:
        weights = sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))
        target = work / f"{name}.lowrank.onnx"
        runs = []
        for _ in range(args.repeat):
            if how == "cli":
                report = work / f"{name}.report.json"
                r = child(CLI, "optimize", str(path), str(target), "--ratio", "0.5", "--quiet", "--report", str(report),
                          *extra)
                r["seconds"] = json.loads(report.read_text())["totals"]["seconds"]
                command = " ".join(["onnx-lowrank optimize", path.name, "OUT --ratio 0.5 --report r.json", *extra])
            elif how == "api_model_proto":
                r = child(API_MODEL_PROTO, str(path), str(target))
                command = "save_model(optimize(onnx.load(MODEL), LowRankConfig(ratio=0.5))[0], OUT)"
            else:
                r = child(API_PATH, str(path), str(target))
                command = "save_model(optimize(MODEL, LowRankConfig(ratio=0.5))[0], OUT, input_path=MODEL)"
            runs.append(r)
        best = min(runs, key=lambda r: r["peak_rss"])
        above = min(r["peak_rss"] for r in runs) - baseline
        row = {"model_bytes": weights, "layout": layout, "wall_s": round(min(r["wall_s"] for r in runs), 2),
               "peak_rss": min(r["peak_rss"] for r in runs), "baseline_rss": baseline, "peak_above_baseline": above,
               "x_weights": round(above / weights, 2),
               "seconds": {k: round(v, 3) for k, v in best["seconds"].items()},
               "output_weights_sha256": weights_digest(target), "command": command}
        if "rss_after_load" in best:  # the caller's loaded model, held throughout
            row["rss_after_load_above_baseline"] = best["rss_after_load"] - baseline
        if "tiny_1mib" in out:  # what is left once the fixed cost of any run is taken off
            fixed = out["tiny_1mib"]["peak_above_baseline"]
            row["x_weights_above_fixed_cost"] = round((above - fixed) / weights, 2)
        out[name] = row
        print(f"{name}: peak {row['peak_rss'] / MiB:.0f} MiB, {above / MiB:.0f} MiB above baseline = "
              f"{row['x_weights']:.2f}x of {weights / MiB:.0f} MiB weights; wall {row['wall_s']:.2f} s")
    (ROOT / "benchmarks" / "results" / "whole_model.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
