"""The systems `ragfan bench` compares, over the same retrievers and data.

- `sequential`: in-process, one retriever after another.
- `threadpool`: the design ragfan replaces, written faithfully: one process, a shared
  `ThreadPoolExecutor(4)`, `asyncio.gather` over `run_in_executor` calls with
  `return_exceptions=True`, and one SentenceTransformer shared by every dense retriever.
- `compute-limit`: the same retrieval work in-process in large batches, with no serving at all:
  what this machine can compute, the ceiling for the served systems.

The served systems (`ragfan-handle`, `ragfan-http`) are the real app; see bench.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from actors.base import Retriever
from actors.data import read_documents
from actors.dense import DenseRetriever
from actors.embedder import SentenceTransformerEmbedder
from actors.index import verify
from actors.keyword import KeywordRetriever
from actors.synthetic import SyntheticRetriever
from actors.types import Query
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
        chunk = [Query(q, TOP_K) for q in queries[start : start + batch]]
        answers = {n: r.search(chunk) for n, r in retrievers.items()}
        for i in range(len(chunk)):
            _fused({n: a[i] for n, a in answers.items()})
    return len(queries), time.perf_counter() - started
