"""`ragfan ingest`: read a collection, embed it across the Ray cluster, write checked index artifacts.

Embedding is the expensive part, so it is spread over a pool of Ray actors, each loading the model
once and encoding shards of a few hundred chunks. More CPUs, more nodes or a GPU (one actor per
GPU) make it faster with no change here. The artifacts of each kind go to `<out>/<kind>/`, a
symlink to the version written last (`index.swap_in`): a rebuild writes a new version, complete
and checked, then replaces the link in one atomic rename, so a reader never finds the path missing
and a crash leaves the old version in place. A second run on an unchanged source with the same
settings reuses what is there.

A run on a changed source is incremental. Each version keeps the sha256 of every chunk's text
(`hashes.json`, in index order, checksummed by the manifest like every file). The next run cuts
the new source into chunks, matches them to the current version's by chunk id and text hash, and
embeds only the chunks that are new or whose text changed; the others take their stored vectors
back from the current index (`reconstruct_n`, exact for flat and HNSW-flat). Chunks of documents
that are gone are dropped. The index (flat or HNSW), the BM25 matrices and the document store are
then rebuilt whole from the new chunks and swapped in as a new version, as a full build is: the
same chunks in the same order, with the vectors a full rebuild would embed (up to the last bits
that a text's vector may differ by between batches, 1e-7 on SciFact). An incremental build needs
the same model, text field, chunking and index type as the current version; otherwise, or with
`full=True` (`ragfan ingest --full`), everything is embedded again, and the run says why. The
manifest and the report count the chunks `added`, `changed`, `removed` and `reused` (taken over
unchanged).
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal, Protocol

import faiss
import numpy as np
from tqdm.auto import tqdm

from actors.data import read_aliases, read_triples
from actors.dense import DenseRetriever, IndexType, make_index
from actors.docstore import DocStore
from actors.embedder import DEFAULT_MODEL, SharedEncoderVectors, resolve_model
from actors.errors import DataError, RagError
from actors.index import FORMAT_VERSION, MANIFEST, swap_in, verify
from actors.keyword import KeywordRetriever
from actors.shards import shard_dir, shard_of
from actors.sources import chunk, read_source, source_sha256
from actors.types import Document

KINDS = ("dense", "keyword", "graph")
SHARD = 256
MIN_CPUS = 0.01  # the least share of a CPU an embedding actor runs on: below it, the cluster has none free
HASHES = "hashes.json"  # the sha256 of each chunk's text, in index order: what the next run compares with
Mode = Literal["reused", "incremental", "full"]


@dataclass(frozen=True, slots=True)
class ChunkCounts:
    """How the chunks of a version differ from the version before, matched by chunk id and text hash.

    `reused`: unchanged chunks, whose vectors were taken over (a keyword index is rebuilt whole from
    all of them anyway). A full build counts every chunk as added.
    """

    added: int = 0
    changed: int = 0
    removed: int = 0
    reused: int = 0


@dataclass
class KindReport:
    kind: str
    path: Path
    reused: bool  # the version found was kept as it is: the source and settings are unchanged
    num_docs: int
    seconds: float
    docs_per_s: float | None = None
    mode: Mode = "full"
    chunks: ChunkCounts = field(default_factory=ChunkCounts)
    embedded: int = 0  # texts embedded by this run (dense)
    note: str = ""  # why a version that was there was rebuilt in full


class Embed(Protocol):
    """What embeds the chunks' texts: `embed_on_cluster`, or a stand-in in tests."""

    def __call__(self, texts: Sequence[str], model: str, *, progress: bool) -> np.ndarray: ...


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
    the pool uses what the cluster has free without oversubscribing it. With less than one CPU
    free, one actor takes the share there is; with none, the pool refuses at once (an actor that
    asks for more than the cluster has free waits for it forever, with no word). Texts go out in
    shards of a few hundred, two in flight per actor. `ragfan ingest` and `ragfan serve` (for what
    the index cache lacks) both embed through it. Close it to give the actors' memory back.
    """

    def __init__(self, model: str, *, progress: bool = True, workers: int | None = None) -> None:
        import ray

        if not ray.is_initialized():
            ray.init(include_dashboard=False, log_to_driver=False)
        self.model = model
        self.progress = progress
        free = ray.available_resources()
        gpus = int(free.get("GPU", 0))
        cpus = math.floor(free.get("CPU", 0.0) * 100) / 100  # Ray takes fractions of a resource, to 1e-4
        if gpus:  # one actor per GPU, sharing the free CPUs
            self.max_workers = min(workers or gpus, gpus)
            self._options: dict[str, float] = {"num_gpus": 1, "num_cpus": min(1, cpus / self.max_workers)}
        elif cpus >= MIN_CPUS:
            self.max_workers = min(workers or max(1, int(cpus)), max(1, int(cpus)))
            self._options = {"num_cpus": min(1, cpus)}
        else:
            total = ray.cluster_resources().get("CPU", 0.0)
            raise RagError(
                f"embedding needs a CPU free on the Ray cluster; it has {total:g} CPUs and none is free: running "
                "actors hold them all (a ragfan app's replicas, say). Stop what holds them (`make serve`, "
                "`ragfan serve`), add a node, or run without --address so that ragfan starts a cluster of its own"
            )
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


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class Previous:
    """The version an incremental build starts from: its directory, chunk ids and text hashes, in index order."""

    directory: Path  # the version itself, not the link: a swap may replace the link while we read
    ids: list[str]
    hashes: list[str]


def previous_version(target: Path, wanted: dict[str, Any]) -> Previous | str | None:
    """The current version at `target` if an incremental build can start from it; else why not
    (a string, the message of a full rebuild), or None when there is no version yet."""
    if not (target / MANIFEST).is_file():
        return None
    directory = target.resolve()
    try:
        manifest = verify(directory)
    except DataError as exc:
        return f"the current version failed its check ({exc})"
    differs = [key for key in wanted if key != "source_sha256" and manifest.get(key) != wanted[key]]
    if differs:
        return "settings changed: " + ", ".join(f"{k} {manifest.get(k)!r} -> {wanted[k]!r}" for k in differs)
    if HASHES not in manifest.get("files", {}):
        return f"the current version has no {HASHES} (written by an older ragfan)"
    hashes = json.loads((directory / HASHES).read_text())
    ids = [d.doc_id for d in DocStore(directory)]
    if len(ids) != len(hashes) or len(ids) != manifest.get("num_docs"):
        return f"the current version holds {len(ids)} chunks but {len(hashes)} hashes"
    return Previous(directory, ids, hashes)


def diff(ids: Sequence[str], hashes: Sequence[str], previous: Previous) -> tuple[ChunkCounts, dict[int, int]]:
    """Counts, and for each chunk that is unchanged, the position of its vector in `previous`.

    A chunk is unchanged when the version before holds the same id with the same text hash; changed
    when it holds the id with other text; added when it lacks the id. Ids it holds that are no
    longer there are removed.
    """
    before = {key: pos for pos, key in enumerate(zip(previous.ids, previous.hashes, strict=True))}
    known = set(previous.ids)
    keep: dict[int, int] = {}
    added = changed = 0
    for pos, key in enumerate(zip(ids, hashes, strict=True)):
        if key in before:
            keep[pos] = before[key]
        elif key[0] in known:
            changed += 1
        else:
            added += 1
    removed = len(known - set(ids))
    return ChunkCounts(added=added, changed=changed, removed=removed, reused=len(keep)), keep


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
    full: bool = False,
    embed: Embed | None = None,
) -> list[KindReport]:
    """Build (or reuse) one artifact directory per kind under `out`. Needs `ray.init()` for dense.

    With `shards` > 1 the dense index is split by document into `out/dense/shard-i-of-N/`, one
    complete artifact directory per shard (see actors/shards.py), each updated incrementally on
    its own. `full` embeds everything again, even an unchanged source. `embed` replaces
    `embed_on_cluster` (tests pass one that needs no Ray).
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
        if not full and _settings_match(target, wanted):
            manifest = verify(target)
            reports.append(KindReport(kind, target, True, manifest["num_docs"], time.perf_counter() - started,
                                      mode="reused", chunks=ChunkCounts(reused=manifest["num_docs"])))
            continue
        label = kind if shard is None else f"{kind} shard {shard[0]} of {shard[1]}"
        previous = None if full else previous_version(target, wanted)
        note = "asked for (--full)" if full and (target / MANIFEST).is_file() else ""
        if isinstance(previous, str):
            note, previous = previous, None
        if note and progress:
            again = ", every chunk embedded again" if kind == "dense" else ""
            tqdm.write(f"{label}: full rebuild{again}: {note}", file=sys.stderr)
        if docs is None:
            docs = list(chunk(read_source(source, text_field=text_field), max_words=max_words, overlap=overlap))
            if not docs:
                raise DataError(f"{source}: no documents to ingest")
        extra = {"source": str(source), **wanted}
        part = docs if shard is None else [d for d in docs if shard_of(d.doc_id, shard[1]) == shard[0]]
        if shard is not None and not part:
            raise DataError(f"{source}: shard {shard[0]} of {shard[1]} would hold no documents; use fewer shards")
        target.parent.mkdir(parents=True, exist_ok=True)
        if note:
            extra["full_rebuild"] = note
        swap_in(target, build=partial(_build, kind, part, extra, previous=previous, model=model,
                                      index_type=index_type, progress=progress, embed=embed or embed_on_cluster))
        manifest = verify(target)
        reports.append(KindReport(
            kind, target, False, manifest["num_docs"], time.perf_counter() - started, manifest.get("embed_docs_per_s"),
            mode=manifest["build"], chunks=ChunkCounts(**manifest["chunks"]), embedded=manifest.get("embedded", 0),
            note=note,
        ))
    if "graph" in kinds:
        reports.append(_ingest_graph(triples or source, aliases, out / "graph", model))
    return reports


