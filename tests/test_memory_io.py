"""Bounded-memory load and save paths: single-file models read lazily, single files written one
tensor at a time, in-memory models spilled to a temporary file. Each must give exactly what the
plain in-memory path gives (message equality, bytes where they are defined, onnxruntime outputs)."""

from __future__ import annotations

import io
import logging
import tempfile

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from builders import init, make_model, run, run_cli, vi
from onnx_lowrank import LowRankConfig, optimize
from onnx_lowrank import model_io
from onnx_lowrank.model_io import ModelError, SpilledWeights, load_model, load_weights, model_file_size, save_model


def _rich_model(seed: int = 0, explicit_location: bool = False) -> onnx.ModelProto:
    """MatMuls (one weight shared, one behind a Transpose), a Gemm, a Constant node, a small
    inline bias, a typed-field (float_data) tensor, an int64 shape, metadata and value_info."""
    rng = np.random.default_rng(seed)
    scale = helper.make_tensor("scale", TensorProto.FLOAT, [96], rng.standard_normal(96).astype(np.float32).tolist())
    const = helper.make_node("Constant", [], ["c"], name="const",
                             value=helper.make_tensor("cv", TensorProto.FLOAT, [96],
                                                      rng.standard_normal(96).astype(np.float32).tolist()))
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h1"], name="mm1"),
        helper.make_node("Add", ["h1", "b1"], ["h2"], name="add"),
        helper.make_node("Transpose", ["w2t"], ["w2"], name="tr", perm=[1, 0]),
        helper.make_node("MatMul", ["h2", "w2"], ["h3"], name="mm2"),
        helper.make_node("MatMul", ["h3", "shared"], ["h4"], name="mm3"),
        helper.make_node("MatMul", ["h4", "shared"], ["h5"], name="mm4"),
        helper.make_node("Gemm", ["h5", "wg", "bg"], ["h6"], name="gemm"),
        const,
        helper.make_node("Mul", ["h6", "scale"], ["h7"], name="mul"),
        helper.make_node("Add", ["h7", "c"], ["h8"], name="addc"),
        helper.make_node("Reshape", ["h8", "shape"], ["y"], name="reshape"),
    ]
    inits = [
        init("w1", rng.standard_normal((64, 128)).astype(np.float32)),
        init("b1", rng.standard_normal(128).astype(np.float32)),  # 512 bytes: stays inline
        init("w2t", rng.standard_normal((80, 128)).astype(np.float32)),
        init("shared", rng.standard_normal((80, 80)).astype(np.float32)),
        init("wg", rng.standard_normal((80, 96)).astype(np.float32)),
        init("bg", rng.standard_normal(96).astype(np.float32)),
        scale,
        init("shape", np.array([2, 96], np.int64)),
    ]
    model = make_model(nodes, [vi("x", [2, 64])], [vi("y", [2, 96])], inits)
    model.doc_string = "a model for the memory tests"
    model.graph.doc_string = "its graph"
    helper.set_model_props(model, {"origin": "tests", "seed": str(seed)})
    model.graph.value_info.append(vi("h1", [2, 128]))
    if explicit_location:  # as onnx.load leaves tensors read from external data
        for t in model.graph.initializer:
            t.data_location = TensorProto.DEFAULT
    return model


X = np.random.default_rng(7).standard_normal((2, 64)).astype(np.float32)


def _save_plain(model: onnx.ModelProto, path):
    path.write_bytes(model.SerializeToString())
    return path


# -- streaming single-file writer -------------------------------------------------------------


@pytest.mark.parametrize("explicit_location", [False, True])
def test_streamed_single_file_is_serialize_to_string(tmp_path, explicit_location):
    model = _rich_model(explicit_location=explicit_location)
    written = save_model(model, tmp_path / "m.onnx")
    assert written == [tmp_path / "m.onnx"]
    assert (tmp_path / "m.onnx").read_bytes() == model.SerializeToString()
    assert onnx.load(tmp_path / "m.onnx") == model
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".onnx-lowrank-")]


def test_streamed_write_of_model_without_initializers_and_with_unknown_fields():
    empty = make_model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", [2])], [vi("y", [2])])
    buf = io.BytesIO()
    model_io._write_single_file(empty, buf)
    assert buf.getvalue() == empty.SerializeToString()
    # a field of a newer onnx (unknown here) survives: the plain serialization is used then
    unknown = onnx.ModelProto.FromString(_rich_model().SerializeToString() + bytes([0xF8, 0x07, 0x05]))
    buf = io.BytesIO()
    model_io._write_single_file(unknown, buf)
    assert buf.getvalue() == unknown.SerializeToString()


# -- lazy loading of single-file models ----------------------------------------------------


