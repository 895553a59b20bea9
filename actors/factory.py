"""From a retriever spec to a loaded retriever: read the data, load the model, load or build the index."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from actors.base import Retriever
from actors.data import read_aliases, read_documents, read_triples
from actors.dense import DenseRetriever
from actors.embedder import DEFAULT_MODEL, SentenceTransformerEmbedder, resolve_model
from actors.errors import DataError, RetrieverFailed
from actors.graph import GraphRetriever
from actors.index import build_key, default_cache_dir, load_or_build, sha256_file, verify
from actors.keyword import KeywordRetriever
from actors.shards import shard_dir, shard_of
from actors.synthetic import SyntheticRetriever

logger = logging.getLogger("ragfan")

KINDS = ("dense", "keyword", "graph", "synthetic")


@dataclass(frozen=True)
class RetrieverSpec:
    """Everything a replica needs to open one retriever. Built from the config by serve_app."""

    name: str
    kind: str
    data: str | None = None  # a collection to index at start ...
    artifacts: str | None = None  # ... or a directory `ragfan ingest` wrote
    model: str = DEFAULT_MODEL
    params: Mapping[str, Any] = field(default_factory=dict)
    cache_dir: str | None = None
    shard: tuple[int, int] | None = None  # (i, N): this replica holds shard i of N (dense only)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown retriever kind {self.kind!r}; valid kinds: {', '.join(KINDS)}")
        if (self.data is None) == (self.artifacts is None):
            raise ValueError(f"{self.name}: give exactly one of `data` and `artifacts`")
        if self.shard is not None:
            i, n = self.shard
            if self.kind != "dense" or not 0 <= i < n:
                raise ValueError(f"{self.name}: shard {i} of {n} is not valid for kind {self.kind!r}")


def dense_index_dir(spec: RetrieverSpec, source_sha256: str | None = None) -> Path:
    """Where the dense index for this spec lives; a changed source, model or setting moves it."""
    cache = Path(spec.cache_dir) if spec.cache_dir else default_cache_dir()
    key = build_key(
        kind=spec.kind,
        model=resolve_model(spec.model)[0],
        source_sha256=source_sha256 or sha256_file(Path(spec.data)),
        text_field=spec.params.get("text_field", "text"),
        index_type=spec.params.get("index_type", "flat"),
        shard=list(spec.shard) if spec.shard else None,
    )
    return cache / spec.name / key


def open_artifacts(spec: RetrieverSpec) -> Retriever:
    """Load a retriever from the artifacts `ragfan ingest` wrote, after checking them."""
    directory = Path(spec.artifacts)
    if spec.shard is not None:
        directory = shard_dir(directory, *spec.shard)
    if not (directory / "manifest.json").is_file():
        raise DataError(
            f"{directory / 'manifest.json'}: not found; build the index with "
            f"`ragfan ingest SOURCE --out {Path(spec.artifacts).parent} --kinds {spec.kind}"
            f"{f' --shards {spec.shard[1]}' if spec.shard else ''}`"
        )
    manifest = verify(directory)
    if manifest.get("kind") != spec.kind:
        raise DataError(f"{directory}: holds a {manifest.get('kind')!r} index, but {spec.name} is kind {spec.kind!r}")
    if spec.kind == "keyword":
        return KeywordRetriever.load(directory, manifest, name=spec.name)
    model_name = resolve_model(spec.model)[0]
    if manifest.get("model") != model_name:
        raise RetrieverFailed(
            f"{directory}: built with model {manifest.get('model')!r}, but {spec.name} is configured with "
            f"{model_name!r}; set `model` to the index's model or re-run `ragfan ingest --model`"
        )
    embedder = SentenceTransformerEmbedder(spec.model)
    if spec.kind == "dense":
        return DenseRetriever.load(directory, manifest, name=spec.name, embedder=embedder)
    if spec.kind == "graph":
        return GraphRetriever(
            name=spec.name,
            triples=read_triples(directory / "triples.jsonl"),
            aliases=read_aliases(directory / "aliases.json"),
            embedder=embedder,
            hops=spec.params.get("hops", 2),
        )
    raise DataError(f"{spec.name}: kind {spec.kind!r} has no artifacts; use `data`")


def open_retriever(spec: RetrieverSpec, *, progress: bool = False) -> Retriever:
    """Load a retriever, building and caching its index first if needed."""
    if spec.artifacts is not None:
        return open_artifacts(spec)
    p = dict(spec.params)
    if spec.kind == "dense":
        embedder = SentenceTransformerEmbedder(spec.model)
        source_sha256 = sha256_file(Path(spec.data))
        target = dense_index_dir(spec, source_sha256)

        def build(directory: Path) -> dict[str, Any]:
            docs = read_documents(spec.data, text_field=p.get("text_field", "text"))
            if spec.shard is not None:
                docs = [d for d in docs if shard_of(d.doc_id, spec.shard[1]) == spec.shard[0]]
            retriever = DenseRetriever.from_documents(
                name=spec.name,
                documents=docs,
                embedder=embedder,
                index_type=p.get("index_type", "flat"),
                progress=progress,
            )
            shard = {"shard": list(spec.shard)} if spec.shard else {}
            return {**retriever.save(directory), "source": str(spec.data), "source_sha256": source_sha256, **shard}

        def load(directory: Path, manifest: dict[str, Any]) -> DenseRetriever:
            return DenseRetriever.load(directory, manifest, name=spec.name, embedder=embedder)

        retriever, built = load_or_build(target, build=build, load=load)
        logger.info("%s: %s dense index at %s", spec.name, "built" if built else "reused", target)
        return retriever
    if spec.kind == "keyword":
        return KeywordRetriever(
            name=spec.name,
            documents=read_documents(spec.data, text_field=p.get("text_field", "text")),
            language=p.get("language", "english"),
        )
    if spec.kind == "graph":
        return GraphRetriever(
            name=spec.name,
            triples=read_triples(spec.data),
            aliases=read_aliases(p.get("aliases")),
            embedder=SentenceTransformerEmbedder(spec.model),
            hops=p.get("hops", 2),
        )
    return SyntheticRetriever(
        name=spec.name,
        documents=read_documents(spec.data, text_field=p.get("text_field", "text")),
        delay_ms=p.get("delay_ms", 0.0),
        fail=p.get("fail", "never"),
    )
