"""Tests of the ``bench`` subcommand, run in-process through argparse."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from builders import run_cli


def _mlp(path, rank=None, out_op="Gemm"):
    """x[N,16] -> MatMul -> Relu -> Gemm -> logits[N,5]; ``rank`` factorizes the MatMul (SVD)."""
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((16, 32)) / 4).astype(np.float32)
    w2 = (rng.standard_normal((32, 5)) / 4).astype(np.float32)
    inits = [numpy_helper.from_array(w2, "W2"), numpy_helper.from_array(np.zeros(5, np.float32), "b2")]
    if rank is None:
        inits.append(numpy_helper.from_array(w1, "W1"))
        nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"])]
    else:
        u, s, vt = np.linalg.svd(w1, full_matrices=False)
        inits += [
            numpy_helper.from_array((u[:, :rank] * s[:rank]).astype(np.float32), "A"),
            numpy_helper.from_array(vt[:rank].astype(np.float32), "B"),
        ]
        nodes = [helper.make_node("MatMul", ["x", "A"], ["t"]), helper.make_node("MatMul", ["t", "B"], ["h"])]
    nodes += [helper.make_node("Relu", ["h"], ["r"]), helper.make_node(out_op, ["r", "W2", "b2"], ["logits"])]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return str(path)


@pytest.fixture()
def models(tmp_path):
    return _mlp(tmp_path / "orig.onnx"), _mlp(tmp_path / "comp.onnx", rank=4), _mlp(tmp_path / "comp8.onnx", rank=8)


def bench(argv, capsys):
    return run_cli(capsys, "bench", *argv)


def test_full_report_json_schema_and_provider_fallback(models, tmp_path, capsys):
    orig, comp, _ = models
    out_json = tmp_path / "out.json"
    code, out, err = bench(
        [orig, comp, "--shape", "N=1", "--samples", "4", "--runs", "3", "--warmup", "1",
         "--providers", "XnnpackExecutionProvider,CPUExecutionProvider", "--threads", "1",
         "--mobile", "--json", out_json],
        capsys,
    )
    assert code == 0, err
    report = json.loads(out_json.read_text())
    assert list(report) == ["models", "accuracy", "latency", "providers", "mobile"]
    for m in report["models"]:
        assert {"path", "params", "size_bytes", "flops"} <= set(m)
    assert report["models"][0]["params"] == 16 * 32 + 32 * 5 + 5
    assert report["models"][1]["params"] == 4 * (16 + 32) + 32 * 5 + 5
    assert report["models"][0]["flops"] == 2 * (16 * 32 + 32 * 5)
    acc = report["accuracy"]["logits"]
    assert {"max_abs", "rel_l2", "cosine", "top1_agreement", "kl"} <= set(acc)
    assert acc["samples"] == 4

    # the XNNPACK request fell back to the CPU: reported, and never a latency key
    prov = report["providers"]
    assert prov["requested"] == ["XnnpackExecutionProvider", "CPUExecutionProvider"]
    assert prov["unavailable"] == ["XnnpackExecutionProvider"]
    assert prov["used"] == ["CPUExecutionProvider"]
    assert list(report["latency"]) == ["CPUExecutionProvider"]
    lat = report["latency"]["CPUExecutionProvider"]
    for key in ("original_ms", "compressed_ms", "ratio", "p90_original_ms", "p90_compressed_ms", "flop_ratio"):
        assert isinstance(lat[key], float), key
    assert lat["ratio"] == pytest.approx(lat["compressed_ms"] / lat["original_ms"])
    assert lat["flop_ratio"] == pytest.approx(report["models"][1]["flops"] / report["models"][0]["flops"])
    assert lat["runs"] == 3 and lat["threads"] == 1 and lat["opt_level"] == "all"
    assert lat["requested"] == ["XnnpackExecutionProvider", "CPUExecutionProvider"]

    mob = report["mobile"]
    assert set(mob) == {"nnapi", "coreml", "ort_format"}
    assert set(mob["nnapi"]) == {"original", "compressed"}
    assert mob["ort_format"]["original"]["outputs_match"] and mob["ort_format"]["compressed"]["outputs_match"]
    assert mob["ort_format"]["new_operators"] == []

    assert "unavailable: XnnpackExecutionProvider" in out
    assert "CPUExecutionProvider" in out and "accuracy vs original" in out


def test_inputs_npz_with_labels_and_max_error(models, tmp_path, capsys):
    orig, comp, _ = models
    x = np.random.default_rng(3).standard_normal((10, 16)).astype(np.float32)
    np.savez(tmp_path / "data.npz", x=x, labels=np.arange(10) % 5)
    out_json = tmp_path / "r.json"
    code, out, err = bench([orig, comp, "--inputs", tmp_path / "data.npz", "--runs", "0", "--json", out_json], capsys)
    assert code == 0, err
    acc = json.loads(out_json.read_text())["accuracy"]["logits"]
    assert acc["samples"] == 10
    assert 0.0 <= acc["task_accuracy_original"] <= 1.0 and "task_accuracy_compressed" in acc
    assert json.loads(out_json.read_text())["latency"] == {}  # --runs 0 skips latency

    code, out, err = bench([orig, comp, "--inputs", tmp_path / "data.npz", "--runs", "0", "--max-error", "1e-9"], capsys)
    assert code == 1
    assert "FAIL:" in err and "exceeds --max-error" in err


def test_several_compressed_models(models, tmp_path, capsys):
    orig, comp, comp8 = models
    out_json = tmp_path / "r.json"
    code, _, err = bench([orig, comp, comp8, "--shape", "N=1", "--samples", "2", "--runs", "2", "--json", out_json], capsys)
    assert code == 0, err
    report = json.loads(out_json.read_text())
    assert len(report["models"]) == 3
    first, second = report["accuracy"]["logits"], report["models"][2]["accuracy"]["logits"]
    assert second["rel_l2"] < first["rel_l2"]  # rank 8 is closer than rank 4
    assert "CPUExecutionProvider" in report["models"][2]["latency"]


def test_new_operator_type_is_reported_by_the_mobile_check(models, tmp_path, capsys):
    orig, _, _ = models
    other = _mlp(tmp_path / "matmul_add.onnx", out_op="Gemm")
    # replace the Gemm by MatMul + Add: a reduced build made for the original has no Add kernel
    m = onnx.load(other)
    gemm = m.graph.node[-1]
    m.graph.node.remove(gemm)
    m.graph.node.extend([
        helper.make_node("MatMul", ["r", "W2"], ["mm"]),
        helper.make_node("Sin", ["mm"], ["logits"]),
    ])
    onnx.save(m, other)
    out_json = tmp_path / "mobile.json"
    code, out, err = bench([orig, other, "--shape", "N=1", "--samples", "1", "--runs", "0", "--mobile",
                            "--json", out_json], capsys)
    assert code == 0, err  # a warning, not a failure: the compressed model runs on its own build
    assert "new operator types needed by the compressed model:" in out and "Sin" in out
    assert any(op.endswith(";Sin") for op in json.loads(out_json.read_text())["mobile"]["ort_format"]["new_operators"])


@pytest.mark.parametrize(
    ("argv_tail", "npz", "needle", "code"),
    [
        (["--shape", "N=1"], None, "model file not found", 1),  # compressed path replaced below; input failure
        (["--shape", "N"], None, "bad --shape 'N'", 2),
        (["--shape", "batch=1"], None, "no input or symbolic dimension of that name", 2),
        (["--inputs"], {"X": np.zeros((2, 16), np.float32)}, "no array for model input(s) 'x'", 2),
        (["--inputs"], {"x": np.zeros((2, 8), np.float32)}, "sample shape (1, 8)", 2),
        (["--inputs"], {"x": np.zeros((2, 16), np.float32)}, "inputs file not found", 1),
        (["--shape", "N=1", "--providers", "XnnpackProvider"], None, "unknown execution provider", 2),
        (["--shape", "N=1", "--int-range", "9:2"], None, "bad --int-range", 2),
    ],
)
def test_bad_inputs_give_one_line(models, tmp_path, capsys, argv_tail, npz, needle, code):
    orig, comp, _ = models
    argv = [orig, comp, *argv_tail]
    if needle == "model file not found":
        argv[1] = tmp_path / "missing.onnx"
    if argv_tail == ["--inputs"]:
        path = tmp_path / "in.npz"
        if needle != "inputs file not found":
            np.savez(path, **npz)
        argv.append(path)
    got, out, err = bench(argv, capsys)
    assert got == code
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("onnx-lowrank bench: error: ") and needle in lines[0], lines[0]
    assert "Traceback" not in err and out == ""


def test_model_that_fails_to_load_is_exit_1(models, tmp_path, capsys):
    orig, _, _ = models
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x07garbage")
    got, _, err = bench([orig, junk, "--shape", "N=1", "--runs", "0"], capsys)
    assert got == 1
    assert err.startswith("onnx-lowrank bench: error: ") and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is not None, reason="matplotlib is installed")
def test_plot_without_matplotlib(models, tmp_path, capsys):
    orig, comp, _ = models
    got, _, err = bench([orig, comp, "--shape", "N=1", "--plot", tmp_path / "p.png"], capsys)
    assert got == 2
    assert err.strip() == "onnx-lowrank bench: error: --plot needs matplotlib: pip install onnx-lowrank[plot]"


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib is not installed")
def test_plot_with_matplotlib(models, tmp_path, capsys):
    orig, comp, _ = models
    got, _, err = bench([orig, comp, "--shape", "N=1", "--runs", "3", "--plot", tmp_path / "p.png"], capsys)
    assert got == 0, err
    assert (tmp_path / "p.png").stat().st_size > 0


def test_bench_from_python_with_a_config_equals_the_cli(tmp_path, capsys):
    """``onnx_lowrank.bench.bench`` with a BenchConfig, on the bundled digits model and an optimized copy."""
    from builders import DATA

    import onnx_lowrank
    from onnx_lowrank.bench import BenchConfig, BenchResult, bench as run_bench

    original = str(DATA / "digits_mlp.onnx")
    compressed = tmp_path / "digits.lowrank.onnx"
    # the demo's recipe: 30% of the layers' parameters, calibrated on the bundled training images
    model, _ = onnx_lowrank.optimize(original, onnx_lowrank.LowRankConfig(target_params=0.3),
                                     calibration=str(DATA / "digits_calibration.npz"))
    onnx_lowrank.save_model(model, compressed)
    heldout = str(DATA / "digits_heldout.npz")

    config = BenchConfig(inputs=heldout, samples=64, runs=0)
    result = run_bench(original, [compressed], config)
    assert isinstance(result, BenchResult) and result.failures == []
    assert capsys.readouterr().out == ""  # the library prints nothing
    report = result.report
    size_ratio = report["models"][1]["size_bytes"] / report["models"][0]["size_bytes"]
    params_ratio = report["models"][1]["params"] / report["models"][0]["params"]
    assert size_ratio < 0.5 and params_ratio < 0.5
    assert report["models"][0]["params"] == onnx_lowrank.flops.count_params(onnx.load(original))
    acc = report["accuracy"]["logits"]
    assert {"max_abs", "rel_l2", "cosine", "top1_agreement", "kl", "task_accuracy_original",
            "task_accuracy_compressed"} <= set(acc)
    assert acc["samples"] == 64
    assert acc["task_accuracy_original"] > 0.95 and acc["top1_agreement"] >= 0.95
    assert abs(acc["task_accuracy_compressed"] - acc["task_accuracy_original"]) <= 0.05
    assert report["latency"] == {} and result.raw_times == {}  # runs=0 skips latency
    assert result.meta["source"] == "64 of 540 samples from digits_heldout.npz"

    # the CLI is the same call: the same numbers in its JSON, the same table on stdout
    out_json = tmp_path / "cli.json"
    code, out, err = bench([original, compressed, "--inputs", heldout, "--samples", "64", "--runs", "0",
                            "--json", out_json], capsys)
    assert code == 0, err
    cli = json.loads(out_json.read_text())
    assert cli["accuracy"]["logits"]["top1_agreement"] == acc["top1_agreement"]
    assert cli["accuracy"]["logits"]["rel_l2"] == pytest.approx(acc["rel_l2"], rel=1e-12)
    assert [m["size_bytes"] for m in cli["models"]] == [m["size_bytes"] for m in report["models"]]
    assert out.rstrip("\n") == result.format_table()
    assert json.loads(result.to_json()) == cli

    # a gate given in the config is a failure in the result, not an exception
    gated = run_bench(original, [compressed], BenchConfig(inputs=heldout, samples=8, runs=0, max_error=1e-9))
    assert len(gated.failures) == 1 and "exceeds --max-error 1e-09" in gated.failures[0]


def test_bench_config_defaults_are_the_cli_defaults():
    import argparse
    from dataclasses import fields

    from onnx_lowrank.bench import BenchConfig
    from onnx_lowrank.cli.bench import add_bench_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    args = parser.parse_args(["orig.onnx"])
    assert config_from_args(args) == BenchConfig()
    assert {f.name for f in fields(BenchConfig)} <= set(vars(args))


def test_free_dimensions_default_to_one_with_a_note(models, capsys, caplog):
    orig, comp, _ = models
    code, out, err = bench([orig, comp, "--samples", "2", "--runs", "2"], capsys)
    assert code == 0, err
    assert "free dimension(s) x[0] (N) set to 1; choose them with --shape x=Nx16" in caplog.text
    assert "2 generated samples (seed 0; caution: generated, not real data" in out
