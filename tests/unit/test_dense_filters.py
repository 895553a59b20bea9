"""Filtered dense search on an HNSW index, against flat's exact answer.

HNSW walks a graph with a beam of `efSearch` candidates; a FAISS ID selector keeps only the
matches, so a filter that matches few documents leaves few in the beam and drops matches that
flat finds. These tests measure that (recall@10 against flat on a few thousand clustered vectors)
and check what actors/dense.py does about it. docs/QUALITY.md quotes the figures they print.
"""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from actors import dense
from actors.dense import DenseRetriever, make_index
from actors.embedder import SharedEncoderVectors
from actors.types import Document, Query

N, DIM, CLUSTERS, QUERIES, K = 5000, 64, 50, 200, 10
# `share` values and the fraction of documents carrying each
SHARES = {"a": 0.005, "b": 0.02, "c": 0.10, "d": 0.875}


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def collection():
    """5,000 vectors in 50 clusters; each document has its cluster as `topic` and a random `share`."""
    rng = np.random.default_rng(7)
    centers = rng.normal(size=(CLUSTERS, DIM))
    topics = rng.integers(0, CLUSTERS, N)
    vectors = _unit(centers[topics] + 0.6 * rng.normal(size=(N, DIM)))
    shares = rng.choice(list(SHARES), size=N, p=list(SHARES.values()))
    docs = [Document(f"v{i}", f"doc {i}", {"topic": str(topics[i]), "share": str(shares[i])}) for i in range(N)]
    query_topics = rng.integers(0, CLUSTERS, QUERIES)
    queries = _unit(centers[query_topics] + 0.6 * rng.normal(size=(QUERIES, DIM)))
    embedder = SharedEncoderVectors("synthetic", DIM)
    flat = DenseRetriever(name="flat", documents=docs, index=make_index(vectors, "flat"), embedder=embedder)
    hnsw = DenseRetriever(name="hnsw", documents=docs, index=make_index(vectors, "hnsw"), embedder=embedder,
                          index_type="hnsw")
    return flat, hnsw, queries, query_topics


# A filter on another cluster's topic matches ~2% of the documents, none of them near the query:
# the hardest case for a graph walk. The `share` filters match documents regardless of position.
FILTERS = {
    "share 0.5%": lambda topic: {"share": "a"},
    "share 2%": lambda topic: {"share": "b"},
    "share 10%": lambda topic: {"share": "c"},
    "another topic (2%)": lambda topic: {"topic": str((topic + 1) % CLUSTERS)},
}


def recall(retriever: DenseRetriever, truth: DenseRetriever, queries, topics, make_filter) -> float:
    found = []
    for vector, topic in zip(queries, topics, strict=True):
        query = Query("q", top_k=K, filters=make_filter(int(topic)), vector=vector)
        [expected], [got] = truth.search([query]), retriever.search([query])
        assert len(expected) == K and all(matches(h, query) for h in got)
        found.append(len({h.doc_id for h in expected} & {h.doc_id for h in got}) / K)
    return float(np.mean(found))


def matches(hit, query) -> bool:
    return all(hit.metadata[key] == value for key, value in query.filters.items())


def selector_only_recall(flat: DenseRetriever, hnsw: DenseRetriever, queries, topics, make_filter) -> float:
    """What hnsw answered before: the selector alone, at the configured efSearch (128)."""
    found = []
    for vector, topic in zip(queries, topics, strict=True):
        allowed = hnsw._allowed(make_filter(int(topic)))
        params = faiss.SearchParametersHNSW(sel=faiss.IDSelectorBatch(allowed), efSearch=hnsw.ef_search)
        _, ids = hnsw.index.search(vector[None], K, params=params)
        _, truth = flat.index.search(vector[None], K, params=faiss.SearchParameters(sel=faiss.IDSelectorBatch(allowed)))
        found.append(len(set(truth[0]) & set(ids[0]) - {-1}) / K)
    return float(np.mean(found))


@pytest.mark.parametrize("name", list(FILTERS))
def test_hnsw_with_a_filter_finds_what_flat_finds(collection, name):
    flat, hnsw, queries, topics = collection
    before = selector_only_recall(flat, hnsw, queries, topics, FILTERS[name])
    exact = recall(hnsw, flat, queries, topics, FILTERS[name])
    print(f"\nhnsw recall@10 against flat, filter {name}: selector alone {before:.3f}, now {exact:.3f}")
    assert exact == 1.0  # a filter matching <= EXACT_FILTER_MAX documents scores them all


@pytest.mark.parametrize("name", list(FILTERS))
def test_a_broad_filter_walks_the_graph_with_a_wider_beam(collection, name, monkeypatch):
    flat, hnsw, queries, topics = collection
    monkeypatch.setattr(dense, "EXACT_FILTER_MAX", 0)  # as if every filter matched more than the limit
    widened = recall(hnsw, flat, queries, topics, FILTERS[name])
    print(f"\nhnsw recall@10 against flat, filter {name}, graph walk with efSearch widened: {widened:.3f}")
    assert widened >= 0.98


def test_an_unfiltered_hnsw_search_is_still_approximate_and_close(collection):
    flat, hnsw, queries, topics = collection
    unfiltered = recall(hnsw, flat, queries, topics, lambda topic: {})
    print(f"\nhnsw recall@10 against flat, no filter: {unfiltered:.3f}")
    assert unfiltered >= 0.98
