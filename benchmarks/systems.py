"""The systems `ragfan bench` compares, over the same retrievers and data.

- `sequential`: in-process, one retriever after another.
- `threadpool`: the design ragfan replaces, written faithfully: one process, a shared
  `ThreadPoolExecutor(4)`, `asyncio.gather` over `run_in_executor` calls with
  `return_exceptions=True`, and one SentenceTransformer shared by every dense retriever.
- `compute-limit`: the least work that answers the same queries, in-process in batches of 256
  with no serving at all: each query encoded once per distinct model (its vector handed to every
  retriever of that model), each index searched, the answers fused. What this machine can
  compute: the ceiling for the served systems. bench.py runs it once per encoder backend that
  ragfan ships (the retrievers' own torch model, then `onnx_encoders`) and keeps the faster, so
  that a ratio to it measures serving overhead, not a slower encoder; `sequential` and
  `threadpool` keep the shared torch model, as the old design had it.

The served systems (`ragfan-handle`, `ragfan-http`) are the real app; see bench.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

from actors.base import Retriever
from actors.data import read_aliases, read_documents, read_triples
from actors.dense import DenseRetriever
from actors.embedder import DEFAULT_MODEL, DEFAULT_MODEL_NAME, Embedder, SentenceTransformerEmbedder, make_embedder
from actors.graph import GraphRetriever
from actors.index import verify
from actors.keyword import KeywordRetriever
from actors.synthetic import SyntheticRetriever
from actors.types import Query
from serve_app.config import AppConfig, RetrieverConfig
from serve_app.fusion import fuse

# The old design's measured profile: graph 300 ms, corpus 200 ms, persona 200 ms, domain 150 ms.
SEED_PROFILE_MS = {"graph": 300, "corpus": 200, "persona": 200, "domain": 150}
TOP_K = 10


def seed_retrievers(corpus: Path) -> dict[str, Retriever]:
    docs = read_documents(corpus)
    return {name: SyntheticRetriever(name=name, documents=docs, delay_ms=ms) for name, ms in SEED_PROFILE_MS.items()}


def dataset_retrievers(artifacts: Path) -> dict[str, Retriever]:
    """dense, keyword and a second dense retriever, in one process with one shared model."""
    shared = SentenceTransformerEmbedder()  # the old design: one SentenceTransformer for all
    dense_dir, keyword_dir = artifacts / "dense", artifacts / "keyword"
    dense_manifest = verify(dense_dir)
    return {
        "dense": DenseRetriever.load(dense_dir, dense_manifest, name="dense", embedder=shared),
        "keyword": KeywordRetriever.load(keyword_dir, verify(keyword_dir), name="keyword"),
        "dense2": DenseRetriever.load(dense_dir, dense_manifest, name="dense2", embedder=shared),
    }


def demo_retrievers(config: AppConfig) -> dict[str, Retriever]:
    """The config's retrievers (the embedded default's five) in one process, from their `data`.

    As in the old design, retrievers on the same model share one SentenceTransformer.
    """
    models: dict[str, SentenceTransformerEmbedder] = {}

    def embedder(model: str) -> SentenceTransformerEmbedder:
        if model not in models:
            models[model] = SentenceTransformerEmbedder(model)
        return models[model]

    return {r.name: _build(r, embedder) for r in config.retrievers}


def _build(r: RetrieverConfig, embedder: Callable[[str], SentenceTransformerEmbedder]) -> Retriever:
    if r.kind == "dense":
        docs = read_documents(r.data, text_field=r.text_field)
        return DenseRetriever.from_documents(name=r.name, documents=docs, embedder=embedder(r.model),
                                             index_type=r.index, progress=True)
    if r.kind == "keyword":
        return KeywordRetriever(name=r.name, documents=read_documents(r.data, text_field=r.text_field),
                                language=r.language)
    if r.kind == "graph":
        return GraphRetriever(name=r.name, triples=read_triples(r.data), aliases=read_aliases(r.aliases),
                              embedder=embedder(r.model), hops=r.hops)
    raise ValueError(f"{r.name}: kind {r.kind!r} is not built in process here; valid kinds: dense, keyword, graph")


def _fused(results: Mapping[str, list]) -> list:
    return fuse(results, method="minmax", top_k=TOP_K)


class Sequential:
    name = "sequential"

    def __init__(self, retrievers: Mapping[str, Retriever]) -> None:
        self.retrievers = retrievers

    def search(self, text: str) -> list:
        return _fused({n: r.search([Query(text, TOP_K)])[0] for n, r in self.retrievers.items()})


class ThreadPoolManager:
    """The in-process RAG manager: four worker threads shared by every request."""

    name = "threadpool"

    def __init__(self, retrievers: Mapping[str, Retriever], workers: int = 4) -> None:
        self.retrievers = retrievers
        self.pool = ThreadPoolExecutor(max_workers=workers)

    async def search(self, text: str) -> list:
        loop = asyncio.get_running_loop()
        names = list(self.retrievers)
        answers = await asyncio.gather(
            *(loop.run_in_executor(self.pool, self.retrievers[n].search, [Query(text, TOP_K)]) for n in names),
            return_exceptions=True,
        )
        return _fused({n: a[0] for n, a in zip(names, answers, strict=True) if not isinstance(a, BaseException)})

    def close(self) -> None:
        self.pool.shutdown()


class ComputeLimitRun(NamedTuple):
    queries: int
    seconds: float
    encode_seconds: float  # of `seconds`, the time spent encoding queries


def compute_limit(
    retrievers: Mapping[str, Retriever], queries: Sequence[str], *, batch: int = 256,
    encoders: Mapping[int, Embedder] | None = None,
) -> ComputeLimitRun:
    """Every query through every retriever in batches of `batch`, then fused.

    `encoders` replaces a retriever's own embedder (keyed by its `id()`) with another of the same
    model for the query encoding (`onnx_encoders`); the retrieval work is the same either way, since
    every retriever then searches with the vectors it is handed.
    """
    started = time.perf_counter()
    encoding = 0.0
    for start in range(0, len(queries), batch):
        texts = queries[start : start + batch]
        chunks, seconds = _encoded_once(retrievers, texts, encoders or {})
        encoding += seconds
        answers = {n: r.search(chunks[n]) for n, r in retrievers.items()}
        for i in range(len(texts)):
            _fused({n: a[i] for n, a in answers.items()})
    return ComputeLimitRun(len(queries), time.perf_counter() - started, encoding)


def onnx_encoders(retrievers: Mapping[str, Retriever], *, threads: int | None = None) -> dict[int, Embedder]:
    """An ONNX embedder of the same model for each distinct embedder the retrievers hold, by its `id()`.

    `threads` is onnxruntime's pool; by default torch's in this process (its default: one per core),
    so that both backends encode on the same CPUs. The export is made once per model and cached.
    """
    if threads is None:
        import torch

        threads = torch.get_num_threads()
    embedders = {id(e): e for r in retrievers.values() if (e := getattr(r, "embedder", None)) is not None}
    return {key: make_embedder(_model_of(e), backend="onnx", threads=threads, device="cpu")
            for key, e in embedders.items()}


def _model_of(embedder: Embedder) -> str:
    """The configured model behind an embedder's display name: `resolve_model` in reverse."""
    return DEFAULT_MODEL if embedder.name == DEFAULT_MODEL_NAME else embedder.name


def _encoded_once(
    retrievers: Mapping[str, Retriever], texts: Sequence[str], encoders: Mapping[int, Embedder]
) -> tuple[dict[str, list[Query]], float]:
    """Each retriever's batch, with one encode per distinct embedder, and the seconds spent encoding.

    Retrievers that share an embedder object (one model) get the same vectors, carried in
    `Query.vector`, so none of them encodes again; those with none (keyword) get the bare text.
    """
    plain = [Query(t, TOP_K) for t in texts]
    encoded: dict[int, list[Query]] = {}  # by id(): an embedder need not be hashable
    batches = {}
    seconds = 0.0
    for name, retriever in retrievers.items():
        embedder = getattr(retriever, "embedder", None)
        if embedder is not None and id(embedder) not in encoded:
            started = time.perf_counter()
            vectors = encoders.get(id(embedder), embedder).encode(texts)
            seconds += time.perf_counter() - started
            encoded[id(embedder)] = [Query(t, TOP_K, vector=v) for t, v in zip(texts, vectors, strict=True)]
        batches[name] = plain if embedder is None else encoded[id(embedder)]
    return batches, seconds
