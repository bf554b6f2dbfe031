"""Load, validate and save ONNX models with clear errors, external data and atomic writes."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar

import onnx
from google.protobuf.message import DecodeError, Message

__all__ = [
    "ModelError",
    "load_model",
    "load_weights",
    "is_external",
    "save_model",
    "SpilledWeights",
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


def load_model(
    path: str | os.PathLike[str], *, load_external_data: bool = True, lazy: bool = False
) -> onnx.ModelProto:
    """Read an ONNX model, with its external data, and fail with one clear line if it is unusable.

    Parameters
    ----------
    path : path-like
        The ``.onnx`` file.
    load_external_data : bool
        Read tensors stored in external data files into memory (default). Their presence and
        size are checked either way.
    lazy : bool
        Read no weight at all: tensors in external data files stay there, and initializers of
        at least 1 KiB stored inside the ``.onnx`` file itself become external references into
        that file (location: its resolved name, offset and length of their bytes), so memory
        holds the graph only. Weights are then read on demand relative to the file's resolved
        directory, and :func:`save_model` with ``input_path`` copies the ones left unchanged
        (:func:`load_weights` reads them in). Implies ``load_external_data=False``. A file that
        is not plain protobuf (text format) is read whole.

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
    model = None
    own_location = None
    if lazy:
        load_external_data = False
        own_location = p.resolve().name
        try:
            model = _load_without_weights(p, own_location)
        except (_WireError, DecodeError, OSError, ValueError):
            model = None  # not plain protobuf (or unreadable): onnx's loader below says why
    if model is None:
        own_location = None
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
    _check_external_data(model, p.parent, p, skip_location=own_location)
    if load_external_data:
        try:
            onnx.external_data_helper.load_external_data_for_model(model, str(p.parent))
        except (OSError, ValueError) as exc:
            raise ModelError(f"{p}: cannot read its external data: {exc}") from None
    return model


def _external_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    return [t for t in onnx.external_data_helper._get_all_tensors(model) if is_external(t)]


def is_external(tensor: onnx.TensorProto) -> bool:
    """Whether a tensor's data is in an external file (not loaded, or stored that way)."""
    return tensor.HasField("data_location") and tensor.data_location == onnx.TensorProto.EXTERNAL


def _extent(tensor: onnx.TensorProto) -> tuple[str, int, int]:
    """``(location, offset, length)`` of an external tensor; length 0 means "to the end of the file"."""
    try:
        info = onnx.external_data_helper.ExternalDataInfo(tensor)
    except ValueError as exc:  # negative offset or length
        raise ModelError(f"tensor {tensor.name!r}: {exc}") from None
    return info.location, info.offset or 0, info.length or 0