def _build(
    kind: str, docs: list[Document], extra: dict[str, Any], directory: Path, *, previous: Previous | None,
    model: str, index_type: IndexType, progress: bool, embed: Embed,
) -> dict[str, Any]:
    hashes = [text_sha256(d.text) for d in docs]
    keep: dict[int, int] = {}  # new position -> position in `previous` of the vector it takes over
    if previous is None:
        counts = ChunkCounts(added=len(docs))
    else:
        counts, keep = diff([d.doc_id for d in docs], hashes, previous)
    (directory / HASHES).write_text(json.dumps(hashes))
    fields = {"build": "full" if previous is None else "incremental", "chunks": asdict(counts)}
    if kind == "keyword":  # BM25 has no vectors to keep: rebuilt from every chunk, in a second or two
        return {**KeywordRetriever(name=kind, documents=docs).save(directory), **extra, **fields}
    fresh = [i for i in range(len(docs)) if i not in keep]
    started = time.perf_counter()
    embedded = embed([docs[i].text for i in fresh], model, progress=progress) if fresh else None
    seconds = time.perf_counter() - started
    vectors = _assemble(len(docs), keep, previous, fresh, embedded)
    dense = DenseRetriever(
        name=kind,
        documents=docs,
        index=make_index(vectors, index_type),
        embedder=SharedEncoderVectors(resolve_model(model)[0], vectors.shape[1]),
        index_type=index_type,
    )
    rate = {"embed_docs_per_s": round(len(fresh) / seconds, 1)} if fresh else {}
    return {**dense.save(directory), **extra, **fields, "embedded": len(fresh), **rate}


