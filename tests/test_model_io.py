"""Loading and atomic saving, external data both ways."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from builders import init, make_model, run, vi
from onnx_lowrank.model_io import ModelError, load_model, model_file_size, save_model


def _model():
    w = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    return make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                      [vi("x", [2, 64])], [vi("y", [2, 32])], [init("w", w)])


def test_save_with_external_data_and_reload(tmp_path):
    model = _model()
    x = np.ones((2, 64), np.float32)
    expected = run(model, {"x": x})[0]
    written = save_model(model, tmp_path / "m.onnx", external_data=True)
    assert [p.name for p in written] == ["m.onnx", "m.onnx.data"]
    assert (tmp_path / "m.onnx.data").stat().st_size == 64 * 32 * 4
    assert model_file_size(tmp_path / "m.onnx") == sum(p.stat().st_size for p in written)
    np.testing.assert_array_equal(run(load_model(tmp_path / "m.onnx"), {"x": x})[0], expected)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".onnx-lowrank-")]  # no temp left


def test_refuses_to_overwrite_input(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_model(), path)
    with pytest.raises(ModelError, match="is the input model"):
        save_model(_model(), path, input_path=path)


def test_truncated_external_data(tmp_path):
    path = tmp_path / "m.onnx"
    save_model(_model(), path, external_data=True)
    data = tmp_path / "m.onnx.data"
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(ModelError, match="shorter than tensor 'w' needs"):
        load_model(path)


def test_failed_write_leaves_previous_output(tmp_path, monkeypatch):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"previous")

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("onnx_lowrank.model_io.os.replace", boom)
    with pytest.raises(ModelError, match="No space left on device"):
        save_model(_model(), path)
    assert path.read_bytes() == b"previous"
