"""Quality paths with real parts: the graph retriever on its own question set with the real model,
and a tiny BEIR dataset through ingest, the served fan-out and the metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from actors.data import read_aliases, read_triples
from actors.embedder import SentenceTransformerEmbedder
from actors.graph import GraphRetriever
from actors.types import Query
from serve_app.evaluate import evaluate

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
QUESTIONS = [json.loads(line) for line in (FIXTURES / "graph_qa" / "questions.jsonl").open()]


@pytest.fixture(scope="session")
def real_embedder():
    return SentenceTransformerEmbedder()  # the bundled all-MiniLM-L6-v2, loaded once


@pytest.fixture(scope="session")
def qa_graph(real_embedder):
    d = FIXTURES / "graph_qa"
    return GraphRetriever(
        name="qa", triples=read_triples(d / "triples.jsonl"), aliases=read_aliases(d / "aliases.json"),
        embedder=real_embedder,
    )


@pytest.mark.parametrize("q", QUESTIONS, ids=[q["question"] for q in QUESTIONS])
def test_graph_finds_the_expected_facts_in_the_top_5(qa_graph, real_embedder, q):
    [hits] = qa_graph.search([Query(q["question"], top_k=5)])
    by_id = {h.doc_id: h for h in hits}
    for fact in q["expected"]:
        assert fact in by_id, [h.doc_id for h in hits]
        assert by_id[fact].metadata["hops"] == str(q["hops"])
    seeds = qa_graph.link(q["question"], real_embedder.encode([q["question"]])[0])
    words = q["question"].lower()
    if q["linking"] == "alias":  # linked exactly, by a name that is not the entity's own
        assert any(score == 1.0 and entity not in words for entity, score in seeds.items()), seeds
    elif q["linking"] == "embedding":  # no entity is named: linked by similarity alone
        assert seeds and all(score < 1.0 for score in seeds.values()), seeds


def test_ingest_serve_and_eval_a_tiny_beir_dataset(cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("RAGFAN_CACHE_DIR", str(tmp_path))
    report = evaluate(FIXTURES / "tinybeir", ignore_identical_ids=True, concurrency=4)
    assert report["num_queries"] == 8  # the unjudged query is not evaluated
    assert set(report["metrics"]) == {"dense", "keyword", "fused"}
    for values in report["metrics"].values():
        assert set(values) == {"nDCG@10", "R@100", "RR@10"}
        assert all(0.0 <= v <= 1.0 for v in values.values())
    assert report["failed_queries"] == {"dense": 0, "keyword": 0, "fused": 0}
    assert report["metrics"]["dense"]["nDCG@10"] > 0.8  # each claim's abstract is among 40 documents
    assert report["metrics"]["fused"]["R@100"] == 1.0
    json.dumps(report)  # what --output writes
    manifest = tmp_path / "datasets" / "tinybeir" / "dense" / "manifest.json"
    built = json.loads(manifest.read_text())
    assert built["kind"] == "dense" and built["num_docs"] >= 40 and built["embed_docs_per_s"] > 0
    # a second run on the unchanged dataset reuses the artifacts
    mtime = manifest.stat().st_mtime
    again = evaluate(FIXTURES / "tinybeir", ignore_identical_ids=True, fusion="dbsf", concurrency=4)
    assert manifest.stat().st_mtime == mtime
    assert again["fusion"]["method"] == "dbsf" and again["metrics"]["dense"] == report["metrics"]["dense"]
