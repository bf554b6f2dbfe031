"""Issue 7's check on a real pretrained model: calibrated vs data-free at the same global budget.

EfficientNet-Lite0 (the ``models`` extra; skipped without it), calibrated on real photos: the crops
of the bundled photos are split at random, 60% calibrate and 40% are held out (the same-pool
protocol of docs/calibrated.md). Both runs keep at most 70% of the candidate layers' parameters,
and the calibrated model's held-out logits error must be at most 0.6x the data-free one's
(measured: 0.422 vs 0.960, ratio 0.44).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import registry  # noqa: E402
from onnx_lowrank import LowRankConfig, optimize  # noqa: E402
from onnx_lowrank.measure.sessions import create_session, run_samples  # noqa: E402


@pytest.fixture(scope="module")
def effnet():
    for module in registry.get("efficientnet_lite0").requires:
        pytest.importorskip(module, reason=f"{module} not installed: pip install -e '.[models]'")
    from models import efficientnet

    calib, held = efficientnet.pooled_split(0.6)
    calib = {efficientnet.INPUT_NAME: calib[efficientnet.INPUT_NAME]}
    held = {efficientnet.INPUT_NAME: held[efficientnet.INPUT_NAME][:, None]}  # one image per sample
    return efficientnet.build(), calib, held


def _kept(report) -> float:
    t = report.totals()
    return (t["candidate_params"] - t["factorized_params_before"] + t["factorized_params_after"]) / t["candidate_params"]


def test_calibration_at_least_halves_the_held_out_error(effnet):
    path, calib, held = effnet

    def logits(model) -> np.ndarray:
        (out,) = run_samples(create_session(model), held).values()
        return np.concatenate(out)

    reference = logits(str(path))

    def held_out_error(model) -> float:
        return float(np.linalg.norm(logits(model) - reference) / np.linalg.norm(reference))

    free, free_report = optimize(path, LowRankConfig(target_params=0.7))
    calibrated, cal_report = optimize(path, LowRankConfig(target_params=0.7), calibration=calib)
    assert cal_report.details["allocation"]["method"] == "weighted"
    assert _kept(free_report) <= 0.7 and _kept(cal_report) <= 0.7
    e_free, e_cal = held_out_error(free), held_out_error(calibrated)
    assert e_free > 0.5  # data-free truncation wrecks the classifier (measured 0.96)
    assert e_cal <= 0.6 * e_free
