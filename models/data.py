"""Evaluation data for the real models, all of it from package wheels (no hub, no internet).

* Word and document similarity (MiniLM): gensim's test data -- ``wordsim353.tsv``,
  ``simlex999.txt``, ``lee.cor`` + ``similarities0-1.txt`` (Lee et al. 2005, 50 news documents
  with averaged human similarity ratings) and ``lee_background.cor`` (300 news documents, split
  into sentences for the held-out embedding-cosine check). gensim itself is never imported: its
  wheel is fetched once with ``pip download --no-deps gensim`` (the ordinary PyPI client) and
  the files are read from the zip, then cached under ``<cache>/data/gensim/``.
* Photos (EfficientNet): ``china.jpg`` and ``flower.jpg`` bundled with scikit-learn and the
  photographs bundled with scikit-image (read from the wheel's files, never via its downloader),
  cut into deterministic square crops at several scales and resized to the network's input size.

The cache root is ``~/.cache/onnx-lowrank`` (``ONNX_LOWRANK_CACHE`` overrides it).
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "DataError",
    "cache_root",
    "gensim_test_file",
    "word_pairs",
    "lee_documents",
    "heldout_sentences",
    "photo_crops",
    "PHOTO_SOURCES",
]

logger = logging.getLogger(__name__)

#: gensim release whose test data we read; pinned so the evaluation sets never change under us.
GENSIM_VERSION = "4.4.0"
_GENSIM_FILES = (
    "wordsim353.tsv",
    "simlex999.txt",
    "lee.cor",
    "lee_background.cor",
    "similarities0-1.txt",
    "pang_lee_polarity.cor",
)


class DataError(RuntimeError):
    """Evaluation data cannot be obtained; the message says what to install or fetch."""


def cache_root() -> Path:
    """``$ONNX_LOWRANK_CACHE`` or ``~/.cache/onnx-lowrank``."""
    env = os.environ.get("ONNX_LOWRANK_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "onnx-lowrank"


# --------------------------------------------------------------------------------------------
# gensim test data
# --------------------------------------------------------------------------------------------


def _gensim_dir() -> Path:
    return cache_root() / "data" / "gensim"


def _fetch_gensim_wheel(target: Path) -> Path:
    """Download gensim's wheel (no dependencies) with pip into ``target``; return the file."""
    wheel_env = os.environ.get("ONNX_LOWRANK_GENSIM_WHEEL")
    if wheel_env:
        return Path(wheel_env)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(target), f"gensim=={GENSIM_VERSION}"]
    logger.info("fetching gensim's test data: %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise DataError(
            f"cannot download the gensim {GENSIM_VERSION} wheel for its test data "
            f"(pip: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}); "
            "set ONNX_LOWRANK_GENSIM_WHEEL to a local gensim wheel"
        )
    wheels = sorted(target.glob("gensim-*.whl"))
    if not wheels:
        raise DataError(f"pip download of gensim left no wheel in {target}")
    return wheels[0]


def _extract_gensim_data() -> None:
    out = _gensim_dir()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="onnx-lowrank-gensim-") as tmp:
        wheel = _fetch_gensim_wheel(Path(tmp))
        with zipfile.ZipFile(wheel) as zf:
            names = set(zf.namelist())
            for fname in _GENSIM_FILES:
                member = f"gensim/test/test_data/{fname}"
                if member not in names:
                    logger.warning("%s is not in %s", member, wheel.name)
                    continue
                data = zf.read(member)
                part = out / f".{fname}.part"
                part.write_bytes(data)
                os.replace(part, out / fname)


def gensim_test_file(name: str) -> Path:
    """Path of one of gensim's test-data files, fetching the wheel once if needed."""
    path = _gensim_dir() / name
    if not path.exists():
        _extract_gensim_data()
    if not path.exists():
        raise DataError(f"{name} is not in gensim {GENSIM_VERSION}'s test data")
    return path


@dataclass(frozen=True)
class WordPairs:
    """Word pairs with human similarity scores."""

    name: str
    first: list[str]
    second: list[str]
    scores: np.ndarray

    @property
    def vocabulary(self) -> list[str]:
        return sorted(set(self.first) | set(self.second))


def word_pairs(name: str) -> WordPairs:
    """``"wordsim353"`` (353 pairs, 0-10 relatedness) or ``"simlex999"`` (999 pairs, 0-10 similarity)."""
    if name == "wordsim353":
        text = gensim_test_file("wordsim353.tsv").read_text(encoding="utf-8")
        rows = [r for r in csv.reader(io.StringIO(text), delimiter="\t") if r and not r[0].startswith("#")]
    elif name == "simlex999":
        text = gensim_test_file("simlex999.txt").read_text(encoding="utf-8")
        rows = [r for r in csv.reader(io.StringIO(text), delimiter="\t") if r and not r[0].startswith("#")]
    else:
        raise ValueError(f"unknown word-pair set {name!r}; use wordsim353 or simlex999")
    first, second, scores = [], [], []
    for r in rows:
        try:
            score = float(r[2])
        except (IndexError, ValueError):
            continue  # a header line
        first.append(r[0].strip().lower())
        second.append(r[1].strip().lower())
        scores.append(score)
    return WordPairs(name, first, second, np.asarray(scores, dtype=np.float64))


