"""Metrics of a toy run, checked against values computed by hand."""

import math

import pytest

from serve_app.evaluate import load_beir, measure, to_run
from serve_app.schemas import SearchResponse


def test_metrics_match_hand_computed_values():
    qrels = {"q1": {"a": 1, "b": 1}, "q2": {"c": 1}}
    run = {
        "q1": {"x": 3.0, "a": 2.0, "b": 1.0},  # relevant at ranks 2 and 3
        "q2": {"y": 2.0, "z": 1.0},  # the relevant doc is not retrieved
    }
    # q1: DCG = 1/log2(3) + 1/log2(4); ideal = 1 + 1/log2(3)
    ndcg_q1 = (1 / math.log2(3) + 0.5) / (1 + 1 / math.log2(3))
    assert measure(run, qrels) == pytest.approx({
        "nDCG@10": round((ndcg_q1 + 0) / 2, 4),
        "R@100": round((1.0 + 0.0) / 2, 4),
        "RR@10": round((1 / 2 + 0) / 2, 4),
    })


def test_a_query_without_hits_counts_as_a_miss():
    qrels = {"q1": {"a": 1}, "q2": {"b": 1}}
    assert measure({"q1": {"a": 1.0}, "q2": {}}, qrels) == {"nDCG@10": 0.5, "R@100": 0.5, "RR@10": 0.5}
    assert measure({"q1": {"a": 1.0}}, qrels) == {"nDCG@10": 0.5, "R@100": 0.5, "RR@10": 0.5}


def test_chunks_group_to_their_document_and_identical_ids_can_be_dropped():
    response = SearchResponse.model_validate({
        "query": "q", "degraded": False, "latency_ms": 1.0, "retrievers": {},
        "results": [
            {"id": "q7", "text": "", "score": 1, "sources": [], "metadata": {"parent_id": "q7"}},
            {"id": "d1#2", "text": "", "score": 1, "sources": [], "metadata": {"parent_id": "d1"}},
            {"id": "d2", "text": "", "score": 1, "sources": [], "metadata": {}},
            {"id": "d1#0", "text": "", "score": 1, "sources": [], "metadata": {"parent_id": "d1"}},
        ],
    })
    assert list(to_run(response, "q7", ignore_identical_ids=False)) == ["q7", "d1", "d2"]
    ranking = to_run(response, "q7", ignore_identical_ids=True)
    assert list(ranking) == ["d1", "d2"] and ranking["d1"] > ranking["d2"]


def test_load_beir_keeps_judged_queries_only(tmp_path):
    (tmp_path / "qrels").mkdir()
    (tmp_path / "corpus.jsonl").write_text('{"_id": "d1", "text": "t"}\n')
    (tmp_path / "queries.jsonl").write_text('{"_id": "1", "text": "judged"}\n{"_id": "2", "text": "not"}\n')
    (tmp_path / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n1\td1\t1\n")
    queries, qrels = load_beir(tmp_path, "test")
    assert queries == {"1": "judged"} and qrels == {"1": {"d1": 1}}
    from actors.errors import RagError

    with pytest.raises(RagError, match="qrels/dev.tsv: not found"):
        load_beir(tmp_path, "dev")


async def test_eval_asks_in_batches_and_ranks_as_single_searches_would(docs):
    """The batch path (one search_batch per 64 queries and system) gives the rankings that one
    search per query gives, so the metrics are the same as before batching."""
    from pathlib import Path

    from actors.synthetic import SyntheticRetriever
    from serve_app.client import RagClient
    from serve_app.config import parse_config
    from serve_app.evaluate import BATCH, _run_queries
    from serve_app.gateway import Gateway
    from serve_app.testing import FakeHandle

    config = parse_config({"retrievers": [{"name": n, "kind": "synthetic", "data": "unused.jsonl", "top_k": 100}
                                          for n in ("dense", "keyword")]}, base_dir=Path("."))
    handle = FakeHandle(Gateway(config, {n: [FakeHandle(SyntheticRetriever(name=n, documents=docs))]
                                         for n in ("dense", "keyword")}))
    words = ["aspirin", "cancer", "metformin", "diabetes", "p53", "vitamin", "risk", "glucose"]
    queries = {f"q{i}": f"{words[i % 8]} {words[i * 3 % 8]} {i}" for i in range(BATCH + 6)}
    systems = {"dense": ["dense"], "keyword": ["keyword"], "fused": ["dense", "keyword"]}
    runs, failed, requests = await _run_queries(RagClient.from_handle(handle), queries, systems, fusion=None,
                                                ignore_identical_ids=False, concurrency=BATCH)
    assert requests == 2 * 3 and [name for name, _ in handle.calls] == ["search_batch"] * 6
    assert failed == {"dense": {}, "keyword": {}, "fused": {}} and all(runs["fused"].values())
    client = RagClient.from_handle(FakeHandle(handle.target))
    for system, retrievers in systems.items():
        for qid, text in queries.items():
            single = await client.search_async(text, top_k=100, retrievers=retrievers)
            assert runs[system][qid] == to_run(single, qid, ignore_identical_ids=False), (system, qid)
