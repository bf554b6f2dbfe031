"""Calibration end to end on the bundled real model: whitening, global budgets, --max-error."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from builders import DATA, rel_err, run, run_cli
from onnx_lowrank import LowRankConfig, optimize
from onnx_lowrank.config import ConfigError
from onnx_lowrank.measure.calibration import collect_grams
from onnx_lowrank.cli import main
from onnx_lowrank.measure.accuracy import compare_models, max_error
from onnx_lowrank.measure.inputs import load_inputs

MODEL = DATA / "digits_mlp.onnx"
CALIB = DATA / "digits_calibration.npz"
HELD = np.load(DATA / "digits_heldout.npz")


def _accuracy(model: onnx.ModelProto) -> float:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return float(np.mean(sess.run(None, {"pixels": HELD["pixels"]})[0].argmax(1) == HELD["labels"]))


def _output_error(model: onnx.ModelProto) -> float:
    ref = run(onnx.load(MODEL), {"pixels": HELD["pixels"]})[0]
    return rel_err(run(model, {"pixels": HELD["pixels"]})[0], ref)


def test_gram_matrices_equal_numpy():
    model = onnx.load(MODEL)
    from onnx_lowrank.passes import find_candidates

    cands = [c for _, c in find_candidates(model, LowRankConfig()) if c is not None]
    inputs = load_inputs(CALIB, model)
    stats = collect_grams(model, cands, inputs)
    x = np.load(CALIB)["pixels"].astype(np.float64)
    fc1 = cands[0]
    assert fc1.activation == "pixels"
    np.testing.assert_allclose(stats.grams[(fc1.activation, fc1.feature_key)], x.T @ x, rtol=1e-10)
    assert stats.samples == 256 and len(stats.grams) == 3


def test_whitened_full_rank_is_exact():
    model, report = optimize(MODEL, LowRankConfig(rank=100000, force=True), calibration=CALIB)
    assert all(r.status == "factorized" for r in report.layers)
    assert _output_error(model) < 1e-4


def test_whitening_lowers_held_out_error_at_equal_ranks():
    plain, _ = optimize(MODEL, LowRankConfig(ratio=0.3))
    white, report = optimize(MODEL, LowRankConfig(ratio=0.3), calibration=CALIB)
    assert [r.rank for r in report.layers] == [15, 38, 2]
    assert all(r.whitened_error < r.rel_error for r in report.layers)
    assert _output_error(white) < 0.85 * _output_error(plain)  # measured 0.598 vs 0.743


def test_global_budget_within_budget_and_beats_uniform():
    model, report = optimize(MODEL, LowRankConfig(target_params=0.2), calibration=CALIB)
    t = report.totals()
    kept = t["candidate_params"] - t["factorized_params_before"] + t["factorized_params_after"]
    assert kept <= 0.2 * t["candidate_params"]
    assert kept >= 0.19 * t["candidate_params"]  # the budget is used, not wasted
    uniform, _ = optimize(MODEL, LowRankConfig(ratio=0.2))
    assert _accuracy(model) >= 0.97 and _accuracy(uniform) < 0.5
    assert _output_error(model) < 0.3 * _output_error(uniform)


def test_target_flops_budget():
    _, report = optimize(MODEL, LowRankConfig(target_flops=0.3), calibration=CALIB)
    t = report.totals()
    assert t["macs_after"] <= 0.3 * t["macs_before"] + 1


def test_max_error_search_verified_by_the_harness(tmp_path):
    model, report = optimize(MODEL, LowRankConfig(max_error=0.1), calibration=CALIB)
    search = report.details["search"]
    assert search["reached"] and search["error"] <= 0.1 and len(search["steps"]) == 7
    # re-measure with the harness on the held-out part of the calibration file (the last 20%)
    inputs = load_inputs(CALIB, onnx.load(MODEL))
    held = {k: v[int(round(len(v) * 0.8)):] for k, v in inputs.items()}
    out = tmp_path / "m.onnx"
    onnx.save(model, out)
    measured = max_error(compare_models(MODEL, out, held))
    assert measured == pytest.approx(search["error"], rel=1e-5)
    # a smaller budget from the search steps exceeds the limit (it is the smallest that passes)
    failing = [s for s in search["steps"] if s["target_params"] < search["target_params"]]
    assert all(s["error"] > 0.1 for s in failing)


def test_cli_calibration_report(tmp_path, capsys):
    rep = tmp_path / "r.json"
    code = main(["optimize", str(MODEL), str(tmp_path / "o.onnx"), "--target-params", "0.3",
                 "--calibration", str(CALIB), "--report", str(rep)])
    out = capsys.readouterr().out
    assert code == 0 and "out.err" in out
    data = json.loads(rep.read_text())
    assert data["calibration"]["samples"] == 256 and data["calibration"]["whiten"] == "full"
    assert all(r["whitened_error"] is not None for r in data["layers"] if r["status"] == "factorized")


@pytest.mark.parametrize("argv,message,code", [
    (["--max-error", "0.1"], "--max-error is the target of a budget search and needs --calibration DATA.npz", 2),
    (["--max-error", "0.1", "--check"], "to fail --check above an error, use --check-max-error E", 2),
    (["--target-params", "1.5"], "--target-params must be in (0, 1]", 2),
    (["--calibration", "missing.npz"], "inputs file not found", 1),
    (["--whiten", "diag", "--whiten-eps", "2"], "--whiten-eps must be in [0, 1)", 2),
])
def test_cli_calibration_errors(tmp_path, capsys, argv, message, code):
    out = tmp_path / "o.onnx"
    assert main(["optimize", str(MODEL), str(out), *argv]) == code
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_latency_guard_keeps_slow_layers_dense():
    _, report = optimize(MODEL, LowRankConfig(ratio=0.5, latency="model"))
    rows = {r.node: r for r in report.layers}
    # at one row per inference these small layers are call-overhead bound
    assert rows["fc3/Gemm"].reason.startswith("slower in onnxruntime: predicted time ratio")
    assert rows["fc2/MatMul"].status == "factorized"


def test_measured_allocation_within_budget():
    model, report = optimize(MODEL, LowRankConfig(target_params=0.25, allocation="measured"), calibration=CALIB)
    t = report.totals()
    kept = t["candidate_params"] - t["factorized_params_before"] + t["factorized_params_after"]
    assert kept <= 0.25 * t["candidate_params"]
    assert _accuracy(model) >= 0.96
    # losses are measured on held-out samples (the last 20%), not on those the whitening saw
    assert report.details["validation"]["samples"] == 51 and report.details["calibration"]["samples"] == 205
    layers = report.details["sensitivity"]["layers"]
    assert len(layers) == 3 and all(opt["options"][-1]["rank"] is None for opt in layers)
    # measured losses fall as the rank grows (monotone by construction, and really measured)
    for layer in layers:
        losses = [o["loss"] for o in layer["options"]]
        assert losses == sorted(losses, reverse=True) and losses[0] > losses[-2] > 0


def test_too_few_calibration_rows_are_flagged(caplog):
    """Fewer rows than input features: the report and the log say the whitening is optimistic."""
    pixels = np.load(CALIB)["pixels"]
    with caplog.at_level("WARNING", logger="onnx_lowrank"):
        _, report = optimize(MODEL, LowRankConfig(ratio=0.3), calibration={"pixels": pixels[:40]})
    rows = {r.node: r for r in report.layers}
    first = report.layers[0]  # 64 input features, one row per sample: 40 < 64
    assert first.note is not None and "calibration gave 40 input rows for 64 features" in first.note
    assert "fewer calibration rows than input features" in caplog.text
    _, enough = optimize(MODEL, LowRankConfig(ratio=0.3), calibration=CALIB)  # 256 rows
    assert not any("input rows for" in (r.note or "") for r in enough.layers)
    assert len(rows) == len(enough.layers)


def test_weighted_allocation_is_the_default_with_calibration():
    model, report = optimize(MODEL, LowRankConfig(target_params=0.25), calibration=CALIB)
    alloc = report.details["allocation"]
    assert alloc["method"] == "weighted"
    # two probes per layer (rank 1 and half the break-even rank) on the held-out 20%
    assert alloc["trials"] == 6 and set(alloc["weights"]) == {"fc1/Gemm", "fc2/MatMul", "fc3/Gemm"}
    assert all(w > 0 for w in alloc["weights"].values())
    assert "global allocation: weighted (energy weighted by measured output sensitivity, 6 onnxruntime probes" \
        in report.format_table()
    t = report.totals()
    kept = t["candidate_params"] - t["factorized_params_before"] + t["factorized_params_after"]
    assert kept <= 0.25 * t["candidate_params"]
    # the final whitening uses every calibration sample, not only the probes' 80%
    assert report.details["calibration"]["samples"] == 256
    assert _accuracy(model) >= 0.97
    _, energy = optimize(MODEL, LowRankConfig(target_params=0.25, allocation="energy"), calibration=CALIB)
    assert energy.details["allocation"] == {"method": "energy"}
    _, free = optimize(MODEL, LowRankConfig(target_params=0.25))
    assert free.details["allocation"] == {"method": "energy"}
    _, uniform = optimize(MODEL, LowRankConfig(ratio=0.5), calibration=CALIB)
    assert "allocation" not in uniform.details


def test_weighted_allocation_needs_calibration_and_a_budget(tmp_path, capsys):
    with pytest.raises(ConfigError, match="--allocation weighted spends a global budget"):
        LowRankConfig(ratio=0.5, allocation="weighted")
    with pytest.raises(ConfigError, match="--allocation weighted needs --calibration"):
        optimize(MODEL, LowRankConfig(target_params=0.5, allocation="weighted"))
    code, _, err = run_cli(capsys, "optimize", MODEL, tmp_path / "o.onnx", "--target-params", "0.5",
                           "--allocation", "weighted")
    assert code == 2 and "--allocation weighted needs --calibration" in err and "Traceback" not in err
    assert not (tmp_path / "o.onnx").exists()


def test_auto_allocation_falls_back_to_energy_with_one_sample(caplog):
    pixels = np.load(CALIB)["pixels"]
    with caplog.at_level("WARNING", logger="onnx_lowrank"):
        _, report = optimize(MODEL, LowRankConfig(target_params=0.5), calibration={"pixels": pixels[:2]})
    assert report.details["allocation"] == {"method": "energy"}
    assert "too few calibration samples to hold some out" in caplog.text


def test_trials_from_spilled_weights_measure_what_whole_copies_do(monkeypatch, tmp_path):
    # The trials (probes, max-error search) load a weightless skeleton next to a spilled weights
    # file; losses, search steps and the searched model must be those of trials built from whole
    # copies of the model (the fallback for models that cannot be spilled), and the spill must be
    # gone afterwards.
    import tempfile

    from onnx_lowrank import model_io
    from onnx_lowrank.search import trials

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the spill goes
    made = []

    class Recorded(model_io.SpilledWeights):
        def __init__(self, model, directory=None):
            super().__init__(model, directory)
            made.append(self.directory)

    def run():
        _, measured = optimize(MODEL, LowRankConfig(target_params=0.25, allocation="measured"), calibration=CALIB)
        searched, search = optimize(MODEL, LowRankConfig(max_error=0.3, allocation="energy"), calibration=CALIB)
        losses = [[o["loss"] for o in layer["options"]] for layer in measured.details["sensitivity"]["layers"]]
        return losses, search.details["search"]["steps"], searched.SerializeToString()

    monkeypatch.setattr(trials, "SpilledWeights", Recorded)
    spilled = run()
    assert len(made) == 2 and all(d is not None and d.startswith(str(tmp_path)) for d in made)
    assert not list(tmp_path.iterdir())

    class WholeCopy(model_io.SpilledWeights):
        def __init__(self, model, directory=None):
            self._tmp, self.directory = None, None
            self.model = model

    monkeypatch.setattr(trials, "SpilledWeights", WholeCopy)
    assert run() == spilled
    losses, steps, searched = spilled
    assert len(losses) == 3 and all(len(options) >= 5 and options[0] > 0 for options in losses)
    assert len(steps) == 7 and any(s["error"] <= 0.3 for s in steps) and any(s["error"] > 0.3 for s in steps)
    # the searched model is self-contained: no weight refers to the removed spill
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in onnx.load_from_string(searched).graph.initializer)