def lee_documents() -> tuple[list[str], np.ndarray]:
    """The 50 Lee documents and their 50 x 50 matrix of mean human similarity ratings (0-1)."""
    docs = [line.strip() for line in gensim_test_file("lee.cor").read_text(encoding="latin-1").splitlines()
            if line.strip()]
    sims = np.loadtxt(gensim_test_file("similarities0-1.txt"))
    if sims.shape != (len(docs), len(docs)):
        raise DataError(f"lee.cor has {len(docs)} documents but similarities0-1.txt is {sims.shape}")
    return docs, sims


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")


def heldout_sentences(count: int = 200, *, min_words: int = 6, max_words: int = 40) -> list[str]:
    """Deterministic sentences of ``lee_background.cor`` (news, disjoint from the Lee-50 set).

    Every k-th sentence of the corpus with ``min_words..max_words`` words, so the set spans the
    whole corpus rather than its first documents.
    """
    text = gensim_test_file("lee_background.cor").read_text(encoding="latin-1")
    sentences: list[str] = []
    for doc in text.splitlines():
        for s in _SENTENCE_END.split(doc.strip()):
            if min_words <= len(s.split()) <= max_words:
                sentences.append(s.strip())
    if len(sentences) <= count:
        return sentences
    step = len(sentences) / count
    return [sentences[int(i * step)] for i in range(count)]


# --------------------------------------------------------------------------------------------
# photos
# --------------------------------------------------------------------------------------------

#: Natural photographs shipped inside wheels: (package, file). Microscopy/astronomy/texture
#: images are included on purpose: they are real photos out of ImageNet's classes, where a
#: classifier's ranking is fragile, so they are a harsh test of agreement.
PHOTO_SOURCES: tuple[tuple[str, str], ...] = (
    ("sklearn", "china.jpg"),
    ("sklearn", "flower.jpg"),
    ("skimage", "astronaut.png"),
    ("skimage", "chelsea.png"),
    ("skimage", "coffee.png"),
    ("skimage", "rocket.jpg"),
    ("skimage", "motorcycle_left.png"),
    ("skimage", "camera.png"),
    ("skimage", "hubble_deep_field.jpg"),
    ("skimage", "retina.jpg"),
    ("skimage", "brick.png"),
    ("skimage", "grass.png"),
    ("skimage", "coins.png"),
    ("skimage", "ihc.png"),
)


def _photo_path(package: str, fname: str) -> Path:
    if package == "sklearn":
        import sklearn.datasets

        return Path(sklearn.datasets.__file__).parent / "images" / fname
    import skimage.data

    return Path(skimage.data.__file__).parent / fname


def _read_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def photo_crops(
    size: int = 224, *, per_image: int = 6, sources: tuple[tuple[str, str], ...] = PHOTO_SOURCES
) -> tuple[np.ndarray, list[str]]:
    """Square crops of the bundled photos, resized to ``size`` x ``size``.

    Each photo gives ``per_image`` crops: the full centre square, then squares of 70% and 50%
    of the short side at fixed positions (centre, corners). Resizing uses Pillow's bicubic
    filter, as the classifiers' reference preprocessing does.

    Returns
    -------
    images : ndarray, uint8, shape (N, size, size, 3)
    labels : list of str
        ``"<file>#<crop>"`` for each image.
    """
    from PIL import Image

    # (scale of the short side, horizontal position, vertical position), positions in [0, 1]
    layout = [(1.0, 0.5, 0.5), (0.7, 0.5, 0.5), (0.7, 0.0, 0.0), (0.7, 1.0, 1.0),
              (0.5, 0.25, 0.75), (0.5, 0.75, 0.25), (0.5, 0.5, 0.5), (0.7, 1.0, 0.0)]
    if per_image > len(layout):
        raise ValueError(f"per_image must be <= {len(layout)}")
    images, labels = [], []
    for package, fname in sources:
        path = _photo_path(package, fname)
        if not path.exists():
            logger.warning("photo %s not found in %s; skipped", fname, package)
            continue
        rgb = _read_rgb(path)
        h, w, _ = rgb.shape
        short = min(h, w)
        for k, (scale, px, py) in enumerate(layout[:per_image]):
            side = int(round(short * scale))
            x0 = int(round((w - side) * px))
            y0 = int(round((h - side) * py))
            crop = Image.fromarray(rgb[y0 : y0 + side, x0 : x0 + side])
            images.append(np.asarray(crop.resize((size, size), Image.BICUBIC), dtype=np.uint8))
            labels.append(f"{fname}#{k}")
    if not images:
        raise DataError("no bundled photos found: install scikit-learn and scikit-image")
    return np.stack(images), labels
