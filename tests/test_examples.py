"""The example scripts run as documented and show what they claim."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "examples" / "export_compress_quantize.py"


def test_export_compress_quantize_recipe(tmp_path: Path):
    pytest.importorskip("torch")
    pytest.importorskip("onnx_ir")
    pytest.importorskip("sklearn")
    out = tmp_path / "recipe"
    done = subprocess.run(
        [sys.executable, str(RECIPE), "--out-dir", str(out), "--runs", "5", "--epochs", "10"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=dict(os.environ),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for text in ("1. trained", "2. PassManager([LowRankPass(", "3. quantize_dynamic", "$ onnx-lowrank bench", "summary"):
        assert text in done.stdout

    summary = json.loads((out / "summary.json").read_text())
    steps = {row["step"]: row for row in summary["steps"]}
    assert list(steps) == ["original", "low-rank", "low-rank + int8", "int8 only"]
    original, lowrank, both, int8 = (steps[k] for k in steps)
    assert summary["calibrated"] is True and summary["budget"] == 0.25

    # Low rank keeps a quarter of the layers' parameters; int8 then stores each in a byte.
    assert lowrank["params"] <= 0.26 * original["params"]
    assert lowrank["size_bytes"] < 0.27 * original["size_bytes"]
    assert both["size_bytes"] < 0.3 * lowrank["size_bytes"]
    assert both["size_bytes"] < 0.1 * original["size_bytes"]
    assert int8["size_bytes"] > 3 * both["size_bytes"]

    # ... and the two compose without losing the task.
    assert original["heldout_accuracy"] >= 0.95
    assert original["heldout_accuracy"] == pytest.approx(summary["torch_accuracy"], abs=1e-9)
    for row in (lowrank, both, int8):
        assert row["heldout_accuracy"] >= original["heldout_accuracy"] - 0.02
        assert row["top1_agreement"] >= 0.98
        assert row["rel_l2"] < 0.05
    assert (out / "lowrank.int8.onnx").is_file() and (out / "bench.json").is_file()


def test_recipe_without_torch_says_what_to_install(tmp_path: Path):
    code = (
        "import sys, runpy\n"
        "sys.modules['torch'] = None  # as if PyTorch were not installed\n"
        f"sys.argv = [{str(RECIPE)!r}, '--out-dir', {str(tmp_path)!r}]\n"
        f"runpy.run_path({str(RECIPE)!r}, run_name='__main__')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip() == "this example needs torch: pip install torch"
    assert list(tmp_path.iterdir()) == []
