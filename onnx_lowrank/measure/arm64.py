"""Running models on onnxruntime's ARM64 CPU build under qemu-user, and comparing them with x86.

The runtime is prepared once by :mod:`onnx_lowrank.measure.arm64_setup` (``onnx-lowrank
arm64-setup``). Here:

- :func:`run_models_arm64` runs models inside the emulated runtime on given inputs, through a small
  runner script written to a temporary directory; arrays go in and out as ``.npz`` files;
- :func:`compare_arm64_x86` says whether one output on ARM64 matches x86 within
  :data:`ARM64_TOLERANCE`;
- :func:`arm64_section` builds the ``"arm64"`` section of ``onnx-lowrank bench --arm64``, and
  :func:`section_failures` the failed checks in it.

Only outputs and operator coverage are real under emulation. Run times are not: qemu translates
every ARM instruction into several x86 ones, on a different memory system, so an emulated time
says nothing about a phone's latency and is never reported as latency.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import tempfile
import time
from typing import Any, Mapping, Sequence

import numpy as np

from onnx_lowrank.measure.arm64_setup import check, emulated_cmd, emulated_env

__all__ = [
    "ARM64_TOLERANCE",
    "DEFAULT_SAMPLES",
    "DEFAULT_TIMEOUT_S",
    "arm64_section",
    "compare_arm64_x86",
    "run_models_arm64",
    "section_failures",
]

#: Outputs of a model on ARM64 and on x86 "match" when ``max_abs <= atol + rtol * max|x86|``.
#: The two builds run different kernels (NEON vs AVX2/AVX-512 GEMM blocking, different summation
#: order, their own exp/tanh approximations), which moves float32 results by a few ulps per
#: operation (1e-7..1e-6 relative measured on small models and a real classifier); rtol 1e-4 leaves
#: ~100x headroom over that while a wrong or missing kernel shows up as O(1e-1). float16 keeps 10
#: mantissa bits instead of 23, hence its looser tolerance. Integer and bool outputs must be equal.
ARM64_TOLERANCE: dict[str, tuple[float, float]] = {  # dtype -> (rtol, atol)
    "float64": (1e-9, 1e-12),
    "float32": (1e-4, 1e-6),
    "float16": (1e-2, 1e-3),
}

#: Default samples per model under emulation: outputs are compared element by element, so a few
#: samples settle agreement; each costs one emulated run (~10-100x slower than native).
DEFAULT_SAMPLES = 4
#: Wall-clock limit of one emulated job: interpreter start + onnxruntime import take ~3 s, a small
#: model run well under a second, a 20 MB CNN a few seconds per sample; 15 minutes means "hung".
DEFAULT_TIMEOUT_S = 900.0


# --------------------------------------------------------------------------------------------
# running models
# --------------------------------------------------------------------------------------------

#: The runner executed by the emulated interpreter (only numpy and onnxruntime exist there).
_RUNNER = r'''
import json, platform, sys, time
import numpy as np
import onnxruntime as ort

job = json.load(open(sys.argv[1]))
with np.load(job["inputs"], allow_pickle=False) as data:
    arrays = {name: data[f"i{j}"] for j, name in enumerate(job["input_names"])}
result = {"onnxruntime": ort.__version__, "numpy": np.__version__, "machine": platform.machine(),
          "python": platform.python_version(), "models": []}
for k, path in enumerate(job["models"]):
    entry = {"path": path}
    t0 = time.perf_counter()
    try:
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, job["opt_level"])
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        entry["providers"] = sess.get_providers()
        names = [o.name for o in sess.get_outputs()]
        wanted = [i.name for i in sess.get_inputs()]
        missing = [n for n in wanted if n not in arrays]
        if missing:
            raise ValueError(f"no input data for {missing}")
        saved, skipped = {}, []
        for s in range(job["samples"]):
            values = sess.run(names, {n: arrays[n][s] for n in wanted})
            for o, v in enumerate(values):
                if isinstance(v, np.ndarray):
                    saved[f"o{o}_s{s}"] = v
                elif names[o] not in skipped:
                    skipped.append(names[o])
        out = f"{job['outdir']}/model{k}.npz"
        np.savez(out, **saved)
        entry.update(outputs=names, file=out, non_tensor_outputs=skipped)
    except Exception as exc:
        entry["error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:400]}"
    entry["emulated_seconds"] = time.perf_counter() - t0
    result["models"].append(entry)
with open(job["result"], "w") as f:
    json.dump(result, f)
'''

_OPT_NAMES = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
              "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


def run_models_arm64(
    model_paths: Sequence[str | os.PathLike[str]],
    inputs: Mapping[str, np.ndarray],
    *,
    cache: str | os.PathLike[str] | None = None,
    samples: int | None = None,
    opt_level: str = "all",
    timeout: float = DEFAULT_TIMEOUT_S,
) -> dict[str, Any]:
    """Run models on onnxruntime's ARM64 CPU build under qemu-user, one emulated process for all.

    Parameters
    ----------
    model_paths : sequence of path-like
        ``.onnx`` (external data next to it is found) or ``.ort`` files.
    inputs : mapping of str to numpy.ndarray
        Samples, first axis = sample (as :func:`onnx_lowrank.measure.inputs.make_inputs` returns); each
        model is fed the inputs it declares.
    cache : path-like, optional
        The runtime's cache directory (default :func:`onnx_lowrank.measure.arm64_setup.default_cache`).
    samples : int, optional
        Run only the first ``samples`` samples (default all).
    opt_level : {"disable", "basic", "extended", "all"}
        onnxruntime graph optimization level inside the ARM64 runtime.
    timeout : float
        Seconds before the emulated process is killed.

    Returns
    -------
    dict
        ``available`` (bool). When False, ``reason`` (one line). When True: ``onnxruntime``,
        ``numpy``, ``python``, ``machine`` (``aarch64``), ``qemu``, ``samples``,
        ``emulation_wall_s`` (the whole emulated job; not a latency) and ``models``: one dict per
        path with ``path``, and either ``outputs`` (output name -> list of per-sample arrays;
        non-tensor outputs are left out and named in ``non_tensor_outputs``) or ``error``.
    """
    ready = check(cache)
    if not ready.ready:
        return {"available": False, "reason": ready.reason}
    if opt_level not in _OPT_NAMES:
        raise ValueError(f"unknown opt_level {opt_level!r}; choose from {', '.join(_OPT_NAMES)}")
    root, qemu = ready.cache, ready.qemu
    assert qemu is not None
    names = list(inputs)
    total = int(next(iter(inputs.values())).shape[0]) if inputs else 1
    n = total if samples is None else max(1, min(int(samples), total))
    paths = [str(pathlib.Path(os.fspath(p)).resolve()) for p in model_paths]
    with tempfile.TemporaryDirectory(prefix="onnx_lowrank_arm64_") as tmp:
        work = pathlib.Path(tmp)
        (work / "runner.py").write_text(_RUNNER)
        np.savez(work / "inputs.npz", **{f"i{j}": np.ascontiguousarray(inputs[k][:n]) for j, k in enumerate(names)})
        job = {"models": paths, "inputs": str(work / "inputs.npz"), "input_names": names, "samples": n,
               "opt_level": _OPT_NAMES[opt_level], "outdir": str(work), "result": str(work / "result.json")}
        (work / "job.json").write_text(json.dumps(job))
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(emulated_cmd(root, qemu, str(work / "runner.py"), str(work / "job.json")),
                                  env=emulated_env(root), capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"available": False, "reason": f"the emulated run did not finish within {timeout:g} s"}
        except OSError as exc:
            return {"available": False, "reason": f"cannot start {qemu}: {exc.strerror}"}
        wall = time.perf_counter() - t0
        if proc.returncode != 0 or not (work / "result.json").is_file():
            why = " ".join(proc.stderr.split())[-300:] or f"exit status {proc.returncode}"
            if proc.returncode < 0:
                why = f"killed by signal {-proc.returncode}: {why}"
            return {"available": False, "reason": f"the emulated runner failed: {why}"}
        result = json.loads((work / "result.json").read_text())
        models = []
        for entry in result.pop("models"):
            out: dict[str, Any] = {"path": entry["path"], "emulated_seconds": entry.get("emulated_seconds")}
            if "error" in entry:
                out["error"] = entry["error"]
            else:
                with np.load(entry["file"], allow_pickle=False) as data:
                    outputs: dict[str, list[np.ndarray]] = {}
                    for o, name in enumerate(entry["outputs"]):
                        if name in entry["non_tensor_outputs"]:
                            continue
                        outputs[name] = [data[f"o{o}_s{s}"] for s in range(n)]
                out["outputs"] = outputs
                out["non_tensor_outputs"] = entry["non_tensor_outputs"]
            models.append(out)
    return {"available": True, **result, "qemu": ready.info.get("qemu_version", qemu), "samples": n,
            "emulation_wall_s": wall, "models": models}


# --------------------------------------------------------------------------------------------
# the bench section
# --------------------------------------------------------------------------------------------


def _tolerance(dtype: np.dtype) -> tuple[float, float] | None:
    return ARM64_TOLERANCE.get(np.dtype(dtype).name)


def compare_arm64_x86(arm: Sequence[np.ndarray], x86: Sequence[Any]) -> dict[str, Any]:
    """How far one output on ARM64 is from the same model's output on x86.

    Returns
    -------
    dict
        ``max_abs``, ``rel_l2``, ``ref_max_abs``, ``tolerance`` ({"rtol", "atol"}, or "exact" for
        integer outputs) and ``match`` (``max_abs <= atol + rtol * ref_max_abs``, see
        :data:`ARM64_TOLERANCE`).
    """
    if len(arm) != len(x86) or any(np.shape(a) != np.shape(b) for a, b in zip(arm, x86)):
        return {"match": False, "error": "shapes differ between ARM64 and x86"}
    a = np.concatenate([np.asarray(v, np.float64).ravel() for v in arm]) if arm else np.zeros(0)
    b = np.concatenate([np.asarray(v, np.float64).ravel() for v in x86]) if x86 else np.zeros(0)
    diff = np.abs(a - b)
    both_nan = np.isnan(a) & np.isnan(b)
    diff[both_nan] = 0.0
    max_abs = float(np.max(diff)) if diff.size else 0.0
    ref_max = float(np.max(np.abs(b[np.isfinite(b)]))) if np.isfinite(b).any() else 0.0
    norm = float(np.linalg.norm(b[np.isfinite(b)]))
    res: dict[str, Any] = {
        "max_abs": max_abs,
        "rel_l2": float(np.linalg.norm(diff[np.isfinite(diff)]) / norm) if norm > 0 else None,
        "ref_max_abs": ref_max,
    }
    tol = _tolerance(np.asarray(x86[0]).dtype) if len(x86) else None
    if tol is None:
        res["tolerance"] = "exact"
        res["match"] = bool(max_abs == 0.0)
    else:
        rtol, atol = tol
        res["tolerance"] = {"rtol": rtol, "atol": atol}
        res["match"] = bool(np.isfinite(max_abs) and max_abs <= atol + rtol * ref_max)
    return res


def arm64_section(
    original: str | os.PathLike[str],
    compressed: Sequence[str | os.PathLike[str]],
    inputs: Mapping[str, np.ndarray],
    x86_outputs: Sequence[Mapping[str, Sequence[Any]]],
    *,
    cache: str | os.PathLike[str] | None = None,
    samples: int = DEFAULT_SAMPLES,
    opt_level: str = "all",
    ort_models: Sequence[str | os.PathLike[str] | None] | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> list[dict[str, Any]]:
    """The ``"arm64"`` report of ``bench --arm64``: original and compressed models on ARM64.

    Parameters
    ----------
    original, compressed : path-like
        The models, in the order of ``x86_outputs``.
    inputs : mapping of str to numpy.ndarray
        The samples the x86 outputs were computed on.
    x86_outputs : sequence of mapping
        Per model (original first): output name -> per-sample values on x86.
    cache, samples, opt_level, timeout
        See :func:`run_models_arm64`.
    ort_models : sequence, optional
        ``.ort`` conversions of the same models (None where a conversion failed): also run on
        ARM64 and compared with the x86 run of the ``.onnx`` model.

    Returns
    -------
    list of dict
        One section per compressed model (one for the original alone when ``compressed`` is
        empty), each ``{"available", "status", "onnxruntime", "outputs", ...}``. ``outputs`` maps
        an output name to ``compressed_vs_original`` (accuracy metrics on ARM64, see
        :func:`onnx_lowrank.measure.accuracy.output_metrics`) and ``arm64_vs_x86`` (``original`` /
        ``compressed``: :func:`compare_arm64_x86`). Unavailable: ``available`` False, ``status``
        ``"unavailable: <reason>"``, ``reason``, ``onnxruntime`` None, ``outputs`` empty.
    """
    # imports onnxruntime (through its sessions): only here, so that this module stays light
    from onnx_lowrank.measure.accuracy import output_metrics

    paths = [os.fspath(original), *map(os.fspath, compressed)]
    ort_list = list(ort_models or [])
    run_paths = paths + [os.fspath(p) for p in ort_list if p is not None]
    res = run_models_arm64(run_paths, inputs, cache=cache, samples=samples, opt_level=opt_level, timeout=timeout)
    n_sections = max(1, len(compressed))
    if not res["available"]:
        gone = {"available": False, "status": f"unavailable: {res['reason']}", "reason": res["reason"],
                "onnxruntime": None, "outputs": {}}
        return [dict(gone) for _ in range(n_sections)]
    n = res["samples"]
    runs = res["models"]
    onnx_runs, ort_runs = runs[: len(paths)], runs[len(paths):]
    x86 = [{k: list(v)[:n] for k, v in out.items()} for out in x86_outputs]

    def vs_x86(run: Mapping[str, Any], ref: Mapping[str, Sequence[Any]]) -> dict[str, Any]:
        if "error" in run:
            return {}
        return {name: compare_arm64_x86(run["outputs"][name], ref[name])
                for name in ref if name in run["outputs"]}

    base = {
        "available": True,
        "status": "ok",
        "onnxruntime": res["onnxruntime"],
        "runtime": {"machine": res["machine"], "python": res["python"], "numpy": res["numpy"],
                    "qemu": res["qemu"], "opt_level": opt_level},
        "samples": n,
        "note": "outputs computed by onnxruntime's ARM64 CPU kernels under qemu-user emulation; "
                "emulated times are not latency and are not reported as such",
        "emulation_wall_s": res["emulation_wall_s"],
    }
    orig_vs = vs_x86(onnx_runs[0], x86[0])
    ort_iter = iter(ort_runs)
    ort_results: list[dict[str, Any] | None] = []
    for j, p in enumerate(ort_list):
        if p is None:
            ort_results.append(None)
            continue
        run = next(ort_iter)
        ort_results.append({"path": os.path.basename(os.fspath(p)), "error": run["error"]} if "error" in run
                           else {"path": os.path.basename(os.fspath(p)), "arm64_vs_x86": vs_x86(run, x86[j])})

    sections = []
    for j in range(n_sections):
        sec = dict(base)
        model_runs = [onnx_runs[0]] + ([onnx_runs[j + 1]] if compressed else [])
        sec["models"] = [
            {"path": r["path"], "role": "original" if i == 0 else "compressed", "ran": "error" not in r,
             **({"error": r["error"]} if "error" in r else {})}
            for i, r in enumerate(model_runs)
        ]
        outputs: dict[str, dict[str, Any]] = {}
        for name in x86[0]:
            entry: dict[str, Any] = {"arm64_vs_x86": {"original": orig_vs.get(name)}}
            if compressed:
                comp = onnx_runs[j + 1]
                entry["arm64_vs_x86"]["compressed"] = vs_x86(comp, x86[j + 1]).get(name)
                if "error" not in onnx_runs[0] and "error" not in comp and name in comp["outputs"] \
                        and name in onnx_runs[0]["outputs"]:
                    entry["compressed_vs_original"] = output_metrics(
                        onnx_runs[0]["outputs"][name], comp["outputs"][name], name=name
                    )
            outputs[name] = entry
        sec["outputs"] = outputs
        if ort_list:
            sec["ort_format"] = {"original": ort_results[0]}
            if compressed:
                sec["ort_format"]["compressed"] = ort_results[j + 1] if j + 1 < len(ort_results) else None
        sections.append(sec)
    return sections


def section_failures(section: Mapping[str, Any]) -> list[str]:
    """Failed checks of one ``"arm64"`` section (a model that does not run on ARM64, or outputs
    that differ from x86 beyond :data:`ARM64_TOLERANCE`). An unavailable runtime is not a failure."""
    if not section.get("available"):
        return []
    out = []
    for m in section.get("models", []):
        if not m["ran"]:
            out.append(f"{m['path']}: does not run on ARM64 onnxruntime {section['onnxruntime']}: {m.get('error')}")
    for name, entry in section.get("outputs", {}).items():
        for role, cmp in entry.get("arm64_vs_x86", {}).items():
            if cmp is not None and not cmp.get("match", True):
                out.append(f"{role} model, output {name!r}: ARM64 differs from x86 (max abs {cmp.get('max_abs', float('nan')):.3g}"
                           f" > tolerance)")
    for role, r in (section.get("ort_format") or {}).items():
        if r is None:
            continue
        if "error" in r:
            out.append(f"{role} model's .ort file does not run on ARM64 onnxruntime {section['onnxruntime']}: {r['error']}")
        else:
            for name, cmp in r["arm64_vs_x86"].items():
                if not cmp.get("match", True):
                    out.append(f"{role} model's .ort file, output {name!r}: ARM64 differs from x86 "
                               f"(max abs {cmp.get('max_abs', float('nan')):.3g})")
    return out
