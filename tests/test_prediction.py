"""The data-free predictor of the output error (onnx_lowrank.core.prediction) and the report's use of it."""

from __future__ import annotations

import math

import pytest

from onnx_lowrank.core.prediction import COMBINATIONS, RUINED_THRESHOLD, is_large, predicted_output_error
from onnx_lowrank.report import LayerResult, Report


def test_combinations_on_constructed_errors():
    errors = [0.3, 0.4, None, 0.0]
    assert predicted_output_error(errors) == pytest.approx(0.5)  # rss is the default: sqrt(0.09 + 0.16)
    assert predicted_output_error(errors, combine="rss") == pytest.approx(0.5)
    assert predicted_output_error(errors, combine="sum") == pytest.approx(0.7)
    assert predicted_output_error(errors, combine="max") == pytest.approx(0.4)
    # rss of n equal errors grows like sqrt(n): 36 layers at 0.1 -> 0.6
    assert predicted_output_error([0.1] * 36) == pytest.approx(0.6)
    for combine in COMBINATIONS:
        assert predicted_output_error([], combine=combine) == 0.0
        assert predicted_output_error([None], combine=combine) == 0.0


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="combine must be one of"):
        predicted_output_error([0.1], combine="mean")
    with pytest.raises(ValueError, match="finite and >= 0"):
        predicted_output_error([-0.1])
    with pytest.raises(ValueError, match="finite and >= 0"):
        predicted_output_error([math.nan])


def test_is_large_uses_the_threshold():
    assert not is_large(None)
    assert not is_large(RUINED_THRESHOLD)
    assert is_large(RUINED_THRESHOLD + 1e-9)
    assert is_large(0.2, 0.1) and not is_large(0.05, 0.1)


def _row(name: str, rel: float | None, whitened: float | None = None, status: str = "factorized") -> LayerResult:
    return LayerResult(node=name, op="MatMul", status=status, shape=(4, 4), rank=1, params_before=16,
                       params_after=8, rel_error=rel, whitened_error=whitened)


def test_report_carries_the_prediction():
    rows = [_row("a", 0.3), _row("b", 0.4), _row("c", None, status="skipped")]
    report = Report(layers=rows, model_params_before=48, model_params_after=32)
    assert report.predicted_output_error == pytest.approx(0.5)
    assert report.to_dict()["totals"]["predicted_output_error"] == pytest.approx(0.5)
    assert "predicted output error 0.50 (data-free, from the layers' weight errors; not measured)" \
        in report.format_table()


def test_report_prefers_the_whitened_error():
    # with calibration the layer's output error on the data is what was minimized: it is used
    report = Report(layers=[_row("a", 0.9, whitened=0.3), _row("b", 0.9, whitened=0.4)])
    assert report.predicted_output_error == pytest.approx(0.5)
    assert "predicted output error 0.50 (from the layers' output errors on the calibration data" \
        in report.format_table()
