"""The systems `ragfan bench` compares, over the same retrievers and data.

- `sequential`: in-process, one retriever after another.
- `threadpool`: the design ragfan replaces, written faithfully: one process, a shared
  `ThreadPoolExecutor(4)`, `asyncio.gather` over `run_in_executor` calls with
  `return_exceptions=True`, and one SentenceTransformer shared by every dense retriever.
- `compute-limit`: the least work that answers the same queries, in-process in batches of 256
  with no serving at all: each query encoded once per distinct model (its vector handed to every
  retriever of that model), each index searched, the answers fused. What this machine can
  compute: the ceiling for the served systems.

The served systems (`ragfan-handle`, `ragfan-http`) are the real app; see bench.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from actors.base import Retriever
from actors.data import read_aliases, read_documents, read_triples
from actors.dense import DenseRetriever
from actors.embedder import SentenceTransformerEmbedder
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


def compute_limit(
    retrievers: Mapping[str, Retriever], queries: Sequence[str], *, batch: int = 256
) -> tuple[int, float]:
    """Every query through every retriever in batches of `batch`, then fused; returns (n, seconds)."""
    started = time.perf_counter()
    for start in range(0, len(queries), batch):
        texts = queries[start : start + batch]
        chunks = _encoded_once(retrievers, texts)
        answers = {n: r.search(chunks[n]) for n, r in retrievers.items()}
        for i in range(len(texts)):
            _fused({n: a[i] for n, a in answers.items()})
    return len(queries), time.perf_counter() - started


def _encoded_once(retrievers: Mapping[str, Retriever], texts: Sequence[str]) -> dict[str, list[Query]]:
    """Each retriever's batch, with one encode per distinct embedder.

    Retrievers that share an embedder object (one model) get the same vectors, carried in
    `Query.vector`, so none of them encodes again; those with none (keyword) get the bare text.
    """
    plain = [Query(t, TOP_K) for t in texts]
    encoded: dict[int, list[Query]] = {}  # by id(): an embedder need not be hashable
    batches = {}
    for name, retriever in retrievers.items():
        embedder = getattr(retriever, "embedder", None)
        if embedder is not None and id(embedder) not in encoded:
            vectors = embedder.encode(texts)
            encoded[id(embedder)] = [Query(t, TOP_K, vector=v) for t, v in zip(texts, vectors, strict=True)]
        batches[name] = plain if embedder is None else encoded[id(embedder)]
    return batches
