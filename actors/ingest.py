"""`ragfan ingest`: read a collection, embed it across the Ray cluster, write checked index artifacts.

Embedding is the expensive part, so it is spread over a pool of Ray actors, each loading the model
once and encoding shards of a few hundred chunks. More CPUs, more nodes or a GPU (one actor per
GPU) make it faster with no change here. The artifacts of each kind go to `<out>/<kind>/`, a
symlink to the version written last (`index.swap_in`): a rebuild writes a new version, complete
and checked, then replaces the link in one atomic rename, so a reader never finds the path missing
and a crash leaves the old version in place. A second run on an unchanged source with the same
settings reuses what is there.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from actors.data import read_aliases, read_triples
from actors.dense import DenseRetriever, IndexType, make_index
from actors.embedder import DEFAULT_MODEL, SharedEncoderVectors, resolve_model
from actors.errors import DataError
from actors.index import FORMAT_VERSION, MANIFEST, swap_in, verify
from actors.keyword import KeywordRetriever
from actors.shards import shard_dir, shard_of
from actors.sources import chunk, read_source, source_sha256
from actors.types import Document

KINDS = ("dense", "keyword", "graph")
SHARD = 256


@dataclass
class KindReport:
    kind: str
    path: Path
    reused: bool
    num_docs: int
    seconds: float
    docs_per_s: float | None = None


def _embedder_actor():
    import ray

    @ray.remote
    class EmbedWorker:
        def __init__(self, model: str, threads: int) -> None:
            from actors.embedder import SentenceTransformerEmbedder, limit_threads

            limit_threads(threads)
            self.embedder = SentenceTransformerEmbedder(model)

        def encode(self, start: int, texts: list[str]) -> tuple[int, np.ndarray]:
            return start, self.embedder.encode(texts, batch_size=64)

    return EmbedWorker


class EmbedPool:
    """A pool of Ray actors that embed texts: one per free GPU if there are any, else one per free CPU.

    Each actor takes one CPU (and one GPU), loads the model once and runs torch on one thread, so
    the pool uses what the cluster has free without oversubscribing it. Texts go out in shards of
    a few hundred, two in flight per actor. `ragfan ingest` and `ragfan serve` (for what the index
    cache lacks) both embed through it. Close it to give the actors' memory back.
    """

    def __init__(self, model: str, *, progress: bool = True, workers: int | None = None) -> None:
        import ray

        if not ray.is_initialized():
            ray.init(include_dashboard=False, log_to_driver=False)
        self.model = model
        self.progress = progress
        free = ray.available_resources()
        gpus = int(free.get("GPU", 0))
        self.max_workers = max(1, workers or gpus or int(free.get("CPU", 1)))
        self._options = {"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": 1}
        self._pool: list[Any] = []

    def encode(self, texts: Sequence[str], desc: str = "embedding") -> np.ndarray:
        import ray

        wanted = min(self.max_workers, math.ceil(len(texts) / SHARD))
        while len(self._pool) < wanted:  # started on first need, kept for the next call
            self._pool.append(_embedder_actor().options(**self._options).remote(self.model, 1))
        pool = self._pool[:wanted] if wanted else self._pool[:1]
        out: np.ndarray | None = None
        pending: dict[Any, int] = {}
        shards = [(s, list(texts[s : s + SHARD])) for s in range(0, len(texts), SHARD)]
        started = time.perf_counter()
        with tqdm(total=len(texts), desc=desc, unit="doc", disable=not self.progress, smoothing=0.1) as bar:
            for i, actor in enumerate(pool):  # two shards in flight per actor keeps each one busy
                for _ in range(2):
                    if shards:
                        s, batch = shards.pop(0)
                        pending[actor.encode.remote(s, batch)] = i
            while pending:
                [ready], _ = ray.wait(list(pending), num_returns=1)
                i = pending.pop(ready)
                start, vectors = ray.get(ready)
                if out is None:
                    out = np.zeros((len(texts), vectors.shape[1]), dtype=np.float32)
                out[start : start + len(vectors)] = vectors
                bar.update(len(vectors))
                bar.set_postfix(docs_per_s=f"{bar.n / (time.perf_counter() - started):.0f}")
                if shards:
                    s, batch = shards.pop(0)
                    pending[pool[i].encode.remote(s, batch)] = i
        if out is None:
            raise DataError(f"{desc}: nothing to embed")
        return out

    def close(self) -> None:
        import ray

        for actor in self._pool:
            ray.kill(actor)
        self._pool = []


def embed_on_cluster(
    texts: Sequence[str], model: str, *, progress: bool = True, workers: int | None = None
) -> np.ndarray:
    """Encode texts with a pool of Ray actors (see EmbedPool), started and stopped for this call."""
    pool = EmbedPool(model, progress=progress, workers=workers)
    try:
        return pool.encode(texts)
    finally:
        pool.close()


def _settings_match(directory: Path, wanted: dict[str, Any]) -> bool:
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        return False
    manifest = json.loads(manifest_path.read_text())
    return all(manifest.get(key) == value for key, value in wanted.items())


def ingest(
    source: Path,
    out: Path,
    *,
    kinds: Sequence[str] = ("dense", "keyword"),
    model: str = DEFAULT_MODEL,
    index_type: IndexType = "flat",
    text_field: str = "text",
    max_words: int = 256,
    overlap: int = 32,
    triples: Path | None = None,
    aliases: Path | None = None,
    progress: bool = True,
    shards: int = 1,
) -> list[KindReport]:
    """Build (or reuse) one artifact directory per kind under `out`. Needs `ray.init()` for dense.

    With `shards` > 1 the dense index is split by document into `out/dense/shard-i-of-N/`, one
    complete artifact directory per shard (see actors/shards.py).
    """
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown kind(s) {', '.join(unknown)}; valid: {', '.join(KINDS)}")
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    reports = []
    docs: list[Document] | None = None
    doc_kinds = [k for k in kinds if k != "graph"]
    if doc_kinds:
        checksum = source_sha256(source)
        chunking = {"max_words": max_words, "overlap": overlap, "text_field": text_field}
    jobs = [
        (kind, shard)
        for kind in doc_kinds
        for shard in ([(i, shards) for i in range(shards)] if kind == "dense" and shards > 1 else [None])
    ]
    for kind, shard in jobs:
        wanted: dict[str, Any] = {"format_version": FORMAT_VERSION, "kind": kind, "source_sha256": checksum, **chunking}
        if kind == "dense":
            wanted.update(model=resolve_model(model)[0], index_type=index_type)
        target = out / kind
        if shard is not None:
            wanted["shard"] = list(shard)
            target = shard_dir(target, *shard)
        started = time.perf_counter()
        if _settings_match(target, wanted):
            manifest = verify(target)
            reports.append(KindReport(kind, target, True, manifest["num_docs"], time.perf_counter() - started))
            continue
        if docs is None:
            docs = list(chunk(read_source(source, text_field=text_field), max_words=max_words, overlap=overlap))
            if not docs:
                raise DataError(f"{source}: no documents to ingest")
        extra = {"source": str(source), **wanted}
        part = docs if shard is None else [d for d in docs if shard_of(d.doc_id, shard[1]) == shard[0]]
        if shard is not None and not part:
            raise DataError(f"{source}: shard {shard[0]} of {shard[1]} would hold no documents; use fewer shards")
        target.parent.mkdir(parents=True, exist_ok=True)
        swap_in(target, build=partial(_build, kind, part, extra, model=model, index_type=index_type, progress=progress))
        manifest = verify(target)
        reports.append(KindReport(
            kind, target, False, manifest["num_docs"], time.perf_counter() - started, manifest.get("embed_docs_per_s")
        ))
    if "graph" in kinds:
        reports.append(_ingest_graph(triples or source, aliases, out / "graph", model))
    return reports


def _build(
    kind: str, docs: list[Document], extra: dict[str, Any], directory: Path, *, model: str, index_type: IndexType,
    progress: bool,
) -> dict[str, Any]:
    if kind == "keyword":
        return {**KeywordRetriever(name=kind, documents=docs).save(directory), **extra}
    started = time.perf_counter()
    vectors = embed_on_cluster([d.text for d in docs], model, progress=progress)
    rate = len(docs) / (time.perf_counter() - started)
    dense = DenseRetriever(
        name=kind,
        documents=docs,
        index=make_index(vectors, index_type),
        embedder=SharedEncoderVectors(resolve_model(model)[0], vectors.shape[1]),
        index_type=index_type,
    )
    return {**dense.save(directory), **extra, "embed_docs_per_s": round(rate, 1)}


def _ingest_graph(triples: Path, aliases: Path | None, target: Path, model: str) -> KindReport:
    started = time.perf_counter()
    wanted = {
        "format_version": FORMAT_VERSION,
        "kind": "graph",
        "source_sha256": source_sha256(triples) + (source_sha256(aliases) if aliases else ""),
        "model": resolve_model(model)[0],
    }
    if _settings_match(target, wanted):
        manifest = verify(target)
        return KindReport("graph", target, True, manifest["num_docs"], time.perf_counter() - started)
    facts = read_triples(triples)
    alias_map = read_aliases(aliases)

    def build(directory: Path) -> dict[str, Any]:
        with (directory / "triples.jsonl").open("w", encoding="utf-8") as fh:
            for t in facts:
                fh.write(json.dumps({"head": t.head, "relation": t.relation, "tail": t.tail,
                                     "doc_id": t.doc_id, "text": t.text}) + "\n")
        (directory / "aliases.json").write_text(json.dumps(alias_map, indent=1))
        return {**wanted, "num_docs": len(facts), "source": str(triples)}

    swap_in(target, build=build)
    return KindReport("graph", target, False, len(facts), time.perf_counter() - started)
