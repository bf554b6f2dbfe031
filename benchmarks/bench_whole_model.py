"""Whole-model `onnx-lowrank optimize --ratio 0.5` on the real models: time per stage, peak RSS.

    python benchmarks/bench_whole_model.py      # needs the models extra (models are built and cached)

Writes benchmarks/results/whole_model.json; docs/performance.md quotes it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from bench_memory import run  # noqa: E402
from models import registry  # noqa: E402


def main() -> None:
    out: dict[str, dict] = {}
    for name in ("minilm", "efficientnet_lite0"):
        path = Path(registry.get(name).build())
        weights = sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))
        report = Path(f"/tmp/{name}.report.json")
        result = run([sys.executable, "-m", "onnx_lowrank", "optimize", str(path), f"/tmp/{name}.lowrank.onnx",
                      "--ratio", "0.5", "--quiet", "--report", str(report)])
        seconds = json.loads(report.read_text())["totals"]["seconds"]
        out[name] = {"model_bytes": weights, "wall_s": round(result["seconds"], 2), "peak_rss": result["peak_rss"],
                     "seconds": {k: round(v, 3) for k, v in seconds.items()},
                     "command": f"onnx-lowrank optimize {path.name} OUT --ratio 0.5 --report r.json"}
        print(name, json.dumps(out[name]))
    (ROOT / "benchmarks" / "results" / "whole_model.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