def _refer(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    """Make ``tensor`` an external reference to ``length`` bytes of ``location`` at ``offset``
    (onnx's ``set_external_data`` insists on the bytes being in the message still)."""
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    tensor.data_location = onnx.TensorProto.EXTERNAL


def _check_external_data(
    model: onnx.ModelProto, base_dir: Path, model_path: Path, *, skip_location: str | None = None
) -> None:
    for tensor in _external_tensors(model):
        location, offset, length = _extent(tensor)
        if skip_location is not None and location == skip_location:
            continue  # a reference into the model file itself, made by the lazy loader
        if not location:
            raise ModelError(f"{model_path}: tensor {tensor.name!r} is external but names no file")
        data_path = base_dir / location
        if not data_path.is_file():
            raise ModelError(
                f"{model_path}: external data file {location!r} of tensor {tensor.name!r} is "
                f"missing; keep it next to the model (expected {data_path})"
            )
        if length and offset + length > data_path.stat().st_size:
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
    """Bytes of the model's tensors, those still on disk included."""
    total = 0
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if is_external(tensor):
            total += _extent(tensor)[2]
            continue
        # Not ByteSize(): upb computes it by serializing, twice the tensor in memory for a while.
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
        The model it was made from; writing over it is refused, and tensors the model still
        refers to on disk (loaded lazily) are copied from its directory.
    external_data : bool, optional
        Write tensors to ``<name>.data`` beside the output. ``None`` (default) does so when the
        input kept its weights in an external data file, or when the tensors exceed
        :data:`EXTERNAL_DATA_THRESHOLD`, the safe side of protobuf's 2 GiB.

    Returns
    -------
    list of pathlib.Path
        The files written (the model, and its external data file if any).

    Notes
    -----
    A single-file output is written field by field in protobuf's wire format, one initializer
    at a time, so the serialized model is never held in memory: the bytes are those of
    ``model.SerializeToString()`` with every tensor still on disk read back in.
    """
    out = check_output_path(path, input_path)
    on_disk = _external_tensors(model)  # weights of a lazily loaded model, still in the input's file(s)
    if on_disk and input_path is None:
        raise ModelError("the model refers to external data files that were not loaded; pass input_path "
                         "(the model it was read from) so they can be copied")
    source_dir = Path(input_path).resolve().parent if input_path is not None else None
    own = Path(input_path).resolve() if input_path is not None else None
    if external_data is None:
        # Tensors read lazily from inside a single-file input do not make the output external.
        foreign = any(source_dir is not None and (source_dir / location).resolve() != own
                      for location in {_extent(t)[0] for t in on_disk})
        external_data = foreign or _tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD
    parent = out.parent if str(out.parent) else Path(".")
    written: list[Path] = []
    with tempfile.TemporaryDirectory(prefix=".onnx-lowrank-", dir=parent) as tmp:
        tmp_model = Path(tmp) / out.name
        try:
            if on_disk and external_data:
                assert source_dir is not None  # on_disk without input_path was refused above
                location = out.name + ".data"
                sources = {source_dir / _extent(t)[0] for t in on_disk}
                if (parent.resolve() / location) in {p.resolve() for p in sources}:
                    raise ModelError(f"{parent / location} is the input's external data file; choose another output name")
                _write_streaming(model, Path(tmp), location, source_dir)
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
                    _write_single_file(model, fh, source_dir=source_dir, input_path=own)
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
        model = _read_header(Path(path))
    except Exception:  # load_model reports unreadable files with a better message
        return 0
    return sum(_extent(tensor)[2] for tensor in _external_tensors(model))


def _write_streaming(model: onnx.ModelProto, tmp: Path, location: str, source_dir: Path) -> None:
    """Write every large tensor to ``tmp/location``: bytes of tensors still on disk are copied
    from ``source_dir`` in chunks, in-memory ones written and dropped from the message; the
    tensors then refer to the new file. Memory stays at one chunk plus the message."""
    with open(tmp / location, "wb") as out:
        for tensor in onnx.external_data_helper._get_all_tensors(model):
            if is_external(tensor):
                name, offset, length = _extent(tensor)
                src = source_dir / name
                length = length or (src.stat().st_size - offset)
                start = out.tell()
                _copy_range(out, src, offset, length, tensor.name)
            elif tensor.HasField("raw_data"):
                raw = tensor.raw_data  # a copy (upb): read once, written, dropped
                if len(raw) < _EXTERNAL_SIZE_THRESHOLD:
                    continue
                start = out.tell()
                length = len(raw)
                out.write(raw)
                del raw
                tensor.ClearField("raw_data")
            else:
                continue
            _refer(tensor, location, start, length)
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
        model = _read_header(p)
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


# -- Protobuf wire format ---------------------------------------------------------------------
#
# A message is the concatenation of its fields, each a tag (field number << 3 | wire type) then
# its value; a length-delimited value (wire type 2: bytes, strings, sub-messages) is a varint
# length then the bytes. Parsing concatenated fields merges them, whatever their order, and
# upb/C++ serialize fields in field-number order. So a model can be read without its weights
# (by skipping their byte ranges) and written one initializer at a time: ModelProto fields up
# to ``graph`` (7), the graph's tag and length, GraphProto fields up to ``initializer`` (5),
# each initializer, the rest of the graph, the rest of the model.

_MODEL_GRAPH = 7  # ModelProto.graph
_GRAPH_INITIALIZER = 5  # GraphProto.initializer
_TENSOR_RAW_DATA = 9  # TensorProto.raw_data
_TENSOR_EXTERNAL_DATA = 13  # TensorProto.external_data
_TENSOR_DATA_LOCATION = 14  # TensorProto.data_location
_LEN = 2  # wire type of length-delimited fields
_COPY_CHUNK = 1 << 20  # copy buffer; larger ones are no faster, only resident
_Message = TypeVar("_Message", bound=Message)


class _WireError(ValueError):
    """The bytes are not a well-formed protobuf message (truncated, or another format)."""


class _FileBuffer:
    """Random access to a file's bytes through small reads: ``buf[i]`` and ``buf[a:b]``.

    Not ``mmap``: touching a mapped file's pages counts them in the process's resident memory,
    and the kernel maps far more than the headers touched (27 MiB of MiniLM's 86 to read its
    headers); reads leave the weights in the page cache only.
    """

    _BLOCK = 1 << 16

    def __init__(self, fh: BinaryIO) -> None:
        self._fh = fh
        self._size = os.fstat(fh.fileno()).st_size
        self._start = 0
        self._block = b""

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, key: int | slice) -> int | bytes:
        if isinstance(key, slice):
            self._fh.seek(key.start)
            return self._fh.read(key.stop - key.start)
        if not self._start <= key < self._start + len(self._block):
            self._fh.seek(key)
            self._start, self._block = key, self._fh.read(self._BLOCK)
            if not self._block:
                raise _WireError("the file ends early (changed while being read?)")
        return self._block[key - self._start]


def _varint(buf: bytes | _FileBuffer, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _WireError("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _len_field(number: int, size: int) -> bytes:
    """Tag and length prefix of a length-delimited field of ``size`` bytes."""
    return _encode_varint(number << 3 | _LEN) + _encode_varint(size)


def _fields(buf: bytes | _FileBuffer, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """``(number, wire type, field start, value start, field end)`` of each field in ``buf[start:end]``."""
    pos = start
    while pos < end:
        tag, value = _varint(buf, pos, end)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            _, stop = _varint(buf, value, end)
        elif wire == 1:
            stop = value + 8
        elif wire == _LEN:
            size, value = _varint(buf, value, end)
            stop = value + size
        elif wire == 5:
            stop = value + 4
        else:  # groups (3, 4) are not used by onnx.proto
            raise _WireError(f"unsupported wire type {wire}")
        if number == 0 or stop > end:
            raise _WireError("truncated field")
        yield number, wire, pos, value, stop
        pos = stop


def _split_after(data: bytes, number: int) -> tuple[bytes, bytes]:
    """Split a serialized message before its first field numbered above ``number``."""
    for field, _, start, _, _ in _fields(data, 0, len(data)):
        if field > number:
            return data[:start], data[start:]
    return data, b""


@dataclass
class _TensorLayout:
    """Where an initializer lies in a model file: its message, and the ``raw_data`` bytes when
    they can be read lazily (``header``: the message's other fields, data location excluded)."""

    start: int
    end: int
    raw_offset: int | None = None
    raw_length: int = 0
    header: bytes = b""
    had_location: bool = False  # data_location (DEFAULT) was set


def _scan_tensor(buf: _FileBuffer, start: int, end: int) -> _TensorLayout:
    layout = _TensorLayout(start, end)
    raw: list[tuple[int, int]] = []
    kept: list[tuple[int, int]] = []
    for number, wire, fstart, value, stop in _fields(buf, start, end):
        if number == _TENSOR_RAW_DATA and wire == _LEN:
            raw.append((value, stop))
        elif number == _TENSOR_EXTERNAL_DATA:
            return layout  # already external (odd with inline bytes): keep the tensor as it is
        elif number == _TENSOR_DATA_LOCATION:
            if wire != 0 or _varint(buf, value, stop)[0] != onnx.TensorProto.DEFAULT:
                return layout
            layout.had_location = True
        else:
            kept.append((fstart, stop))
    if len(raw) == 1 and raw[0][1] - raw[0][0] >= _EXTERNAL_SIZE_THRESHOLD:
        layout.raw_offset, layout.raw_length = raw[0][0], raw[0][1] - raw[0][0]
        layout.header = b"".join(buf[a:b] for a, b in kept)
    return layout


def _scan(buf: _FileBuffer) -> tuple[list[tuple[int, int]], list[tuple[int, int]] | None, list[_TensorLayout]]:
    """Byte ranges of the model's fields other than its graph, of the graph's fields other than
    its initializers (``None``: no graph), and the layout of each initializer (top-level graph
    only)."""
    model_parts: list[tuple[int, int]] = []
    graph_parts: list[tuple[int, int]] | None = None
    tensors: list[_TensorLayout] = []
    for number, wire, start, value, stop in _fields(buf, 0, len(buf)):
        if number != _MODEL_GRAPH or wire != _LEN:
            model_parts.append((start, stop))
            continue
        graph_parts = graph_parts if graph_parts is not None else []
        for gnumber, gwire, gstart, gvalue, gstop in _fields(buf, value, stop):
            if gnumber == _GRAPH_INITIALIZER and gwire == _LEN:
                tensors.append(_scan_tensor(buf, gvalue, gstop))
            elif graph_parts and graph_parts[-1][1] == gstart:
                graph_parts[-1] = (graph_parts[-1][0], gstop)  # one slice per run of fields
            else:
                graph_parts.append((gstart, gstop))
    return model_parts, graph_parts, tensors


def _load_without_weights(path: Path, own_location: str | None) -> onnx.ModelProto:
    """Parse a model file but none of its initializers' ``raw_data`` of 1 KiB or more.

    With ``own_location`` each such tensor becomes an external reference to its bytes inside
    the file (``own_location`` is the file's name); without, it is left without data (a header
    for sizes and names only).
    """
    with open(path, "rb") as fh:
        buf = _FileBuffer(fh)
        model_parts, graph_parts, tensors = _scan(buf)
        graph = bytearray()
        for a, b in graph_parts or ():
            graph += buf[a:b]
        for layout in tensors:
            if layout.raw_offset is None:
                body = buf[layout.start:layout.end]
            else:
                body = layout.header
                if own_location is not None:
                    for key, value in (("location", own_location), ("offset", str(layout.raw_offset)),
                                       ("length", str(layout.raw_length))):
                        entry = _len_field(1, len(key.encode())) + key.encode()
                        entry += _len_field(2, len(value.encode())) + value.encode()
                        body += _len_field(_TENSOR_EXTERNAL_DATA, len(entry)) + entry
                    body += _encode_varint(_TENSOR_DATA_LOCATION << 3) + _encode_varint(onnx.TensorProto.EXTERNAL)
            graph += _len_field(_GRAPH_INITIALIZER, len(body)) + body
        data = bytearray()
        for a, b in model_parts:
            data += buf[a:b]
        if graph_parts is not None:
            data += _len_field(_MODEL_GRAPH, len(graph)) + graph
    model = onnx.ModelProto()
    model.ParseFromString(bytes(data))
    return model


def _read_header(path: Path) -> onnx.ModelProto:
    """The model without its large inline weights (external data references kept)."""
    try:
        return _load_without_weights(path, None)
    except (_WireError, DecodeError, ValueError):
        return onnx.load_model(str(path), load_external_data=False)


def _scan_file(path: Path) -> dict[int, _TensorLayout]:
    """Layouts of a model file's lazily readable initializers, by offset of their bytes."""
    with open(path, "rb") as fh:
        return {t.raw_offset: t for t in _scan(_FileBuffer(fh))[2] if t.raw_offset is not None}


def _copy_without(message: _Message, field: str) -> _Message:
    """A copy of a protobuf message without one of its fields (which is never copied)."""
    copy = type(message)()
    # Field by field from the descriptor, not ListFields(): that one returns the skipped
    # field's value too, a copy of the bytes for raw_data.
    for descriptor in message.DESCRIPTOR.fields:
        name = descriptor.name
        if name == field:
            continue
        if descriptor.is_repeated:
            values = getattr(message, name)
            if len(values):
                getattr(copy, name).extend(values)
        elif message.HasField(name):
            if descriptor.type == descriptor.TYPE_MESSAGE:
                getattr(copy, name).CopyFrom(getattr(message, name))
            else:
                setattr(copy, name, getattr(message, name))
    return copy


def _copy_range(out: BinaryIO, src: Path, offset: int, length: int, what: str, fh: BinaryIO | None = None) -> None:
    """Copy ``length`` bytes of ``src`` (or of its open ``fh``) from ``offset`` to ``out``
    through one small buffer."""
    if fh is None:
        with open(src, "rb") as opened:
            _copy_range(out, src, offset, length, what, opened)
        return
    buffer = memoryview(bytearray(min(_COPY_CHUNK, max(length, 1))))
    fh.seek(offset)
    left = length
    while left:
        got = fh.readinto(buffer[: min(len(buffer), left)])
        if not got:
            raise ModelError(f"data file {src} is shorter than tensor {what!r} needs")
        out.write(buffer[:got])
        left -= got


def _write_single_file(
    model: onnx.ModelProto, out: BinaryIO, *, source_dir: Path | None = None, input_path: Path | None = None
) -> None:
    """Write ``model`` as one self-contained file, one initializer at a time.

    The bytes are those of ``model.SerializeToString()`` once every tensor still on disk is read
    back in (as ``onnx.load`` would: inline, ``data_location`` DEFAULT), without ever holding the
    serialized model: memory is the largest tensor plus the graph. A tensor read lazily from
    inside ``input_path`` itself, and unchanged since, is copied byte for byte from there.
    """
    from google.protobuf.unknown_fields import UnknownFieldSet

    graph = model.graph
    if not model.HasField("graph") or len(UnknownFieldSet(model)) or len(UnknownFieldSet(graph)):
        # Fields this onnx does not know would be lost by the field-wise copies below; such
        # models are rare and small enough to be written the plain way.
        out.write(model.SerializeToString())
        return
    head, tail = _split_after(_copy_without(model, "graph").SerializeToString(), _MODEL_GRAPH)
    ghead, gtail = _split_after(_copy_without(graph, "initializer").SerializeToString(), _GRAPH_INITIALIZER)
    originals: dict[int, _TensorLayout] | None = None
    resolved: dict[str, Path] = {}  # location -> file (resolving costs system calls; models have thousands)
    plans: list[tuple[int, tuple]] = []  # (serialized size, how to write it) per initializer
    for tensor in graph.initializer:
        if not is_external(tensor):
            if not tensor.HasField("raw_data"):  # typed fields (float_data, ...): small as a rule
                plans.append((tensor.ByteSize(), ("memory",)))
                continue
            # Written as its other fields around its raw_data: serializing a tensor (and upb's
            # ByteSize, which serializes) holds it twice more; reading raw_data, once.
            length = len(tensor.raw_data)
            before, after = _split_after(_copy_without(tensor, "raw_data").SerializeToString(), _TENSOR_RAW_DATA)
            prefix = before + _len_field(_TENSOR_RAW_DATA, length)
            plans.append((len(prefix) + length + len(after), ("raw", prefix, length, after)))
            continue
        if source_dir is None:
            raise ModelError(f"tensor {tensor.name!r} is stored on disk; pass input_path to save it")
        location, offset, length = _extent(tensor)
        if location not in resolved:
            resolved[location] = (source_dir / location).resolve()
        src = resolved[location]
        length = length or (src.stat().st_size - offset)
        if input_path is not None and src == input_path:
            if originals is None:
                originals = _scan_file(input_path)
            layout = originals.get(offset)
            if layout is not None and layout.raw_length == length and _same_header(tensor, layout.header):
                plans.append((layout.end - layout.start, ("copy", src, layout.start, layout.end - layout.start)))
                continue
        header = onnx.TensorProto()
        header.CopyFrom(tensor)
        del header.external_data[:]
        header.ClearField("raw_data")
        header.data_location = onnx.TensorProto.DEFAULT
        before, after = _split_after(header.SerializeToString(), _TENSOR_RAW_DATA)
        prefix = before + _len_field(_TENSOR_RAW_DATA, length)
        plans.append((len(prefix) + length + len(after), ("inline", prefix, src, offset, length, after)))

    graph_size = len(ghead) + len(gtail) + sum(len(_len_field(_GRAPH_INITIALIZER, n)) + n for n, _ in plans)
    out.write(head)
    out.write(_len_field(_MODEL_GRAPH, graph_size))
    out.write(ghead)
    with ExitStack() as files:
        opened: dict[Path, BinaryIO] = {}

        def source(path: Path) -> BinaryIO:
            if path not in opened:
                opened[path] = files.enter_context(open(path, "rb"))
            return opened[path]

        for tensor, (size, plan) in zip(graph.initializer, plans):
            out.write(_len_field(_GRAPH_INITIALIZER, size))
            if plan[0] == "memory":
                out.write(tensor.SerializeToString())
            elif plan[0] == "raw":
                _, prefix, length, after = plan
                raw = tensor.raw_data
                if len(raw) != length:  # never: the model changed while being written
                    raise ModelError(f"tensor {tensor.name!r} changed while the model was being written")
                out.write(prefix)
                out.write(raw)
                del raw
                out.write(after)
            elif plan[0] == "copy":
                _copy_range(out, plan[1], plan[2], plan[3], tensor.name, source(plan[1]))
            else:
                _, prefix, src, offset, length, after = plan
                out.write(prefix)
                _copy_range(out, src, offset, length, tensor.name, source(src))
                out.write(after)
    out.write(gtail)
    out.write(tail)


def _same_header(tensor: onnx.TensorProto, header: bytes) -> bool:
    """Whether a lazily read tensor still has the fields it had in its file (bar its data)."""
    current = onnx.TensorProto()
    current.CopyFrom(tensor)
    del current.external_data[:]
    current.ClearField("data_location")
    return current == onnx.TensorProto.FromString(header)


class SpilledWeights:
    """A working copy of an in-memory model whose large initializers live in a temporary file.

    Use as a context manager (the file is removed on exit). ``model`` is a copy of the argument
    in which every top-level initializer of 1 KiB or more is an external reference to
    ``directory/weights.data``: processing it reads each weight when needed (as for a model
    loaded lazily from disk) instead of holding them all twice, original and copy.
    :meth:`restore` reads back the weights the copy still refers to, exactly as they were.

    Parameters
    ----------
    model : onnx.ModelProto
        Not modified.
    directory : path-like, optional
        Where to create the temporary directory (default: the system's temporary directory).
    """

    _NAME = "weights.data"

    def __init__(self, model: onnx.ModelProto, directory: str | os.PathLike[str] | None = None) -> None:
        from google.protobuf.unknown_fields import UnknownFieldSet

        #: Offset in the file -> whether the tensor had ``data_location`` (DEFAULT) set.
        self._had_location: dict[int, bool] = {}
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        #: The temporary directory; ``None`` when the model is copied whole instead: it has
        #: fields this onnx does not know (the field-wise copy would lose them) or tensors that
        #: already refer to external data (which must keep referring to their own files).
        self.directory: str | None = None
        unknown = model.HasField("graph") and (len(UnknownFieldSet(model)) or len(UnknownFieldSet(model.graph)))
        if not model.HasField("graph") or unknown or _external_tensors(model):
            self.model = onnx.ModelProto()
            self.model.CopyFrom(model)
            return
        self._tmp = tempfile.TemporaryDirectory(prefix="onnx-lowrank-spill-", dir=directory)
        self.directory = self._tmp.name
        try:
            self.model = self._spill(model)
        except BaseException:
            self.close()
            raise

    def _spill(self, source: onnx.ModelProto) -> onnx.ModelProto:
        model = _copy_without(source, "graph")
        model.graph.CopyFrom(_copy_without(source.graph, "initializer"))
        with open(Path(self.directory) / self._NAME, "wb") as out:
            for tensor in source.graph.initializer:
                copy = model.graph.initializer.add()
                raw = tensor.raw_data if tensor.HasField("raw_data") else b""  # a copy (upb): one at a time
                if len(raw) < _EXTERNAL_SIZE_THRESHOLD:
                    copy.CopyFrom(tensor)
                    continue
                copy.CopyFrom(_copy_without(tensor, "raw_data"))
                offset = out.tell()
                out.write(raw)
                self._had_location[offset] = copy.HasField("data_location")
                _refer(copy, self._NAME, offset, len(raw))
                del raw
        return model

    def restore(self, model: onnx.ModelProto) -> None:
        """Read back, in place, every weight of ``model`` that still refers to the file."""
        if self.directory is None:
            return
        path = (Path(self.directory) / self._NAME).resolve()
        _read_back(model, Path(self.directory), {(path, offset): had for offset, had in self._had_location.items()})

    def close(self) -> None:
        """Remove the temporary file."""
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> SpilledWeights:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_weights(model: onnx.ModelProto, path: str | os.PathLike[str]) -> None:
    """Read into memory, in place, every weight of a model loaded with ``load_model(path, lazy=True)``.

    The model then holds the same as ``load_model(path)`` would have; tensors added or left
    out since are as they are. Memory grows by the weights read (and briefly by the largest).

    Parameters
    ----------
    model : onnx.ModelProto
        Modified in place.
    path : path-like
        The file it was loaded from.
    """
    own = Path(path).resolve()
    presence: dict[tuple[Path, int], bool] = {}
    if any((own.parent / location).resolve() == own for location in {_extent(t)[0] for t in _external_tensors(model)}):
        presence = {(own, offset): layout.had_location for offset, layout in _scan_file(own).items()}
    _read_back(model, own.parent, presence)


def _read_back(model: onnx.ModelProto, base_dir: Path, presence: dict[tuple[Path, int], bool]) -> None:
    """Read every external tensor into ``raw_data``; ``data_location`` is then set to DEFAULT
    (as onnx's loader does) unless ``presence`` says, by file and offset, it was not set."""

    # Largest first: each read holds the tensor twice for a moment (the bytes read, and their
    # copy in the message), best done while the rest is not in memory yet.
    with ExitStack() as files:
        opened: dict[str, tuple[Path, BinaryIO]] = {}  # location -> (file, open file)
        for tensor in sorted(_external_tensors(model), key=lambda t: _extent(t)[2], reverse=True):
            location, offset, length = _extent(tensor)
            if location not in opened:
                src = (base_dir / location).resolve()
                opened[location] = (src, files.enter_context(open(src, "rb")))
            src, fh = opened[location]
            fh.seek(offset)
            length = length or (os.fstat(fh.fileno()).st_size - offset)
            data = fh.read(length)
            if len(data) != length:
                raise ModelError(f"data file {src} is shorter than tensor {tensor.name!r} needs")
            tensor.raw_data = data
            del data
            del tensor.external_data[:]
            if presence.get((src, offset), True):
                tensor.data_location = onnx.TensorProto.DEFAULT
            else:
                tensor.ClearField("data_location")
