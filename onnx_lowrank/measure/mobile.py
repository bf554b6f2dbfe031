"""Mobile readiness: onnxruntime's NNAPI / CoreML usability check and the ORT format for ARM.

- :func:`mobile_usability`: the partitions NNAPI and CoreML could take (onnxruntime's
  ``check_onnx_model_mobile_usability``, returning numbers instead of logging them);
- :func:`convert_to_ort` and :func:`ort_format_check`: conversion to the ``.ort`` file an
  Android/iOS build loads, its outputs confirmed against the ``.onnx`` model, and the
  required-operators config a reduced build is made from; :func:`new_operators` compares two
  such configs;
- :func:`mobile_report`: all of it for an original model and its compressed versions.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import pathlib
import re
import tempfile
import warnings
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from onnx_lowrank.measure.errors import HarnessError, one_line
from onnx_lowrank.measure.inputs import num_samples
from onnx_lowrank.measure.sessions import create_session, run_samples

logger = logging.getLogger(__name__)

__all__ = [
    "convert_to_ort",
    "mobile_report",
    "mobile_usability",
    "new_operators",
    "ort_format_check",
]

# Outputs of the .ort file must agree with the .onnx file within these tolerances: both run the
# same CPU kernels, but the ORT-format graph was optimized for ARM (no NCHWc layout), so the float
# summation order can differ slightly.
_ORT_RTOL = 1e-3
_ORT_ATOL = 1e-5


@contextlib.contextmanager
def _quiet_ort() -> Iterator[None]:
    """Silence onnxruntime's tools (print to stdout, logging, native warnings) for a block."""
    sink = io.StringIO()
    root = logging.getLogger()
    # the tools call logging.basicConfig() and log INFO lines: keep the root handlers as they were
    # and mute records up to WARNING while they run
    old_handlers = list(root.handlers)
    old_disable = logging.root.manager.disable
    ort.set_default_logger_severity(3)
    try:
        logging.disable(logging.WARNING)
        with contextlib.redirect_stdout(sink), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(old_disable)
        root.handlers[:] = old_handlers
        ort.set_default_logger_severity(2)  # onnxruntime's default: warnings
        if sink.getvalue():
            logger.debug("onnxruntime tools said:\n%s", sink.getvalue())


def _partition_summary(info: Any) -> dict[str, Any]:
    nodes = int(info.num_nodes)
    return {
        "nodes": nodes,
        "supported_nodes": int(info.num_supported_nodes),
        "partitions": int(info.num_partitions),
        "partition_sizes": [len(g) for g in info.supported_groups],
        "unsupported_ops": sorted(info.unsupported_ops),
        "unsupported_due_to_dynamic_shape": int(info.nodes_unsupported_due_to_dynamic_input),
        "verdict": info.suitability().name if nodes else "NO",
    }