def _assemble(
    n: int, keep: dict[int, int], previous: Previous | None, fresh: list[int], embedded: np.ndarray | None
) -> np.ndarray:
    """The vectors of the new version in its order: the kept ones read back from `previous`, the rest embedded."""
    stored: np.ndarray | None = None
    if keep:
        assert previous is not None
        old = faiss.read_index(str(previous.directory / "index.faiss"))
        stored = old.reconstruct_n(0, old.ntotal)  # exact for flat and for HNSW-flat (its flat storage)
    dim = stored.shape[1] if stored is not None else embedded.shape[1] if embedded is not None else 0
    if embedded is not None and embedded.shape[1] != dim:
        raise DataError(f"the model gives {embedded.shape[1]} dimensions, the current index {dim}; "
                        "rebuild with `ragfan ingest --full`")
    vectors = np.empty((n, dim), dtype=np.float32)
    if stored is not None:
        vectors[list(keep)] = stored[list(keep.values())]
    if embedded is not None:
        vectors[fresh] = embedded
    return vectors


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
        return KindReport("graph", target, True, manifest["num_docs"], time.perf_counter() - started,
                          mode="reused", chunks=ChunkCounts(reused=manifest["num_docs"]))
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
    return KindReport("graph", target, False, len(facts), time.perf_counter() - started,
                      chunks=ChunkCounts(added=len(facts)))  # the triples are small: always rebuilt whole
