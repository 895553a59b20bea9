"""Quality paths with real parts: the graph retriever on its own question set with the real model,
and a tiny BEIR dataset through ingest, the served fan-out and the metrics."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from actors.data import read_aliases, read_triples
from actors.embedder import SentenceTransformerEmbedder
from actors.graph import GraphRetriever
from actors.types import Query
from serve_app.evaluate import evaluate, load_beir, measure

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
QUESTIONS = [json.loads(line) for line in (FIXTURES / "graph_qa" / "questions.jsonl").open()]
# The entities each question names, by name or by alias: what exact linking must find, no more.
EXACT_LINKS = {
    "What does caffeine do to adenosine receptors?": {"caffeine", "adenosine receptors"},
    "Which drinks contain trimethylxanthine?": {"caffeine"},  # alias
    "How is T2D treated?": {"type 2 diabetes"},  # alias
    "Does blue light affect melatonin?": {"blue light", "melatonin"},
    "Why does caffeine keep people awake?": {"caffeine"},
    "What does metformin act on?": {"metformin"},
    "What in green tea helps people relax?": {"green tea"},  # not "relaxation": "relax" is another word
    "Is there a hormone that sets the body clock?": set(),
    "What does drinking espresso deliver?": set(),
}


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
    expected = EXACT_LINKS[q["question"]]
    # Exact linking alone (no vector): exactly the entities the question names, each with score 1.
    assert qa_graph.link(q["question"], None) == dict.fromkeys(expected, 1.0)
    seeds = qa_graph.link(q["question"], real_embedder.encode([q["question"]])[0])
    assert {entity for entity, score in seeds.items() if score == 1.0} == expected, seeds
    # and every hit says which entities the query linked to: these, plus any linked by similarity
    assert all(set(h.metadata["linked_entities"].split(", ")) == set(seeds) for h in hits)
    words = q["question"].lower()
    if q["linking"] == "exact":  # the question uses each entity's own name
        assert expected and all(entity in words for entity in expected)
    elif q["linking"] == "alias":  # linked exactly, by a name that is not the entity's own
        assert expected and all(entity not in words for entity in expected)
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
    assert report["requests"] == 3  # the batch path: one search_batch of the 8 queries per system
    # R@100 is 1.0 for any ranking of a 40-document corpus; ranking quality shows in the top 10.
    # Against rankings in random order (nDCG@10 about 0.1 here) and a fixed bar:
    chance = random_ndcg(FIXTURES / "tinybeir")
    print(f"\ntinybeir nDCG@10: {({s: v['nDCG@10'] for s, v in report['metrics'].items()})}, random {chance:.3f}")
    for system, values in report["metrics"].items():
        assert values["nDCG@10"] > chance + 0.5, (system, values, chance)
    assert report["metrics"]["dense"]["nDCG@10"] > 0.8  # each claim's abstract is among 40 documents
    assert report["metrics"]["fused"]["nDCG@10"] > 0.8 and report["metrics"]["fused"]["RR@10"] > 0.8
    json.dumps(report)  # what --output writes
    manifest = tmp_path / "datasets" / "tinybeir" / "dense" / "manifest.json"
    built = json.loads(manifest.read_text())
    assert built["kind"] == "dense" and built["num_docs"] >= 40 and built["embed_docs_per_s"] > 0
    # a second run on the unchanged dataset reuses the artifacts
    mtime = manifest.stat().st_mtime
    again = evaluate(FIXTURES / "tinybeir", ignore_identical_ids=True, fusion="dbsf", concurrency=4)
    assert manifest.stat().st_mtime == mtime
    assert again["fusion"]["method"] == "dbsf" and again["metrics"]["dense"] == report["metrics"]["dense"]


def random_ndcg(dataset: Path, rounds: int = 50) -> float:
    """nDCG@10 of the corpus in random order (seeded), averaged over `rounds` shuffles."""
    queries, qrels = load_beir(dataset, "test")
    ids = [json.loads(line)["_id"] for line in (dataset / "corpus.jsonl").open()]
    rng = random.Random(0)
    total = 0.0
    for _ in range(rounds):
        run = {q: {d: float(len(ids) - i) for i, d in enumerate(rng.sample(ids, len(ids))) if d != q} for q in queries}
        total += measure(run, qrels)["nDCG@10"]
    return total / rounds


def dbsf_share(score: float, scores: list[float]) -> float:
    """One hit's normalised score under DBSF: its place in the retriever's mean ± 3 sd, clipped."""
    mean, sd = float(np.mean(scores)), float(np.std(scores))
    return float(np.clip((score - (mean - 3 * sd)) / (6 * sd), 0.0, 1.0))


def test_dbsf_fuses_by_its_definition_and_not_like_rrf_or_minmax(base_url, http):
    # persona returns all of its 40 snippets and keyword the few abstracts with "zebrafish", so every
    # hit of both is in the answer and each retriever's mean and deviation can be recomputed
    body = {"query": "zebrafish", "retrievers": ["persona", "keyword"], "top_k": 100,
            "fusion": {"weights": {"persona": 1.0, "keyword": 1.0}}}
    answers = {}
    for method in ("dbsf", "rrf", "minmax"):
        r = http.post(f"{base_url}/v1/search", json={**body, "fusion": {**body["fusion"], "method": method}})
        assert r.status_code == 200, r.text
        answers[method] = r.json()
    dbsf = answers["dbsf"]
    hits = {name: [s["score"] for res in dbsf["results"] for s in res["sources"] if s["retriever"] == name]
            for name in ("persona", "keyword")}
    assert {n: len(h) for n, h in hits.items()} == {n: dbsf["retrievers"][n]["num_hits"] for n in hits}
    assert len(hits["persona"]) == 40 and len(hits["keyword"]) >= 2
    for res in dbsf["results"]:  # weights 1 and 1, normalised to 0.5 each
        expected = sum(0.5 * dbsf_share(s["score"], hits[s["retriever"]]) for s in res["sources"])
        assert res["score"] == pytest.approx(expected, abs=1e-6), res
    scores = {m: {res["id"]: res["score"] for res in a["results"]} for m, a in answers.items()}
    assert set(scores["dbsf"]) == set(scores["rrf"]) == set(scores["minmax"])  # the same documents
    for other in ("rrf", "minmax"):  # fused differently: dbsf is not an echo of another method
        assert any(scores["dbsf"][d] != pytest.approx(scores[other][d], abs=1e-6) for d in scores["dbsf"]), other
