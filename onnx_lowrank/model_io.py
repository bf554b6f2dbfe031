"""Load, validate and save ONNX models with clear errors, external data and atomic writes."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

__all__ = [
    "ModelError",
    "load_model",
    "save_model",
    "check_output_path",
    "model_file_size",
    "EXTERNAL_DATA_THRESHOLD",
]

logger = logging.getLogger(__name__)

#: Protobuf refuses messages over 2 GiB; stay clear of it with headroom for the graph itself.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000

#: Tensors smaller than this stay inside the .onnx file when external data is written, as
#: onnx's own default does (small tensors are cheaper inline than as a file offset).
_EXTERNAL_SIZE_THRESHOLD = 1024


class ModelError(Exception):
    """A model or path problem that the user can fix; the message is one line that says how."""


def load_model(path: str | os.PathLike[str], *, load_external_data: bool = True) -> onnx.ModelProto:
    """Read an ONNX model, with its external data, and fail with one clear line if it is unusable.

    Parameters
    ----------
    path : path-like
        The ``.onnx`` file.
    load_external_data : bool
        Read tensors stored in external data files into memory (default). Their presence and
        size are checked either way.

    Returns
    -------
    onnx.ModelProto

    Raises
    ------
    ModelError
        Missing, empty, truncated or non-ONNX file; missing or short external data file.
    """
    p = Path(path)
    if not p.exists():
        raise ModelError(f"{p}: no such file")
    if p.is_dir():
        raise ModelError(f"{p}: is a directory, expected an .onnx file")
    if p.stat().st_size == 0:
        raise ModelError(f"{p}: the file is empty, expected an ONNX model")
    try:
        model = onnx.load_model(str(p), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, UnicodeDecodeError) as exc:
        raise ModelError(
            f"{p}: not a valid ONNX model (protobuf parse failed: {exc}); is the file truncated "
            "or of another format?"
        ) from None
    except OSError as exc:
        raise ModelError(f"{p}: cannot read: {exc.strerror or exc}") from None
    if not model.HasField("graph") or not model.opset_import:
        raise ModelError(
            f"{p}: not a valid ONNX model (no graph or no opset import); is the file truncated "
            "or of another format?"
        )
    _check_external_data(model, p.parent, p)
    if load_external_data:
        try:
            onnx.external_data_helper.load_external_data_for_model(model, str(p.parent))
        except (OSError, ValueError) as exc:
            raise ModelError(f"{p}: cannot read its external data: {exc}") from None
    return model


def _external_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    return [
        t
        for t in onnx.external_data_helper._get_all_tensors(model)
        if t.HasField("data_location") and t.data_location == onnx.TensorProto.EXTERNAL
    ]


def _check_external_data(model: onnx.ModelProto, base_dir: Path, model_path: Path) -> None:
    for tensor in _external_tensors(model):
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location")
        if not location:
            raise ModelError(f"{model_path}: tensor {tensor.name!r} is external but names no file")
        data_path = base_dir / location
        if not data_path.is_file():
            raise ModelError(
                f"{model_path}: external data file {location!r} of tensor {tensor.name!r} is "
                f"missing; keep it next to the model (expected {data_path})"
            )
        offset = int(info.get("offset", 0))
        length = info.get("length")
        if length is not None and offset + int(length) > data_path.stat().st_size:
            raise ModelError(
                f"{model_path}: external data file {location!r} is shorter than tensor "
                f"{tensor.name!r} needs (truncated copy?)"
            )


def check_output_path(output: str | os.PathLike[str], input_path: str | os.PathLike[str] | None) -> Path:
    """Refuse an output that would overwrite the input or cannot be written.

    Returns
    -------
    pathlib.Path
        The output path.

    Raises
    ------
    ModelError
        Output equal to the input (or its external data), a directory, or in a missing or
        read-only directory.
    """
    out = Path(output)
    if input_path is not None:
        inp = Path(input_path)
        same = out.resolve() == inp.resolve() or (out.exists() and inp.exists() and os.path.samefile(out, inp))
        if same:
            raise ModelError(
                f"output {out} is the input model; write to another path (the input is never overwritten)"
            )
    if out.is_dir():
        raise ModelError(f"output {out} is a directory; give a file path such as {out / 'model.onnx'}")
    parent = out.parent if str(out.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise ModelError(f"output directory {parent} is a file, not a directory; choose another output path")
    if not parent.is_dir():
        raise ModelError(f"output directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ModelError(f"output directory {parent} is not writable; choose another output path")
    return out


def _tensor_bytes(model: onnx.ModelProto) -> int:
    total = 0
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        total += len(tensor.raw_data)
        # Typed repeated fields (float_data, ...) are rarer in large models; 8 bytes is an upper bound.
        total += 8 * (len(tensor.float_data) + len(tensor.int64_data) + len(tensor.double_data))
        total += 4 * (len(tensor.int32_data))
    return total


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike[str],
    *,
    input_path: str | os.PathLike[str] | None = None,
    external_data: bool | None = None,
) -> list[Path]:
    """Write a model atomically (temporary file in the same directory, then rename).

    Parameters
    ----------
    model : onnx.ModelProto
        The model. When written with external data its large tensors are moved out of the
        message (onnx's own behaviour), so do not save the same object twice.
    path : path-like
        Output ``.onnx`` path.
    input_path : path-like, optional
        The model it was made from; writing over it is refused.
    external_data : bool, optional
        Write tensors to ``<name>.data`` beside the output. ``None`` (default) does so only when
        the tensors exceed :data:`EXTERNAL_DATA_THRESHOLD`, the safe side of protobuf's 2 GiB.

    Returns
    -------
    list of pathlib.Path
        The files written (the model, and its external data file if any).
    """
    out = check_output_path(path, input_path)
    on_disk = _external_tensors(model)  # weights of a lazily loaded model, still in the input's file
    if on_disk and input_path is None:
        raise ModelError("the model refers to external data files that were not loaded; pass input_path "
                         "(the model it was read from) so they can be copied")
    if external_data is None:
        external_data = bool(on_disk) or _tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD
    parent = out.parent if str(out.parent) else Path(".")
    written: list[Path] = []
    with tempfile.TemporaryDirectory(prefix=".onnx-lowrank-", dir=parent) as tmp:
        tmp_model = Path(tmp) / out.name
        try:
            if on_disk:
                location = out.name + ".data"
                source_dir = Path(input_path).resolve().parent  # type: ignore[arg-type]
                sources = {source_dir / e.value for t in on_disk for e in t.external_data if e.key == "location"}
                if (parent.resolve() / location) in {p.resolve() for p in sources}:
                    raise ModelError(f"{parent / location} is the input's external data file; choose another output name")
                _write_streaming(model, Path(tmp), location, Path(input_path).resolve().parent)  # type: ignore[arg-type]
                tmp_model.write_bytes(model.SerializeToString())
                _replace_pair(Path(tmp), tmp_model, out, location)
                written.append(parent / location)
            elif external_data:
                location = out.name + ".data"
                onnx.save_model(
                    model,
                    str(tmp_model),
                    save_as_external_data=True,
                    all_tensors_to_one_file=True,
                    location=location,
                    size_threshold=_EXTERNAL_SIZE_THRESHOLD,
                )
                _replace_pair(Path(tmp), tmp_model, out, location)
                written.append(parent / location)
            else:
                with open(tmp_model, "wb") as fh:
                    fh.write(model.SerializeToString())
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp_model, out)
        except OSError as exc:
            raise ModelError(f"cannot write {out}: {exc.strerror or exc}") from None
    written.insert(0, out)
    logger.info("wrote %s", ", ".join(str(w) for w in written))
    return written


def _replace_pair(tmp: Path, tmp_model: Path, out: Path, location: str) -> None:
    """Move a model and its data file into place so that no reader ever sees a mixed pair.

    The previous data file (if any) is moved aside first and put back if anything fails before
    the new model is in place, so an interrupted write leaves the previous output intact.
    """
    final_data = out.parent / location
    backup = tmp / (location + ".previous")
    had_previous = final_data.exists()
    if had_previous:
        os.replace(final_data, backup)
    try:
        os.replace(tmp / location, final_data)
        os.replace(tmp_model, out)
    except BaseException:
        if had_previous and backup.exists():
            os.replace(backup, final_data)
        raise


def external_data_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes of a model's tensors stored in external files (read from the headers only)."""
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except Exception:  # load_model reports unreadable files with a better message
        return 0
    total = 0
    for tensor in _external_tensors(model):
        info = {e.key: e.value for e in tensor.external_data}
        total += int(info.get("length", 0) or 0)
    return total


def _write_streaming(model: onnx.ModelProto, tmp: Path, location: str, source_dir: Path) -> None:
    """Write every large tensor to ``tmp/location``: bytes of tensors still on disk are copied
    from ``source_dir`` in chunks, in-memory ones written and dropped from the message; the
    tensors then refer to the new file. Memory stays at one chunk plus the message."""
    chunk = 1 << 24
    with open(tmp / location, "wb") as out:
        for tensor in onnx.external_data_helper._get_all_tensors(model):
            external = tensor.HasField("data_location") and tensor.data_location == onnx.TensorProto.EXTERNAL
            if external:
                info = {e.key: e.value for e in tensor.external_data}
                src = source_dir / info["location"]
                offset = int(info.get("offset", 0) or 0)
                length = int(info.get("length", 0) or 0) or (src.stat().st_size - offset)
                start = out.tell()
                with open(src, "rb") as fh:
                    fh.seek(offset)
                    left = length
                    while left:
                        block = fh.read(min(chunk, left))
                        if not block:
                            raise ModelError(f"external data file {src} is shorter than tensor {tensor.name!r} needs")
                        out.write(block)
                        left -= len(block)
            elif len(tensor.raw_data) >= _EXTERNAL_SIZE_THRESHOLD:
                start = out.tell()
                length = len(tensor.raw_data)
                out.write(tensor.raw_data)
                tensor.ClearField("raw_data")
            else:
                continue
            del tensor.external_data[:]
            for key, value in (("location", location), ("offset", str(start)), ("length", str(length))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            tensor.data_location = onnx.TensorProto.EXTERNAL
        out.flush()
        os.fsync(out.fileno())


def model_file_size(path: str | os.PathLike[str]) -> int:
    """Bytes on disk of a model file plus every external data file it references.

    Raises
    ------
    ModelError
        An external data file it references is missing.
    """
    p = Path(path)
    size = p.stat().st_size
    try:
        model = onnx.load_model(str(p), load_external_data=False)
    except Exception:  # size of an unreadable file is still its size
        return size
    seen: set[str] = set()
    for tensor in _external_tensors(model):
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value not in seen:
                seen.add(entry.value)
                data = p.parent / entry.value
                if not data.is_file():
                    raise ModelError(f"external data file {data} of {p} is missing")
                size += data.stat().st_size
    return size