def mobile_usability(model_path: str | os.PathLike[str]) -> dict[str, Any]:
    """onnxruntime's mobile usability check (NNAPI and CoreML) of a model.

    This is what ``python -m onnxruntime.tools.check_onnx_model_mobile_usability`` does, but
    returning numbers instead of logging them: the model is optimized to the BASIC level (as the
    conversion to ORT format does), shapes are inferred, and the partitions each provider could
    take are estimated from its supported-operator list.

    Parameters
    ----------
    model_path : path-like

    Returns
    -------
    dict
        ``{"nnapi": {...}, "coreml": {"mlprogram": {...}, "neuralnetwork": {...}, "verdict"}}``;
        each provider entry has ``nodes``, ``supported_nodes``, ``partitions``,
        ``partition_sizes``, ``unsupported_ops``, ``verdict`` (``YES`` / ``MAYBE`` / ``NO``: should
        the provider perform well on the model as is) and, when the model has dynamic input shapes
        and the verdict is not YES, ``verdict_with_fixed_shapes``. On failure, ``{"error": str}``.
    """
    try:
        with _quiet_ort():  # the tools configure logging at import time
            from onnxruntime.tools.mobile_helpers import usability_checker as uc
            from onnxruntime.tools.onnx_model_utils import ModelProtoWithShapeInfo, optimize_model
    except Exception as exc:  # noqa: BLE001 - tools missing from a minimal onnxruntime
        return {"error": f"onnxruntime mobile tools unavailable: {one_line(exc)}"}
    src = pathlib.Path(os.fspath(model_path)).resolve()
    quiet = logging.getLogger(__name__ + ".usability")
    quiet.setLevel(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory(prefix="onnx_lowrank_usability_") as tmp, _quiet_ort():
            opt_path = pathlib.Path(tmp) / "model.onnx"
            optimize_model(src, opt_path, use_external_initializers=True)
            wrapper = ModelProtoWithShapeInfo(opt_path)
            model = wrapper.model_with_shape_info
            dynamic_inputs, _ = uc.check_shapes(model.graph, quiet)
            checkers = {
                "nnapi": uc.check_nnapi_partitions,
                "coreml_mlprogram": lambda m, fixed: uc.check_coreml_partitions(
                    m, fixed, "coreml_supported_mlprogram_ops.md"
                ),
                "coreml_neuralnetwork": lambda m, fixed: uc.check_coreml_partitions(
                    m, fixed, "coreml_supported_neuralnetwork_ops.md"
                ),
            }
            results: dict[str, dict[str, Any]] = {}
            for key, fn in checkers.items():
                summary = _partition_summary(fn(model, True))
                if summary["verdict"] != "YES" and dynamic_inputs:
                    summary["verdict_with_fixed_shapes"] = _partition_summary(fn(model, False))["verdict"]
                results[key] = summary
            del wrapper
    except Exception as exc:  # noqa: BLE001 - the checker is best effort; say why it failed
        return {"error": f"mobile usability check failed: {one_line(exc)}"}
    order = {"NO": 0, "MAYBE": 1, "YES": 2}
    ml, nn = results["coreml_mlprogram"], results["coreml_neuralnetwork"]
    return {
        "nnapi": results["nnapi"],
        "coreml": {
            "mlprogram": ml,
            "neuralnetwork": nn,
            "verdict": max(ml["verdict"], nn["verdict"], key=order.__getitem__),
        },
    }


def _parse_required_operators(path: pathlib.Path) -> dict[str, list[str]]:
    ops: dict[str, set[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(";")
        if len(parts) < 3:
            continue
        key = f"{parts[0]};{parts[1]}"
        # with type reduction an entry looks like Op{...}; keep the operator name
        names = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)(?:\{[^}]*\})?(?:,|$)", parts[2])
        ops.setdefault(key, set()).update(names)
    return {k: sorted(v) for k, v in sorted(ops.items())}


def convert_to_ort(
    model_path: str | os.PathLike[str], workdir: str | os.PathLike[str]
) -> tuple[pathlib.Path, pathlib.Path | None]:
    """Convert a model to ORT format for ARM (``onnxruntime.tools.convert_onnx_models_to_ort``).

    Fixed optimization style, target platform ``arm``: the file an Android/iOS build of
    onnxruntime loads.

    Parameters
    ----------
    model_path : path-like
        The ``.onnx`` model (external data next to it is found).
    workdir : path-like
        An empty directory for the converted files.

    Returns
    -------
    ort_path : pathlib.Path
        The ``.ort`` file (under ``workdir/ort``).
    config : pathlib.Path or None
        The required-operators config the converter wrote (None if it wrote none).

    Raises
    ------
    HarnessError
        When the converter produced no ``.ort`` file.
    """
    src = pathlib.Path(os.fspath(model_path)).resolve()
    work = pathlib.Path(os.fspath(workdir)).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if src.suffix.lower() != ".onnx" or src.name.lower().endswith(".optimized.onnx"):
        # the converter only picks up *.onnx files: save a copy (weights as external data)
        staged = work / "src" / "model.onnx"
        staged.parent.mkdir()
        proto = onnx.load(str(src))
        onnx.save(proto, str(staged), save_as_external_data=True, location="model.onnx.data")
        src = staged
    out_dir = work / "ort"
    with _quiet_ort():
        # imported here: the tools configure logging at import time
        from onnxruntime.tools.convert_onnx_models_to_ort import (
            OptimizationStyle,
            convert_onnx_models_to_ort,
        )

        convert_onnx_models_to_ort(
            src,
            output_dir=out_dir,
            optimization_styles=[OptimizationStyle.Fixed],
            target_platform="arm",
        )
    ort_files = sorted(out_dir.rglob("*.ort"))
    configs = sorted(out_dir.glob("*.config"))
    if not ort_files:
        raise HarnessError("the converter produced no .ort file")
    return ort_files[0], (configs[0] if configs else None)


def ort_format_check(
    model_path: str | os.PathLike[str],
    inputs: Mapping[str, np.ndarray],
    workdir: str | os.PathLike[str],
    *,
    max_samples: int = 4,
) -> dict[str, Any]:
    """Convert a model to ORT format for ARM, run the ``.ort`` file and compare with the ``.onnx``.

    Uses ``onnxruntime.tools.convert_onnx_models_to_ort`` (fixed optimization style, target
    platform ``arm``), which also writes the required-operators config a reduced (mobile) build of
    onnxruntime is made from.

    Parameters
    ----------
    model_path : path-like
        The ``.onnx`` model (external data next to it is found).
    inputs : mapping of str to numpy.ndarray
        Samples (see :func:`~onnx_lowrank.measure.inputs.make_inputs`); the first ``max_samples`` are compared.
    workdir : path-like
        An empty directory for the converted files.
    max_samples : int, default 4

    Returns
    -------
    dict
        ``converted`` (bool), ``ort_path``, ``ort_size_bytes``, ``outputs_match`` (bool: every
        output within rtol 1e-3 / atol 1e-5), ``max_abs_diff``, ``required_operators``
        (``"domain;opset"`` -> sorted operator types); ``error`` when conversion or the run failed.
    """
    result: dict[str, Any] = {"converted": False}
    try:
        ort_path, config = convert_to_ort(model_path, workdir)
        src = pathlib.Path(os.fspath(model_path)).resolve()
        result.update(
            converted=True,
            ort_path=str(ort_path),
            ort_size_bytes=ort_path.stat().st_size,
            required_operators=_parse_required_operators(config) if config is not None else {},
        )
        n = min(max_samples, num_samples(inputs))
        subset = {k: v[:n] for k, v in inputs.items()}
        s_onnx = create_session(src, record_assignment=False)
        s_ort = create_session(str(ort_path), record_assignment=False)
        ref, got = run_samples(s_onnx, subset), run_samples(s_ort, subset)
        worst, match = 0.0, True
        for name, values in ref.items():
            for r, g in zip(values, got.get(name, [])):
                r, g = np.asarray(r), np.asarray(g)
                if r.shape != g.shape:
                    match = False
                    continue
                if r.size:
                    worst = max(worst, float(np.max(np.abs(r.astype(np.float64) - g.astype(np.float64)))))
                    match = match and bool(np.allclose(g, r, rtol=_ORT_RTOL, atol=_ORT_ATOL, equal_nan=True))
            if name not in got:
                match = False
        result.update(outputs_match=match, max_abs_diff=worst, samples_compared=n)
    except Exception as exc:  # noqa: BLE001 - report the failure in the result
        result["error"] = one_line(exc)
    return result


def new_operators(original: Mapping[str, Sequence[str]], compressed: Mapping[str, Sequence[str]]) -> list[str]:
    """Operator types the compressed model needs that the original does not.

    Parameters
    ----------
    original, compressed : mapping
        ``required_operators`` of :func:`ort_format_check`.

    Returns
    -------
    list of str
        ``"domain;opset;Op"`` entries; a reduced onnxruntime build made for the original lacks
        their kernels. Should be empty for a factorized model.
    """
    have = {(k, op) for k, ops in original.items() for op in ops}
    return sorted(f"{k};{op}" for k, ops in compressed.items() for op in ops if (k, op) not in have)


def mobile_report(
    original: str | os.PathLike[str],
    compressed: Sequence[str | os.PathLike[str]],
    inputs: Mapping[str, np.ndarray],
) -> list[dict[str, Any]]:
    """Mobile readiness of an original model and its compressed versions.

    Parameters
    ----------
    original : path-like
    compressed : sequence of path-like
    inputs : mapping of str to numpy.ndarray
        Samples used to confirm that the ``.ort`` files compute what the ``.onnx`` files do.

    Returns
    -------
    list of dict
        One per compressed model: ``{"nnapi": {"original", "compressed"}, "coreml": {"original",
        "compressed"}, "ort_format": {"original", "compressed", "new_operators"}}``.
    """
    with tempfile.TemporaryDirectory(prefix="onnx_lowrank_mobile_") as tmp:
        ref_usability = mobile_usability(original)
        ref_ort = ort_format_check(original, inputs, pathlib.Path(tmp) / "original")
        _strip_temp_path(ref_ort)
        reports = []
        for i, path in enumerate(compressed):
            usability = mobile_usability(path)
            comp_ort = ort_format_check(path, inputs, pathlib.Path(tmp) / f"compressed{i}")
            _strip_temp_path(comp_ort)
            reports.append(
                {
                    "nnapi": {"original": _pick(ref_usability, "nnapi"), "compressed": _pick(usability, "nnapi")},
                    "coreml": {"original": _pick(ref_usability, "coreml"), "compressed": _pick(usability, "coreml")},
                    "ort_format": {
                        "target_platform": "arm",
                        "original": ref_ort,
                        "compressed": comp_ort,
                        "new_operators": new_operators(
                            ref_ort.get("required_operators", {}), comp_ort.get("required_operators", {})
                        ),
                    },
                }
            )
    return reports


def _pick(usability: Mapping[str, Any], key: str) -> dict[str, Any]:
    if "error" in usability:
        return {"error": usability["error"]}
    return dict(usability[key])


def _strip_temp_path(res: dict[str, Any]) -> None:
    # the .ort file lives in a temporary directory that is deleted: keep only its name
    if "ort_path" in res:
        res["ort_path"] = os.path.basename(res["ort_path"])
