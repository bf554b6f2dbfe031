"""Models with external data optimized with their weights left on disk (bounded memory)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
from onnx import helper

from builders import init, make_model, rel_err, run, vi
from onnx_lowrank import LowRankConfig, optimize, save_model
from onnx_lowrank.model_io import ModelError


def _external_model(tmp_path, layers=4, size=256, seed=0):
    rng = np.random.default_rng(seed)
    nodes, inits, prev = [], [], "x"
    for i in range(layers):
        inits.append(init(f"w{i}", rng.standard_normal((size, size)).astype(np.float32)))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"], name=f"mm{i}"))
        prev = f"h{i}"
    inits.append(init("bias", np.ones(size, np.float32)))
    nodes.append(helper.make_node("Add", [prev, "bias"], ["y"], name="add"))
    model = make_model(nodes, [vi("x", [2, size])], [vi("y", [2, size])], inits)
    x = rng.standard_normal((2, size)).astype(np.float32)
    expected = run(model, {"x": x})[0]
    path = tmp_path / "in" / "model.onnx"
    path.parent.mkdir()
    onnx.save(model, path, save_as_external_data=True, location="weights.bin", size_threshold=0)
    return path, x, expected


def test_lazy_full_rank_reproduces_and_input_untouched(tmp_path):
    path, x, expected = _external_model(tmp_path)
    before = (path.parent / "weights.bin").read_bytes()
    model, report = optimize(path, LowRankConfig(rank=100000, force=True), lazy=True)
    assert all(r.status == "factorized" for r in report.layers)
    # unchanged tensors still refer to the input's data file until saved
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    out = tmp_path / "out" / "model.onnx"
    out.parent.mkdir()
    save_model(model, out, input_path=path)
    assert rel_err(run(onnx.load(out), {"x": x})[0], expected) < 1e-5
    assert (path.parent / "weights.bin").read_bytes() == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx", "model.onnx.data"]


def test_lazy_equals_eager_bytes(tmp_path):
    path, _, _ = _external_model(tmp_path, seed=1)
    config = LowRankConfig(rank=32)
    lazy, _ = optimize(path, config, lazy=True)
    eager, _ = optimize(path, config, lazy=False)
    for a, b in (("lazy.onnx", lazy), ("eager.onnx", eager)):
        save_model(b, tmp_path / a, input_path=path, external_data=True)
    a_model, b_model = onnx.load(tmp_path / "lazy.onnx"), onnx.load(tmp_path / "eager.onnx")
    for ta, tb in zip(a_model.graph.initializer, b_model.graph.initializer):
        assert ta.name == tb.name and ta.raw_data == tb.raw_data


def test_lazy_with_calibration_and_jobs(tmp_path):
    path, x, _ = _external_model(tmp_path, seed=2)
    calib = {"x": np.random.default_rng(3).standard_normal((16, 2, 256)).astype(np.float32)}
    eager, _ = optimize(path, LowRankConfig(target_params=0.4, jobs=1, allocation="energy"), calibration=calib,
                        lazy=False)
    # the weighted allocation (the default with calibration) would load the model: energy instead
    lazy, report = optimize(path, LowRankConfig(target_params=0.4, jobs=2), calibration=calib, lazy=True)
    assert report.details["allocation"] == {"method": "energy"}
    assert all(r.whitened_error is not None for r in report.factorized)
    save_model(lazy, tmp_path / "l.onnx", input_path=path)
    np.testing.assert_array_equal(run(onnx.load(tmp_path / "l.onnx"), {"x": x})[0], run(eager, {"x": x})[0])


def test_saving_without_input_path_is_refused(tmp_path):
    path, _, _ = _external_model(tmp_path)
    model, _ = optimize(path, LowRankConfig(rank=8), lazy=True)
    try:
        save_model(model, tmp_path / "o.onnx")
    except ModelError as exc:
        assert "pass input_path" in str(exc)
    else:
        raise AssertionError("expected ModelError")


# VmHWM (peak RSS of this process image); getrusage's maxrss survives exec and would report
# the parent pytest process's peak.
RSS_SCRIPT = r"""
import json, sys
from onnx_lowrank import LowRankConfig, optimize, save_model
path, out, lazy = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
model, _ = optimize(path, LowRankConfig(rank=16), lazy=lazy)
save_model(model, out, input_path=path)
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(json.dumps({"peak_kb": int(hwm)}))
"""


def test_lazy_peak_memory_is_bounded(tmp_path):
    # 16 x 1024x1024 float32 = 64 MiB of weights: eager holds them (and copies); lazy one at a time
    path, _, _ = _external_model(tmp_path, layers=16, size=1024, seed=4)
    peaks = {}
    for lazy in (True, False):
        proc = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(path), str(tmp_path / f"o{lazy}.onnx"),
                               "1" if lazy else "0"], capture_output=True, text=True, check=True)
        peaks[lazy] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_kb"] / 1024
    # the eager run holds at least the 64 MiB of weights more than the lazy one
    assert peaks[False] - peaks[True] > 48, peaks


def test_cli_switches_to_lazy_above_the_threshold(tmp_path, monkeypatch, capsys):
    from onnx_lowrank import api
    from onnx_lowrank.cli import main

    path, x, expected = _external_model(tmp_path, seed=5)
    monkeypatch.setattr(api, "LAZY_THRESHOLD", 1000)  # this small model counts as "large"
    out = tmp_path / "cli.onnx"
    assert main(["optimize", str(path), str(out), "--rank", "100000", "--force", "--jobs", "2"]) == 0
    assert "factorized 4 of 4" in capsys.readouterr().out
    assert (tmp_path / "cli.onnx.data").exists()  # unchanged tensors streamed into the output's data file
    assert rel_err(run(onnx.load(out), {"x": x})[0], expected) < 1e-5
