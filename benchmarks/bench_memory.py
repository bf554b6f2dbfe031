"""Peak memory and time of `onnx-lowrank optimize` on a model larger than protobuf's 2 GiB limit.

Builds (once, cached) a chain of N float32 4096x4096 MatMuls whose weights live in one external
data file (38 layers = 2.4 GiB), then runs the CLI in a subprocess and samples its peak RSS
(VmHWM of the child): with --jobs 1, --jobs 2 (whose output must be byte-identical) and, when
dask is installed, --dask local:2. Target (issue 8): peak RSS <= 1.5 x model size + 0.5 GiB.

    python benchmarks/bench_memory.py [--layers 38] [--size 4096] [--rank 64] [--dir /tmp/onnx-lowrank-big]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper


def build(path: Path, layers: int, size: int) -> None:
    """Write the model header and its data file tensor by tensor (never the whole model in memory)."""
    data = path.with_name(path.name + ".data")
    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    offset = 0
    with open(data, "wb") as fh:
        for i in range(layers):
            # a decaying spectrum, like trained weights: W = U diag(s) V^T built cheaply per block
            w = (rng.standard_normal((size, 64), dtype=np.float32) @ rng.standard_normal((64, size), dtype=np.float32)
                 + 0.05 * rng.standard_normal((size, size), dtype=np.float32)).astype(np.float32)
            raw = w.tobytes()
            fh.write(raw)
            t = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=[size, size])
            for key, value in (("location", data.name), ("offset", str(offset)), ("length", str(len(raw)))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value
            t.data_location = TensorProto.EXTERNAL
            offset += len(raw)
            inits.append(t)
            nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"], name=f"layer{i}/MatMul"))
            prev = f"h{i}"
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", size])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, ["batch", size])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="bench_memory")
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())


def run(cmd: list[str]) -> dict:
    """Run a command, sampling its peak RSS from /proc every 50 ms; returns seconds and peak."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as fh:
                for line in fh:
                    if line.startswith("VmHWM"):
                        peak = max(peak, int(line.split()[1]) * 1024)
        except FileNotFoundError:
            break
        time.sleep(0.05)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err}")
    return {"seconds": time.perf_counter() - start, "peak_rss": peak, "stdout": out}


def digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in (path, path.with_name(path.name + ".data")):
        if not p.exists():
            continue
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=38)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--dir", default="/tmp/onnx-lowrank-big")
    ap.add_argument("--json", default="benchmarks/results/memory.json")
    ap.add_argument("--no-dask", action="store_true", help="skip the --dask local:2 run")
    args = ap.parse_args()
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    src = d / f"chain_{args.layers}x{args.size}.onnx"
    if not src.exists():
        t = time.perf_counter()
        build(src, args.layers, args.size)
        print(f"built {src} in {time.perf_counter() - t:.1f}s")
    size = src.stat().st_size + src.with_name(src.name + ".data").stat().st_size
    target = 1.5 * size + 0.5 * 2**30
    runs = {}
    variants = [("jobs1", ["--jobs", "1"]), ("jobs2", ["--jobs", "2"])]
    try:
        import distributed  # noqa: F401

        if not args.no_dask:
            variants.append(("dask_local2", ["--dask", "local:2"]))
    except ImportError:
        pass
    for name, extra in variants:
        out = d / f"out_{name}.onnx"
        cmd = [sys.executable, "-m", "onnx_lowrank", "optimize", str(src), str(out), "--rank", str(args.rank),
               "--quiet", *extra]
        r = run(cmd)
        r.pop("stdout")
        r["sha256"] = digest(out)
        data = out.with_name(out.name + ".data")
        r["output_bytes"] = out.stat().st_size + (data.stat().st_size if data.exists() else 0)
        runs[name] = r
        print(f"{name}: {r['seconds']:.1f}s, peak RSS {r['peak_rss'] / 2**30:.2f} GiB "
              f"({r['peak_rss'] / size:.2f} x model), output {r['output_bytes'] / 2**20:.1f} MiB")
    same = len({r["sha256"] for r in runs.values()}) == 1
    result = {"model_bytes": size, "layers": args.layers, "size": args.size, "rank": args.rank,
              "target_peak_rss": target, "runs": runs, "identical_outputs": same,
              "within_target": all(r["peak_rss"] <= target for r in runs.values()),
              "command": " ".join(["python", *sys.argv])}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"model {size / 2**30:.2f} GiB; target peak {target / 2**30:.2f} GiB; identical outputs: {same}")


if __name__ == "__main__":
    main()