@pytest.mark.parametrize("explicit_location", [False, True])
def test_lazy_single_file_load_refers_to_the_file_and_reads_back_exactly(tmp_path, explicit_location):
    model = _rich_model(explicit_location=explicit_location)
    path = _save_plain(model, tmp_path / "m.onnx")
    lazy = load_model(path, lazy=True)
    external = {t.name for t in lazy.graph.initializer if t.data_location == TensorProto.EXTERNAL}
    assert external == {"w1", "w2t", "shared", "wg"}  # >= 1 KiB of raw_data; the rest inline
    for t in lazy.graph.initializer:
        if t.name in external:
            info = {e.key: e.value for e in t.external_data}
            assert info["location"] == "m.onnx" and not t.raw_data
            start, length = int(info["offset"]), int(info["length"])
            source = next(s for s in model.graph.initializer if s.name == t.name)
            assert path.read_bytes()[start:start + length] == source.raw_data
    assert lazy.ByteSize() < model.ByteSize() / 4
    load_weights(lazy, path)
    assert lazy == model == load_model(path)


def test_lazy_load_of_a_symlinked_model(tmp_path):
    real = _save_plain(_rich_model(), tmp_path / "real.onnx")
    (tmp_path / "links").mkdir()
    link = tmp_path / "links" / "model.onnx"
    link.symlink_to(real)
    lazy = load_model(link, lazy=True)
    # refers to the real file by its own name: onnx refuses to read data through symbolic links
    assert {e.value for t in lazy.graph.initializer for e in t.external_data if e.key == "location"} == {"real.onnx"}
    load_weights(lazy, link)
    assert lazy == onnx.load(real)


def test_lazy_load_of_truncated_or_foreign_files_fails_clearly(tmp_path):
    data = _rich_model().SerializeToString()
    truncated = tmp_path / "t.onnx"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="not a valid ONNX model"):
        load_model(truncated, lazy=True)
    text = tmp_path / "x.onnx"
    text.write_text("this is not an onnx model\n")
    with pytest.raises(ModelError, match="not a valid ONNX model"):
        load_model(text, lazy=True)


def test_sizes_are_read_from_headers(tmp_path):
    path = _save_plain(_rich_model(), tmp_path / "m.onnx")
    assert model_file_size(path) == path.stat().st_size
    assert model_io.external_data_bytes(path) == 0
    save_model(_rich_model(), tmp_path / "e.onnx", external_data=True)
    assert model_io.external_data_bytes(tmp_path / "e.onnx") == (tmp_path / "e.onnx.data").stat().st_size
    assert model_file_size(tmp_path / "e.onnx") == sum(p.stat().st_size for p in tmp_path.glob("e.onnx*"))


def test_saving_a_lazy_single_file_model_copies_it_byte_for_byte(tmp_path):
    path = _save_plain(_rich_model(), tmp_path / "m.onnx")
    out = tmp_path / "out" / "m.onnx"
    out.parent.mkdir()
    assert save_model(load_model(path, lazy=True), out, input_path=path) == [out]
    assert out.read_bytes() == path.read_bytes()
    # forced to external data: the same tensors, now beside the output
    save_model(load_model(path, lazy=True), tmp_path / "ext.onnx", input_path=path, external_data=True)
    assert (tmp_path / "ext.onnx.data").stat().st_size > 0
    ext, plain = load_model(tmp_path / "ext.onnx"), onnx.load(path)
    assert [(t.name, t.raw_data) for t in ext.graph.initializer] == [(t.name, t.raw_data) for t in plain.graph.initializer]
    np.testing.assert_array_equal(run(ext, {"x": X})[0], run(plain, {"x": X})[0])


def test_external_data_input_written_as_one_file_on_request(tmp_path):
    model = _rich_model()
    save_model(model, tmp_path / "e.onnx", external_data=True)
    lazy = load_model(tmp_path / "e.onnx", lazy=True)
    save_model(lazy, tmp_path / "one.onnx", input_path=tmp_path / "e.onnx", external_data=False)
    assert not (tmp_path / "one.onnx.data").exists()
    # the same content as onnx.load of the external-data model (data inline, location DEFAULT)
    assert onnx.load(tmp_path / "one.onnx") == onnx.load(tmp_path / "e.onnx")


# -- optimize: CLI and API paths against the plain in-memory path ----------------------------


def _reference(model: onnx.ModelProto, config: LowRankConfig, **kwargs) -> onnx.ModelProto:
    reference, _ = optimize(model, config, lazy=False, **kwargs)  # the plain in-memory path
    return reference


@pytest.mark.parametrize("explicit_location", [False, True])
def test_cli_on_single_file_model_equals_in_memory_path(tmp_path, capsys, explicit_location):
    model = _rich_model(seed=1, explicit_location=explicit_location)
    path = _save_plain(model, tmp_path / "in.onnx")
    before = path.read_bytes()
    outs = []
    for name in ("a.onnx", "b.onnx"):
        code, _, err = run_cli(capsys, "optimize", path, tmp_path / name, "--rank", "8", "--force", "--quiet")
        assert code == 0, err
        outs.append((tmp_path / name).read_bytes())
    assert outs[0] == outs[1]  # deterministic
    assert path.read_bytes() == before  # input untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx", "b.onnx", "in.onnx"]  # one file each
    reference = _reference(model, LowRankConfig(rank=8, force=True))
    assert onnx.load(tmp_path / "a.onnx") == reference
    assert outs[0] == reference.SerializeToString()
    np.testing.assert_array_equal(run(onnx.load(tmp_path / "a.onnx"), {"x": X})[0], run(reference, {"x": X})[0])


