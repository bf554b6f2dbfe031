"""The optimize command: exit codes, one-line errors, nothing written on failure, input untouched."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from builders import DATA, init, make_model, rel_err, run, run_cli, save_small_matmul, vi

DIGITS = DATA / "digits_mlp.onnx"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def small_model(tmp_path: Path) -> Path:
    return save_small_matmul(tmp_path / "in.onnx", seed=0)


def test_optimize_writes_model_table_and_report(tmp_path, small_model, capsys):
    out, rep = tmp_path / "out.onnx", tmp_path / "r.json"
    code, stdout, stderr = run_cli(capsys, "optimize", small_model, out, "--ratio", "0.5", "--report", rep)
    assert code == 0, stderr
    assert "mm" in stdout and "factorized 1 of 1" in stdout and "file size" in stdout
    data = json.loads(rep.read_text())
    row = data["layers"][0]
    assert row["rank"] == 13 and row["shape"] == [64, 48] and row["params_after"] == 13 * 112
    assert data["totals"]["factorized"] == 1 and data["config"]["ratio"] == 0.5
    assert data["totals"]["size_after"] == out.stat().st_size
    onnx.checker.check_model(onnx.load(out), full_check=True)


def test_json_flag_prints_report(tmp_path, small_model, capsys):
    code, stdout, _ = run_cli(capsys, "optimize", small_model, tmp_path / "o.onnx", "--rank", "4", "--json")
    assert code == 0
    assert json.loads(stdout)["layers"][0]["rank"] == 4


def test_full_rank_force_equals_reference(tmp_path, small_model, capsys):
    out = tmp_path / "out.onnx"
    assert run_cli(capsys, "optimize", small_model, out, "--rank", "100000", "--force")[0] == 0
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    assert rel_err(run(onnx.load(out), {"x": x})[0], run(onnx.load(small_model), {"x": x})[0]) < 1e-5


def test_unprofitable_layer_is_reported_and_kept(tmp_path, small_model, capsys):
    code, stdout, _ = run_cli(capsys, "optimize", small_model, tmp_path / "o.onnx", "--rank", "40", "--json")
    row = json.loads(stdout)["layers"][0]
    assert code == 0 and row["status"] == "skipped"
    assert row["reason"].startswith("unprofitable: rank 40 >= break-even 28")


BAD_OPTIONS = [
    (["--ratio", "1.5"], "--ratio must be in (0, 1]"),
    (["--ratio", "0"], "--ratio must be in (0, 1]"),
    (["--rank", "-3"], "argument --rank: expected an integer >= 1, got '-3'"),
    (["--rank", "0"], "argument --rank: expected an integer >= 1, got '0'"),
    (["--multiple-of", "0"], "argument --multiple-of: expected an integer >= 1, got '0'"),
    (["--check", "--samples", "-2"], "argument --samples: expected an integer >= 1, got '-2'"),
    (["--jobs", "-1"], "argument --jobs: expected an integer >= 0, got '-1'"),
    (["--seed", "-5"], "argument --seed: expected an integer >= 0, got '-5'"),
    (["--power-iters", "-1"], "argument --power-iters: expected an integer >= 0, got '-1'"),
    (["--min-params", "-10"], "argument --min-params: expected an integer >= 0, got '-10'"),
    (["--jobs", "two"], "argument --jobs: expected an integer, got 'two'"),
    (["--energy", "2"], "--energy must be in (0, 1]"),
    (["--rank", "3", "--ratio", "0.5"], "not allowed with argument"),
    (["--ratio", "abc"], "expected a number"),
    (["--op-types", "MatMul,Foo"], "--op-types takes a comma-separated subset"),
    (["--exclude", "("], "--exclude '(' is not a valid regular expression"),
    (["--method", "qr"], "invalid choice: 'qr'"),
    # --max-error is the budget search's target; the gate of --check is --check-max-error
    (["--max-error", "0.1"], "use --check-max-error E"),
    (["--max-error", "0.1", "--check"], "use --check-max-error E"),
    (["--check-max-error", "0.1"], "--check-max-error needs --check"),
    (["--check", "--check-max-error", "0"], "--check-max-error must be > 0, got 0.0"),
]


@pytest.mark.parametrize("extra,message", BAD_OPTIONS)
def test_bad_options_exit_2_with_one_line(tmp_path, small_model, capsys, extra, message):
    before = _sha(small_model)
    out = tmp_path / "out.onnx"
    code, stdout, stderr = run_cli(capsys, "optimize", small_model, out, *extra)
    assert code == 2
    assert message in stderr and len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    assert not out.exists() and _sha(small_model) == before




def test_bad_inputs_exit_1_with_one_line(tmp_path, small_model, capsys):
    out = tmp_path / "out.onnx"
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n" * 10)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(small_model.read_bytes()[: small_model.stat().st_size // 2])
    cases = {
        tmp_path / "missing.onnx": "no such file",
        text: "not a valid ONNX model",
        empty: "the file is empty",
        truncated: "not a valid ONNX model",
        tmp_path: "is a directory",
    }
    for path, message in cases.items():
        code, _, stderr = run_cli(capsys, "optimize", path, out)
        assert code == 1, (path, stderr)
        assert message in stderr and len(stderr.strip().splitlines()) == 1, stderr
        assert not out.exists()


def test_output_equal_to_input_is_refused(small_model, capsys):
    before = _sha(small_model)
    code, _, stderr = run_cli(capsys, "optimize", small_model, small_model)
    assert code == 2 and "is the input model" in stderr
    same = small_model.parent / ".." / small_model.parent.name / small_model.name
    code, _, stderr = run_cli(capsys, "optimize", small_model, same)
    assert code == 2 and _sha(small_model) == before


def test_output_directory_missing(tmp_path, small_model, capsys):
    code, _, stderr = run_cli(capsys, "optimize", small_model, tmp_path / "nope" / "out.onnx")
    assert code == 1 and "does not exist; create it first" in stderr


def test_missing_external_data(tmp_path, capsys):
    rng = np.random.default_rng(0)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                       [vi("x", [2, 64])], [vi("y", [2, 64])],
                       [init("w", rng.standard_normal((64, 64)).astype(np.float32))])
    path = tmp_path / "ext.onnx"
    onnx.save(model, path, save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    (tmp_path / "ext.onnx.data").unlink()
    code, _, stderr = run_cli(capsys, "optimize", path, tmp_path / "out.onnx")
    assert code == 1 and "external data file 'ext.onnx.data'" in stderr and "is missing" in stderr
    assert not (tmp_path / "out.onnx").exists()


def test_external_data_model_round_trip(tmp_path, capsys):
    rng = np.random.default_rng(0)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                       [vi("x", [2, 64])], [vi("y", [2, 64])],
                       [init("w", rng.standard_normal((64, 64)).astype(np.float32))])
    x = rng.standard_normal((2, 64)).astype(np.float32)
    expected = run(model, {"x": x})[0]
    path = tmp_path / "ext.onnx"
    onnx.save(model, path, save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    out = tmp_path / "out.onnx"
    assert run_cli(capsys, "optimize", path, out, "--rank", "100000", "--force")[0] == 0
    assert rel_err(run(onnx.load(out), {"x": x})[0], expected) < 1e-5


def test_digits_demo_prints_accuracy(capsys, tmp_path):
    code, stdout, stderr = run_cli(capsys, "demo", "--energy", "0.95", "--output", tmp_path / "d.onnx")
    assert code == 0, stderr
    assert "held-out accuracy on 540 digits images" in stdout
    acc = float(stdout.split("original ")[1].split()[0])
    assert acc > 0.95
    assert (tmp_path / "d.onnx").exists()


def test_python_m_entry_point_and_help():
    proc = subprocess.run([sys.executable, "-m", "onnx_lowrank", "optimize", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--multiple-of" in proc.stdout and "--report" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "onnx_lowrank"], capture_output=True, text=True)
    assert proc.returncode == 2 and "optimize" in proc.stderr


def test_zero_jobs_means_one_per_core_and_gives_the_same_bytes(tmp_path, small_model, capsys):
    outs = [tmp_path / "j0.onnx", tmp_path / "j1.onnx"]
    for jobs, out in zip(("0", "1"), outs):
        code, _, stderr = run_cli(capsys, "optimize", small_model, out, "--ratio", "0.5", "--jobs", jobs, "--quiet")
        assert code == 0, stderr
    assert _sha(outs[0]) == _sha(outs[1])


def test_check_max_error_gates_the_check(tmp_path, small_model, capsys):
    out = tmp_path / "out.onnx"
    check = ["--check", "--shape", "batch=2", "--samples", "3"]
    code, stdout, stderr = run_cli(capsys, "optimize", small_model, out, "--rank", "4", *check, "--check-max-error", "1e-9")
    assert code == 1 and out.exists()  # written, then the gate fails
    # a random 64x48 matrix at rank 4 is also predicted ruined (0.87): one warning, one failure line
    lines = stderr.strip().splitlines()
    assert len(lines) == 2 and "probably ruined" in lines[0] and "check failed" in lines[1], stderr
    assert "check failed: worst output error" in stderr and "exceeds --check-max-error 1e-09" in stderr
    assert "> --check-max-error 1e-09" in stdout

    code, stdout, stderr = run_cli(capsys, "optimize", small_model, out, "--rank", "4", *check, "--check-max-error", "10")
    assert code == 0, stderr
    assert "<= --check-max-error 10" in stdout

    # the worst error of the JSON check is what the gate compares
    code, stdout, _ = run_cli(capsys, "optimize", small_model, out, "--rank", "4", *check, "--check-max-error", "10",
                              "--json")
    check_json = json.loads(stdout)["check"]
    assert code == 0 and check_json["max_error"] == 10.0 and 0 < check_json["max_rel_l2"] < 10


def test_optimize_defaults_are_the_config_defaults():
    from dataclasses import fields

    from onnx_lowrank import LowRankConfig
    from onnx_lowrank.cli import build_parser, config_from_args
    from onnx_lowrank.cli.common import CONFIG_DEFAULTS, config_kwargs

    parser = build_parser()
    for command in (["optimize", "in.onnx", "out.onnx"], ["demo"]):
        args = parser.parse_args(command)
        mapped = config_kwargs(args)
        defaults = LowRankConfig()
        for name, value in mapped.items():
            assert value == getattr(defaults, name), (command[0], name, value)
        assert config_from_args(args) == defaults
    # every field has an optimize option (named like it), so none is silently unreachable
    optimize_args = parser.parse_args(["optimize", "in.onnx", "out.onnx"])
    assert set(config_kwargs(optimize_args)) == {f.name for f in fields(LowRankConfig)} == set(CONFIG_DEFAULTS)


def test_optimize_help_states_the_config_defaults(capsys):
    from onnx_lowrank.cli.common import CONFIG_DEFAULTS

    code, stdout, _ = run_cli(capsys, "optimize", "--help")
    assert code == 0
    text = " ".join(stdout.split())
    for name in ("power_iters", "oversample", "seed", "conv_scheme"):
        assert f"(default {CONFIG_DEFAULTS[name]})" in text, name
    assert f"(default {','.join(CONFIG_DEFAULTS['op_types'])})" in text
    assert f"{CONFIG_DEFAULTS['method']}: randomized subspace iteration (default)" in text


# --- the predicted output error: reported, warned about, and gating the default run --------------


def _digits_pixels(tmp_path: Path) -> Path:
    with np.load(DATA / "digits_heldout.npz") as d:
        path = tmp_path / "pixels.npz"
        np.savez(path, pixels=d["pixels"][:200])
    return path


def test_ruined_prediction_warns_once_on_stderr(tmp_path, capsys):
    from onnx_lowrank.core.prediction import RUINED_THRESHOLD

    out = tmp_path / "o.onnx"
    # digits at --ratio 0.1: predicted 1.26; real top-1 agreement 0.20 (docs/prediction.md)
    code, stdout, stderr = run_cli(capsys, "optimize", DIGITS, out, "--ratio", "0.1")
    assert code == 0 and out.exists()  # an explicit policy only warns
    warnings = [ln for ln in stderr.splitlines() if "probably ruined" in ln]
    assert len(warnings) == 1 and len(stderr.strip().splitlines()) == 1, stderr
    assert f"> {RUINED_THRESHOLD:g}" in warnings[0] and "--calibration DATA.npz" in warnings[0]
    assert "--ratio 0.8" in warnings[0] and "--exclude" in warnings[0] and "exit code 1" not in warnings[0]
    assert "probably ruined" not in stdout
    assert "predicted output error 1.26 (data-free, from the layers' weight errors; not measured)" in stdout
    # --quiet silences the table, not the warning
    code, stdout, stderr = run_cli(capsys, "optimize", DIGITS, out, "--ratio", "0.1", "--quiet")
    assert code == 0 and stdout == "" and stderr.count("probably ruined") == 1


def test_gentle_run_does_not_warn(tmp_path, capsys):
    code, stdout, stderr = run_cli(capsys, "optimize", DIGITS, tmp_path / "o.onnx", "--energy", "0.95")
    assert code == 0 and "probably ruined" not in stderr, stderr
    assert "predicted output error 0.37" in stdout


def test_json_carries_the_prediction(tmp_path, capsys):
    code, stdout, _ = run_cli(capsys, "optimize", DIGITS, tmp_path / "o.onnx", "--ratio", "0.1", "--json")
    data = json.loads(stdout)
    assert code == 0 and data["totals"]["predicted_output_error"] == pytest.approx(1.263, abs=1e-3)


def test_explicit_ratio_keeps_its_bytes_and_exit_code(tmp_path, capsys):
    # --ratio 0.5 given explicitly is what was asked for: it warns, exits 0, and writes the same
    # bytes as the default run (which exits 1 because it is predicted ruined)
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    code_explicit, _, err_explicit = run_cli(capsys, "optimize", DIGITS, a, "--ratio", "0.5")
    code_default, _, err_default = run_cli(capsys, "optimize", DIGITS, b)
    assert code_explicit == 0 and "probably ruined" in err_explicit
    assert code_default == 1 and err_default.count("probably ruined") == 1
    assert "exit code 1 because this is the default policy (--ratio 0.5)" in err_default
    assert _sha(a) == _sha(b)


def test_check_fails_on_a_checked_ruined_model(tmp_path, capsys):
    from onnx_lowrank.core.prediction import RUINED_THRESHOLD

    out, pixels = tmp_path / "o.onnx", _digits_pixels(tmp_path)
    code, stdout, stderr = run_cli(capsys, "optimize", DIGITS, out, "--rank", "1", "--check", "--inputs", pixels)
    check = [ln for ln in stderr.splitlines() if "check failed" in ln]
    assert code == 1 and out.exists() and len(check) == 1, stderr
    assert f"exceeds {RUINED_THRESHOLD:g}, above which a model is probably ruined" in check[0]
    # --check-max-error rules when given
    code, _, stderr = run_cli(capsys, "optimize", DIGITS, out, "--rank", "1", "--check", "--inputs", pixels,
                              "--check-max-error", "100")
    assert code == 0 and "check failed" not in stderr
    # a gentle model passes the default gate
    code, _, stderr = run_cli(capsys, "optimize", DIGITS, out, "--energy", "0.95", "--check", "--inputs", pixels)
    assert code == 0, stderr


@pytest.mark.parametrize("argv", [
    ["optimize", "{missing}", "{out}"],
    ["analyze", "{missing}"],
    ["bench", "{missing}"],
    ["bench", "{model}", "{missing}"],
    ["optimize", "{model}", "{out}", "--calibration", "{missing_npz}"],
    ["bench", "{model}", "--inputs", "{missing_npz}"],
], ids=["optimize", "analyze", "bench", "bench-compressed", "optimize-calibration", "bench-inputs"])
def test_every_subcommand_missing_file_is_exit_1_with_one_prefix(tmp_path, capsys, argv):
    """One contract: an input failure (a file that is not there) is exit 1, one line, one prefix."""
    model = save_small_matmul(tmp_path / "m.onnx")
    names = {"missing": tmp_path / "nope.onnx", "out": tmp_path / "o.onnx", "model": model,
             "missing_npz": tmp_path / "nope.npz"}
    filled = [str(names[a[1:-1]]) if a.startswith("{") else a for a in argv]
    code, out, err = run_cli(capsys, *filled)
    lines = err.strip().splitlines()
    assert code == 1, err
    assert len(lines) == 1 and lines[0].startswith(f"onnx-lowrank {argv[0]}: error: "), err
    assert "not found" in lines[0] or "no such file" in lines[0]
    assert "Traceback" not in err and not (tmp_path / "o.onnx").exists()


def test_check_with_a_bad_shape_fails_before_writing(tmp_path, capsys):
    model = save_small_matmul(tmp_path / "m.onnx")
    out = tmp_path / "o.onnx"
    code, _, err = run_cli(capsys, "optimize", model, out, "--check", "--shape", "nosuch=1")
    assert code == 2 and "--shape nosuch: the model has no input or symbolic dimension" in err
    assert not out.exists()
    code, _, err = run_cli(capsys, "optimize", model, out, "--check", "--inputs", tmp_path / "nope.npz")
    assert code == 1 and "--inputs file not found" in err and not out.exists()
