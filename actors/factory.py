"""From a retriever spec to a loaded retriever: read the data, load the model, load or build the index.

A retriever with `shared_encoder` never loads a model: its queries arrive with vectors from the
encoder deployment, and what it must embed ahead of time (a dense index, a graph's entity and fact
vectors) is built once, by `build_missing` with a pool of Ray actors before replicas start, or here
as a fallback, and cached on disk.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from actors.base import Retriever
from actors.data import read_aliases, read_documents, read_triples
from actors.dense import DenseRetriever, embed_texts, make_index
from actors.embedder import Embedder, SentenceTransformerEmbedder, SharedEncoderVectors
from actors.errors import DataError, RetrieverFailed
from actors.graph import GraphRetriever, entity_names, fact_sentence
from actors.index import build_key, default_cache_dir, load_or_build, sha256_file, verify
from actors.keyword import KeywordRetriever
from actors.shards import shard_of
from actors.spec import DenseOptions, GraphOptions, KeywordOptions, RetrieverSpec
from actors.synthetic import SyntheticRetriever
from actors.versions import is_merged, link_path, version_dir

logger = logging.getLogger("ragfan")

# Embeds texts for a build: (texts, what a progress bar calls the work) -> one row per text.
Encode = Callable[[Sequence[str], str], np.ndarray]


def dense_index_dir(spec: RetrieverSpec, options: DenseOptions, source_sha256: str | None = None) -> Path:
    """Where the dense index for this spec lives; a changed source, model or setting moves it."""
    cache = spec.cache_dir or default_cache_dir()
    key = build_key(
        kind=spec.kind,
        model=spec.model_name,
        source_sha256=source_sha256 or sha256_file(spec.data_file),
        text_field=options.text_field,
        index_type=options.index,
        shard=list(spec.shard) if spec.shard else None,
    )
    return cache / spec.name / key


def graph_vectors_dir(spec: RetrieverSpec) -> Path:
    """Where a graph's entity and fact vectors live; a changed triples file or model moves them."""
    cache = spec.cache_dir or default_cache_dir()
    key = build_key(kind="graph-vectors", model=spec.model_name, source_sha256=sha256_file(_triples_path(spec)))
    return cache / spec.name / key


def _triples_path(spec: RetrieverSpec) -> Path:
    return spec.artifacts / "triples.jsonl" if spec.artifacts else spec.data_file


def _check_model(spec: RetrieverSpec, directory: Path, manifest: Mapping[str, Any]) -> None:
    if manifest.get("model") != spec.model_name:
        whose = "the encoder's model" if spec.shared_encoder else "its model"
        raise RetrieverFailed(
            f"{directory}: built with model {manifest.get('model')!r}, but {whose} for {spec.name} is "
            f"{spec.model_name!r}; set `model` to the index's model or re-run `ragfan ingest --model`"
        )


def _query_embedder(spec: RetrieverSpec, dim: int) -> Embedder:
    """The model that encodes this retriever's queries, or the stand-in for the shared encoder."""
    if spec.shared_encoder:
        return SharedEncoderVectors(spec.model_name, dim)
    return SentenceTransformerEmbedder(spec.model)


def local_encode(model: str, *, progress: bool) -> Encode:
    """Embed in this process, with the model loaded on first use."""
    embedder: list[SentenceTransformerEmbedder] = []

    def encode(texts: Sequence[str], desc: str) -> np.ndarray:
        if not embedder:
            embedder.append(SentenceTransformerEmbedder(model))
        return embed_texts(embedder[0], list(texts), progress=progress, desc=desc)

    return encode


# -- what is built ahead of time ----------------------------------------------------------------
def _dense_build(
    spec: RetrieverSpec, options: DenseOptions, source_sha256: str, encode: Encode
) -> Callable[[Path], dict[str, Any]]:
    def build(directory: Path) -> dict[str, Any]:
        docs = read_documents(spec.data_file, text_field=options.text_field)
        if spec.shard is not None:
            docs = [d for d in docs if shard_of(d.doc_id, spec.shard[1]) == spec.shard[0]]
        vectors = encode([d.text for d in docs], f"embedding {spec.name}")
        retriever = DenseRetriever(
            name=spec.name,
            documents=docs,
            index=make_index(vectors, options.index),
            embedder=SharedEncoderVectors(spec.model_name, vectors.shape[1]),
            index_type=options.index,
        )
        shard = {"shard": list(spec.shard)} if spec.shard else {}
        return {**retriever.save(directory), "source": str(spec.data), "source_sha256": source_sha256, **shard}

    return build