def test_cli_with_calibration_on_single_file_model(tmp_path, capsys):
    model = _rich_model(seed=2)
    path = _save_plain(model, tmp_path / "in.onnx")
    calib = np.random.default_rng(3).standard_normal((8, 2, 64)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=calib)
    code, _, err = run_cli(capsys, "optimize", path, tmp_path / "out.onnx", "--target-params", "0.5",
                           "--calibration", tmp_path / "calib.npz", "--jobs", "1", "--quiet")
    assert code == 0, err
    config = LowRankConfig(target_params=0.5, jobs=1)
    reference = _reference(model, config, calibration={"x": calib})
    assert onnx.load(tmp_path / "out.onnx") == reference


def test_api_on_model_proto_spills_and_equals_in_memory_path(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the spill file goes
    model = _rich_model(seed=4, explicit_location=True)
    original = model.SerializeToString()
    seen = []
    real_restore = SpilledWeights.restore

    def restore(self, result):
        seen.append(sorted(p.name for p in tmp_path.iterdir()))
        return real_restore(self, result)

    monkeypatch.setattr(SpilledWeights, "restore", restore)
    config = LowRankConfig(ratio=0.5, force=True)
    result, report = optimize(model, config)
    assert report.factorized and seen and seen[0][0].startswith("onnx-lowrank-spill-")  # it did spill
    assert model.SerializeToString() == original  # the argument is not modified
    assert result == _reference(model, config)
    assert not any(t.data_location == TensorProto.EXTERNAL for t in result.graph.initializer)
    assert list(tmp_path.iterdir()) == []  # the spill file is gone
    np.testing.assert_array_equal(run(result, {"x": X})[0], run(_reference(model, config), {"x": X})[0])


def test_api_spill_failure_falls_back_to_memory(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))  # cannot be created in
    model = _rich_model(seed=5)
    with caplog.at_level(logging.WARNING, logger="onnx_lowrank.api"):
        result, _ = optimize(model, LowRankConfig(rank=8))
    assert "working in memory" in caplog.text
    assert result == _reference(model, LowRankConfig(rank=8))


def test_api_spill_keeps_unloaded_external_references(tmp_path):
    model = _rich_model(seed=6)
    save_model(model, tmp_path / "e.onnx", external_data=True)
    headers = onnx.load(tmp_path / "e.onnx", load_external_data=False)
    with SpilledWeights(headers) as spill:
        assert spill.directory is None and spill.model == headers  # copied whole: nothing to spill


def test_api_on_path_reads_back_unchanged_weights(tmp_path):
    model = _rich_model(seed=8)
    path = _save_plain(model, tmp_path / "m.onnx")
    config = LowRankConfig(rank=8, force=True, include=("mm1",))  # the other weights unchanged
    result, _ = optimize(path, config)
    assert result == optimize(path, config, lazy=False)[0] == _reference(model, config)
    lazy, _ = optimize(path, config, lazy=True)  # still refers to the file until saved
    assert any(t.data_location == TensorProto.EXTERNAL for t in lazy.graph.initializer)
    save_model(lazy, tmp_path / "out.onnx", input_path=path)
    assert (tmp_path / "out.onnx").read_bytes() == result.SerializeToString()


def test_cli_on_mixed_input_inline_and_external_tensors(tmp_path, capsys):
    # w1, w2t and wg (>= 30000 bytes) in the data file; shared (25600 bytes) inside the .onnx:
    # read lazily from both, written with external data like the input
    model = _rich_model(seed=9)
    path = tmp_path / "in" / "m.onnx"
    path.parent.mkdir()
    onnx.save(model, path, save_as_external_data=True, location="m.bin", size_threshold=30000)
    lazy = load_model(path, lazy=True)
    locations = {t.name: {e.value for e in t.external_data if e.key == "location"} for t in lazy.graph.initializer}
    assert locations["shared"] == {"m.onnx"} and locations["w1"] == {"m.bin"}
    config = ["--rank", "8", "--force", "--include", "mm1", "--quiet"]  # shared and the rest unchanged
    code, _, err = run_cli(capsys, "optimize", path, tmp_path / "out.onnx", *config)
    assert code == 0, err
    assert (tmp_path / "out.onnx.data").exists()
    out = load_model(tmp_path / "out.onnx")
    reference = _reference(onnx.load(path), LowRankConfig(rank=8, force=True, include=("mm1",)))
    assert [(t.name, t.raw_data) for t in out.graph.initializer] == \
        [(t.name, t.raw_data) for t in reference.graph.initializer]
    np.testing.assert_array_equal(run(out, {"x": X})[0], run(reference, {"x": X})[0])
