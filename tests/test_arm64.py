"""Tests of the ARM64 runtime (onnxruntime's aarch64 build under qemu-user) and ``bench --arm64``.

Tests marked ``needs_runtime`` run models under emulation; they skip with the reason when the
runtime is not prepared (``onnx-lowrank arm64-setup``, or ``.ci/arm64-setup.sh`` in CI). Each
emulated job costs ~2.5 s of interpreter start plus well under a second for these tiny models.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_lowrank
from builders import run_cli
from onnx_lowrank import LowRankConfig
from onnx_lowrank.cli import bench as bench_cli
from onnx_lowrank.measure import arm64, arm64_setup

# ARM64 vs x86, float32: max_abs <= 1e-6 + 1e-4 * max|x86 output| (arm64.ARM64_TOLERANCE). The two
# builds run different GEMM/conv kernels (NEON vs AVX), so results differ by float32 rounding only;
# measured here ~5e-7 absolute on outputs of magnitude ~1.
RTOL, ATOL = arm64.ARM64_TOLERANCE["float32"]
SAMPLES = 4


def _model() -> onnx.ModelProto:
    """x[1,8,8,8] -> Conv 3x3 -> Relu -> Flatten -> MatMul -> Relu -> Gemm(transB) -> logits[1,10]."""
    rng = np.random.default_rng(0)
    w0 = (rng.standard_normal((32, 8, 3, 3)) / 8).astype(np.float32)
    w1 = (rng.standard_normal((32 * 8 * 8, 128)) / 40).astype(np.float32)
    w2 = (rng.standard_normal((10, 128)) / 10).astype(np.float32)
    b2 = (rng.standard_normal(10) / 10).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "W0"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"]),
        helper.make_node("MatMul", ["f", "W1"], ["h"]),
        helper.make_node("Relu", ["h"], ["h2"]),
        helper.make_node("Gemm", ["h2", "W2", "b2"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "arm64_test",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])],
        [numpy_helper.from_array(a, n) for a, n in ((w0, "W0"), (w1, "W1"), (w2, "W2"), (b2, "b2"))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("arm64_models")
    original = _model()
    compressed, _report = onnx_lowrank.optimize(original, LowRankConfig(ratio=0.5))
    ops = [n.op_type for n in compressed.graph.node]
    assert ops.count("Conv") == 2 and ops.count("MatMul") == 2 and ops.count("Gemm") == 2, ops  # all factorized
    onnx.save(original, str(d / "orig.onnx"))
    onnx.save(compressed, str(d / "comp.onnx"))
    return str(d / "orig.onnx"), str(d / "comp.onnx")


@pytest.fixture(scope="module")
def runtime():
    state = arm64_setup.check()
    if not state.ready:
        pytest.skip(f"ARM64 runtime not set up: {state.reason}")
    return state


def _inputs(n: int = SAMPLES) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(1).standard_normal((n, 1, 8, 8, 8)).astype(np.float32)}


def _x86(path: str, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return [sess.run(None, {"x": x})[0] for x in inputs["x"]]


def _bench(argv, capsys):
    return run_cli(capsys, "bench", *argv)


def _setup_cli(argv, capsys):
    return run_cli(capsys, "arm64-setup", *argv)


# --------------------------------------------------------------------------------------------
# without the runtime
# --------------------------------------------------------------------------------------------


def test_check_on_empty_cache_gives_reason_and_changes_nothing(tmp_path, capsys):
    empty = tmp_path / "cache"
    empty.mkdir()
    state = arm64_setup.check(empty)
    assert not state.ready
    assert "arm64-setup" in state.reason and "\n" not in state.reason
    code, out, err = _setup_cli(["--cache", empty, "--check"], capsys)
    assert code == 1
    assert err.startswith("not ready: ") and err.count("\n") == 1 and "arm64-setup" in err
    assert list(empty.iterdir()) == []  # --check changed nothing
    missing = tmp_path / "never-created"
    assert _setup_cli(["--cache", missing, "--check"], capsys)[0] == 1
    assert not missing.exists()


def test_run_models_unavailable_reports_reason(tmp_path, model_files):
    res = arm64.run_models_arm64([model_files[0]], _inputs(1), cache=tmp_path)
    assert res["available"] is False
    assert str(tmp_path) in res["reason"] or "qemu" in res["reason"]


def test_bench_arm64_unavailable_leaves_rest_of_report(tmp_path, model_files, capsys):
    out_json = tmp_path / "out.json"
    code, out, _ = _bench([*model_files, "--arm64", "--arm64-cache", tmp_path / "empty", "--runs", "3",
                           "--samples", "2", "--json", out_json], capsys)
    assert code == 0  # an unready runtime is not a failure
    report = json.loads(out_json.read_text())
    sec = report["arm64"]
    assert {"available", "onnxruntime", "outputs"} <= set(sec)
    assert sec["available"] is False and sec["onnxruntime"] is None and sec["outputs"] == {}
    assert sec["status"].startswith("unavailable: ") and "arm64-setup" in sec["status"]
    assert "unavailable: " in out
    assert report["accuracy"]["logits"]["samples"] == 2  # the rest is computed as without --arm64
    assert report["latency"]["CPUExecutionProvider"]["runs"] == 3


def test_bench_help_says_emulated_time_is_not_latency():
    parser = argparse.ArgumentParser(prog="onnx-lowrank bench")
    bench_cli.add_bench_arguments(parser)
    text = " ".join(parser.format_help().split())
    assert "--arm64" in text and "NOT reported as latency" in text


def test_missing_tool_prints_one_line_to_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(arm64_setup, "find_qemu", lambda cache=None: None)
    monkeypatch.setattr(arm64_setup.shutil, "which", lambda name: None)  # no qemu, no apt-get
    code, out, err = _setup_cli(["--cache", tmp_path / "c"], capsys)
    assert code == 1
    assert out.startswith("[1/5] qemu-user: ")  # the step says what it does before failing
    assert err.count("\n") == 1 and "qemu-user-static" in err and "rerun onnx-lowrank arm64-setup" in err


def test_step_needing_root_prints_one_line_to_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(arm64_setup, "find_qemu", lambda cache=None: None)
    monkeypatch.setattr(arm64_setup, "_is_root", lambda: False)
    monkeypatch.setattr(arm64_setup.shutil, "which", lambda name: f"/usr/bin/{name}")

    def stale_lists(cmd, **kw):
        raise arm64_setup.SetupError("apt-get download qemu-user-static failed: E: Unable to locate package")

    monkeypatch.setattr(arm64_setup, "_run", stale_lists)
    code, out, err = _setup_cli(["--cache", tmp_path / "c"], capsys)
    assert code == 1
    assert err.count("\n") == 1 and "run: sudo apt-get update" in err
    code, out, err = _setup_cli(["--cache", tmp_path / "c", "--no-install"], capsys)
    assert code == 1 and err.count("\n") == 1 and "run: sudo apt-get install -y qemu-user-static" in err


def test_arm64_vs_x86_tolerance():
    ref = [np.array([[1.0, -2.0, 0.5]], np.float32)]
    close = [ref[0] + np.float32(1e-6)]
    far = [ref[0] + np.float32(1e-3)]
    assert arm64.compare_arm64_x86(close, ref)["match"]
    assert not arm64.compare_arm64_x86(far, ref)["match"]  # 1e-3 > 1e-6 + 1e-4 * 2
    ints = [np.array([1, 2, 3])]
    assert arm64.compare_arm64_x86(ints, ints)["match"]
    assert not arm64.compare_arm64_x86([ints[0] + 1], ints)["match"]
    assert arm64.compare_arm64_x86([np.zeros((1, 2))], [np.zeros((1, 3))])["match"] is False


# --------------------------------------------------------------------------------------------
# with the runtime (skips with the reason when it is not set up)
# --------------------------------------------------------------------------------------------


def test_matmul_gemm_conv_model_and_factorized_match_x86_on_arm64(runtime, model_files):
    inputs = _inputs()
    res = arm64.run_models_arm64(list(model_files), inputs, cache=runtime.cache)
    assert res["available"], res.get("reason")
    assert res["machine"] == "aarch64" and res["onnxruntime"] == arm64_setup.ORT_VERSION
    assert res["samples"] == SAMPLES
    for path, run in zip(model_files, res["models"]):
        assert "error" not in run, run.get("error")
        got, ref = run["outputs"]["logits"], _x86(path, inputs)
        assert len(got) == SAMPLES and got[0].shape == (1, 10) and got[0].dtype == np.float32
        for g, r in zip(got, ref):
            assert not np.array_equal(g, np.zeros_like(g))
            np.testing.assert_allclose(g, r, rtol=0, atol=ATOL + RTOL * float(np.max(np.abs(r))))
    # the compression error itself is the same on both architectures
    a_orig, a_comp = (np.stack(r["outputs"]["logits"]) for r in res["models"])
    x_orig, x_comp = (np.stack(_x86(p, inputs)) for p in model_files)
    err_arm = np.linalg.norm(a_comp - a_orig) / np.linalg.norm(a_orig)
    err_x86 = np.linalg.norm(x_comp - x_orig) / np.linalg.norm(x_orig)
    assert abs(err_arm - err_x86) <= 1e-4 * err_x86


def test_bench_arm64_json(runtime, model_files, tmp_path, capsys):
    out_json = tmp_path / "out.json"
    code, out, err = _bench([*model_files, "--arm64", "--arm64-cache", runtime.cache, "--runs", "0",
                             "--samples", "8", "--json", out_json], capsys)
    assert code == 0, err
    sec = json.loads(out_json.read_text())["arm64"]
    assert {"available", "onnxruntime", "outputs"} <= set(sec)
    assert sec["available"] is True and sec["status"] == "ok"
    assert sec["onnxruntime"] == arm64_setup.ORT_VERSION and sec["runtime"]["machine"] == "aarch64"
    assert sec["samples"] == arm64.DEFAULT_SAMPLES
    assert [m["ran"] for m in sec["models"]] == [True, True]
    entry = sec["outputs"]["logits"]
    for role in ("original", "compressed"):
        cmp = entry["arm64_vs_x86"][role]
        assert cmp["match"] and cmp["max_abs"] <= ATOL + RTOL * cmp["ref_max_abs"]
    assert entry["compressed_vs_original"]["samples"] == arm64.DEFAULT_SAMPLES
    assert entry["compressed_vs_original"]["rel_l2"] > 0
    assert not any("_ms" in k or "latency" in k for k in sec)  # emulated time is not a latency
    assert "ARM64 onnxruntime under qemu" in out and "DIFFER" not in out


def test_setup_is_idempotent_and_quick_when_done(runtime, capsys):
    code, out, err = _setup_cli(["--cache", runtime.cache, "--no-install"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert [ln[:5] for ln in lines if ln.startswith("[")] == ["[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]"]
    assert sum("already" in ln for ln in lines) == 4  # qemu, sysroot, wheels, bytecode skipped
    assert lines[-1].startswith("ready in ")