def _graph_vectors_build(spec: RetrieverSpec, encode: Encode) -> Callable[[Path], dict[str, Any]]:
    def build(directory: Path) -> dict[str, Any]:
        triples = read_triples(_triples_path(spec))
        entities = encode(entity_names(triples), f"embedding {spec.name} entities")
        facts = encode([fact_sentence(t) for t in triples], f"embedding {spec.name} facts")
        np.save(directory / "entities.npy", entities)
        np.save(directory / "facts.npy", facts)
        return {"kind": "graph-vectors", "model": spec.model_name, "dim": int(entities.shape[1]),
                "num_entities": len(entities), "num_facts": len(facts), "source": str(_triples_path(spec))}

    return build


def _load_graph_vectors(directory: Path, manifest: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    return np.load(directory / "entities.npy"), np.load(directory / "facts.npy")


def build_missing(spec: RetrieverSpec, encode: Encode) -> bool:
    """Embed, with `encode`, what this retriever needs and the cache lacks: its dense index, or a
    shared-encoder graph's vectors. Returns whether anything was built."""
    if isinstance(spec.options, DenseOptions) and spec.data is not None:
        sha = sha256_file(spec.data)
        target, build = dense_index_dir(spec, spec.options, sha), _dense_build(spec, spec.options, sha, encode)
    elif isinstance(spec.options, GraphOptions) and spec.shared_encoder:
        target, build = graph_vectors_dir(spec), _graph_vectors_build(spec, encode)
    else:
        return False
    return load_or_build(target, build=build, load=lambda d, m: None)[1]


def fingerprint(spec: RetrieverSpec, version: str | None = None) -> str:
    """A short name for exactly what this retriever answers from; the result cache keys its answers by it.

    It covers the kind's options, the model, and the checksums of the data: the manifest of built
    artifacts (which lists each file's checksum) of `version` (default: the link's now), or the
    source file, and a graph's aliases. A re-ingest or another model gives another fingerprint, so
    cached answers of the old index are never served for the new one.
    """
    digest = hashlib.sha256(spec.options.model_dump_json().encode())
    digest.update(f"{spec.model_name}|{spec.shard}".encode())
    if spec.artifacts is not None or is_merged(version):
        digest.update((_artifacts_dir(spec, version) / "manifest.json").read_bytes())
    else:
        digest.update(sha256_file(spec.data_file).encode())
    if isinstance(spec.options, GraphOptions) and spec.options.aliases is not None:
        digest.update(sha256_file(Path(spec.options.aliases)).encode())
    return digest.hexdigest()[:16]


def _artifacts_dir(spec: RetrieverSpec, version: str | None) -> Path:
    """The directory of `version`, or of the version the link points to now: one version throughout,
    as a rebuild may swap the link while a replica reads."""
    if version is not None:
        return version_dir(spec, version)
    return spec_link(spec).resolve()


def spec_link(spec: RetrieverSpec) -> Path:
    link = link_path(spec)
    if link is None:
        raise ValueError(f"{spec.name} opens from a data file, not from artifacts")
    return link


def verify_version(spec: RetrieverSpec, version: str) -> dict[str, Any]:
    """Check `version` of an artifacts retriever without loading it: every file's checksum, its kind,
    and its model against this retriever's (the encoder's). Returns its manifest; raises DataError or
    RetrieverFailed naming the problem."""
    directory = _artifacts_dir(spec, version)
    if not (directory / "manifest.json").is_file():
        raise DataError(f"{directory / 'manifest.json'}: not found; build the index with `ragfan ingest`")
    manifest = verify(directory)
    if manifest.get("kind") != spec.kind:
        raise DataError(f"{directory}: holds a {manifest.get('kind')!r} index, but {spec.name} is kind {spec.kind!r}")
    if spec.kind != "keyword":
        _check_model(spec, directory, manifest)
    return manifest


# -- opening ----------------------------------------------------------------------------------
def open_artifacts(spec: RetrieverSpec, *, version: str | None = None, progress: bool = False) -> Retriever:
    """Load a retriever from the artifacts `ragfan ingest` wrote (`version`, or the link's now), after
    checking them."""
    directory = _artifacts_dir(spec, version)
    if not (directory / "manifest.json").is_file():
        raise DataError(
            f"{directory / 'manifest.json'}: not found; build the index with "
            f"`ragfan ingest SOURCE --out {spec.artifacts_dir.parent} --kinds {spec.kind}"
            f"{f' --shards {spec.shard[1]}' if spec.shard else ''}`"
        )
    return open_dir(spec, directory, progress=progress)


def open_dir(spec: RetrieverSpec, directory: Path, *, progress: bool = False) -> Retriever:
    """Load the version in `directory`, checked: one `ragfan ingest` wrote, or a merge of live writes."""
    manifest = verify(directory)
    if manifest.get("kind") != spec.kind:
        raise DataError(f"{directory}: holds a {manifest.get('kind')!r} index, but {spec.name} is kind {spec.kind!r}")
    if spec.kind == "keyword":
        return KeywordRetriever.load(directory, manifest, name=spec.name)
    _check_model(spec, directory, manifest)
    if spec.kind == "dense":
        return DenseRetriever.load(directory, manifest, name=spec.name, embedder=_query_embedder(spec, manifest["dim"]))
    if isinstance(spec.options, GraphOptions):
        # the triples of this version, not of whatever the link points to by the time they are read
        pinned = spec.model_copy(update={"artifacts": directory})
        return _open_graph(pinned, spec.options, directory / "aliases.json", progress=progress)
    raise DataError(f"{spec.name}: kind {spec.kind!r} has no artifacts; use `data`")


def _open_graph(spec: RetrieverSpec, options: GraphOptions, aliases: Path | None, *, progress: bool) -> GraphRetriever:
    vectors = None
    if spec.shared_encoder:
        target = graph_vectors_dir(spec)
        if not (target / "manifest.json").is_file():
            logger.warning("%s: no entity vectors at %s; embedding them here (ragfan serve builds them first)",
                           spec.name, target)
        vectors, _ = load_or_build(
            target, build=_graph_vectors_build(spec, local_encode(spec.model, progress=progress)),
            load=_load_graph_vectors,
        )
        _check_model(spec, target, verify(target))
    return GraphRetriever(
        name=spec.name,
        triples=read_triples(_triples_path(spec)),
        aliases=read_aliases(aliases),
        embedder=_query_embedder(spec, vectors[0].shape[1] if vectors else 0),
        hops=options.hops,
        vectors=vectors,
    )


def open_retriever(spec: RetrieverSpec, *, version: str | None = None, progress: bool = False) -> Retriever:
    """Load a retriever, building and caching its index first if needed (with a model of its own).

    `version`: which version of its artifacts to open (actors/versions.py); None opens the link's.
    A `data:` retriever opens its file as it is now, unless `version` is one merged from live writes."""
    if is_merged(version):
        return open_dir(spec, version_dir(spec, version), progress=progress)  # type: ignore[arg-type]
    if spec.artifacts is not None:
        return open_artifacts(spec, version=version, progress=progress)
    options = spec.options
    if isinstance(options, DenseOptions):
        source_sha256 = sha256_file(spec.data_file)
        target = dense_index_dir(spec, options, source_sha256)

        def load(directory: Path, manifest: dict[str, Any]) -> DenseRetriever:
            _check_model(spec, directory, manifest)
            return DenseRetriever.load(directory, manifest, name=spec.name,
                                       embedder=_query_embedder(spec, manifest["dim"]))

        build = _dense_build(spec, options, source_sha256, local_encode(spec.model, progress=progress))
        retriever, built = load_or_build(target, build=build, load=load)
        logger.info("%s: %s dense index at %s", spec.name, "built" if built else "reused", target)
        return retriever
    if isinstance(options, KeywordOptions):
        return KeywordRetriever(
            name=spec.name,
            documents=read_documents(spec.data_file, text_field=options.text_field),
            language=options.language,
        )
    if isinstance(options, GraphOptions):
        return _open_graph(spec, options, options.aliases, progress=progress)
    return SyntheticRetriever(
        name=spec.name,
        documents=read_documents(spec.data_file, text_field=options.text_field),
        delay_ms=options.delay_ms,
        fail=options.fail,
        hold=options.hold,
    )
