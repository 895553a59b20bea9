"""`ragfan eval --degrade` and graded judgments, without Ray: fused-without-R from the hits already
collected, each retriever's p50 latency, and nDCG with grades as gains, checked by hand."""

import math
from pathlib import Path

import pytest

from actors.errors import RagError
from actors.types import Hit
from serve_app.evaluate import (
    FUSED,
    Collected,
    _run_queries,
    document_of,
    format_table,
    load_beir,
    load_judged_queries,
    measure,
    p50,
    without_each,
)
from serve_app.fusion import fuse
from serve_app.schemas import SearchResponse

DEMO_QUERIES = Path(__file__).parents[2] / "serve_app" / "demo" / "data" / "demo_queries.jsonl"


# -- graded judgments ---------------------------------------------------------------------------------
def test_ndcg_takes_the_grades_as_gains_and_recall_and_rr_count_grade_one_or_more():
    qrels = {"q1": {"a": 2, "b": 1, "c": 0}, "q2": {"d": 1, "e": 0}}
    run = {
        "q1": {"c": 4.0, "b": 3.0, "x": 2.0, "a": 1.0},  # not relevant, grade 1, unjudged, grade 2
        "q2": {"e": 2.0, "y": 1.0},  # graded 0 first, the relevant one not found
    }
    # q1: DCG = 1/log2(3) + 2/log2(5); ideal: 2 first, then 1 = 2 + 1/log2(3). c, graded 0, gains nothing.
    ndcg_q1 = (1 / math.log2(3) + 2 / math.log2(5)) / (2 + 1 / math.log2(3))
    assert measure(run, qrels) == pytest.approx({
        "nDCG@10": round(ndcg_q1 / 2, 4),
        "R@100": round((2 / 2 + 0) / 2, 4),  # q1 found both of its relevant documents; c is not one
        "RR@10": round((1 / 2 + 0) / 2, 4),  # q1's first relevant one is b, at rank 2; c at rank 1 is not
    })
    binary = {q: {d: int(g >= 1) for d, g in docs.items()} for q, docs in qrels.items()}
    # Read as binary, the same run scores otherwise: the grade-2 document, fourth, is no longer the one missed most.
    ndcg_binary = (1 / math.log2(3) + 1 / math.log2(5)) / (1 + 1 / math.log2(3))
    assert measure(run, binary)["nDCG@10"] == pytest.approx(round(ndcg_binary / 2, 4)) != round(ndcg_q1 / 2, 4)


def test_a_query_judged_only_not_relevant_is_not_measured(tmp_path):
    (tmp_path / "qrels").mkdir()
    (tmp_path / "corpus.jsonl").write_text('{"_id": "d1", "text": "t"}\n')
    (tmp_path / "queries.jsonl").write_text('{"_id": "1", "text": "one"}\n{"_id": "2", "text": "two"}\n')
    (tmp_path / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n1\td1\t2\n1\td2\t0\n2\td1\t0\n")
    queries, qrels = load_beir(tmp_path, "test")
    assert queries == {"1": "one"} and qrels == {"1": {"d1": 2, "d2": 0}}


# -- judged queries in a JSONL file -------------------------------------------------------------------
def test_judged_queries_file_lists_or_grades_and_skips_unjudged_lines(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"_id": "1", "text": "one", "relevant": ["a", "b"]}\n\n'
                    '{"id": 2, "text": "two", "relevant": {"c": 2, "d": 0}}\n'
                    '{"_id": "3", "text": "three"}\n')
    assert load_judged_queries(path) == ({"1": "one", "2": "two"}, {"1": {"a": 1, "b": 1}, "2": {"c": 2, "d": 0}})
    path.write_text('{"_id": "1", "relevant": ["a"]}\n')
    with pytest.raises(RagError, match=r"q.jsonl:1: a judged query is"):
        load_judged_queries(path)


def test_the_demo_queries_are_judged_queries():
    queries, qrels = load_judged_queries(DEMO_QUERIES)
    assert len(queries) == 150 and sum(len(docs) for docs in qrels.values()) == 171  # demo data README


def test_a_hit_counts_for_its_document_a_chunk_for_its_parent_and_a_fact_for_its_source():
    assert document_of("d1#2", {"parent_id": "d1"}) == "d1"
    assert document_of("kg:aspirin|reduces_risk_of|colorectal cancer", {"source_id": "d3", "path": "x"}) == "d3"
    assert document_of("persona-01", {"persona": "clinician"}) == "persona-01"
    assert document_of("d2", None) == "d2"


# -- fused without each retriever ---------------------------------------------------------------------
def hits(*ids: str, top: float = 10.0) -> list[Hit]:
    return [Hit(doc_id, top - i, "", {}) for i, doc_id in enumerate(ids)]


def collected(own: dict[str, dict[str, list[Hit]]], **fusion) -> Collected:
    """A run whose fused system is what the gateway would answer from every retriever's hits."""
    from serve_app.evaluate import refuse

    qids = {q for by_query in own.values() for q in by_query}
    runs = {FUSED: {q: refuse({n: by_q[q] for n, by_q in own.items() if q in by_q}, q, top_k=100,
                              ignore_identical_ids=False, **fusion) for q in qids}}
    return Collected(runs, {FUSED: {}}, 1, hits=own)


def test_fused_without_a_retriever_refuses_the_others_hits():
    qrels = {"q1": {"a": 1}, "q2": {"b": 1}}
    own = {
        "dense": {"q1": hits("a", "x"), "q2": hits("y", "b")},
        "keyword": {"q1": hits("z", "x"), "q2": hits("b", "y")},
        "graph": {"q1": hits("x"), "q2": hits("y")},
    }
    fusion = {"method": "rrf", "weights": {"dense": 1.0, "keyword": 1.0, "graph": 0.5}, "k": 60}
    got = collected(own, **fusion)
    metrics, differ = without_each(got, ["dense", "keyword", "graph"], ["q1", "q2"], qrels, **fusion)
    assert differ == 0  # fused from every retriever, each query ranks as the served fused answer
    # Without dense, q1's `a` is gone; q2: y (1/62 from keyword + 0.5/61 from graph) over b (1/61): b second.
    assert metrics["fused-without-dense"]["RR@10"] == pytest.approx((0 + 1 / 2) / 2)
    # Without keyword, q1: x (1/62 + 0.5/61 = 0.0243) over a (1/61 = 0.0164); q2: y (1/61 + 0.5/61) over b (1/62).
    assert metrics["fused-without-keyword"]["RR@10"] == pytest.approx((1 / 2 + 1 / 2) / 2)
    assert metrics["fused-without-graph"] == measure(
        {q: {d.doc_id: -i for i, d in enumerate(fuse({n: own[n][q] for n in ("dense", "keyword")}, top_k=100,
                                                      **fusion))} for q in qrels}, qrels)


def test_a_retriever_that_failed_a_query_is_left_out_of_it_and_none_left_is_a_miss():
    qrels = {"q1": {"a": 1}, "q2": {"b": 1}}
    own = {"dense": {"q1": hits("a"), "q2": hits("b")}, "keyword": {"q1": hits("a")}}  # keyword failed q2
    fusion = {"method": "minmax", "weights": {"dense": 1.0, "keyword": 1.0}, "k": 60}
    metrics, differ = without_each(collected(own, **fusion), ["dense", "keyword"], qrels, qrels, **fusion)
    assert differ == 0
    assert metrics["fused-without-keyword"]["nDCG@10"] == 1.0
    assert metrics["fused-without-dense"] == {"nDCG@10": 0.5, "R@100": 0.5, "RR@10": 0.5}  # q2: nothing left


def test_a_refusion_unlike_the_served_answer_is_counted():
    qrels = {"q1": {"a": 1}}
    fusion = {"method": "rrf", "weights": {"dense": 1.0, "keyword": 1.0}, "k": 60}
    got = collected({"dense": {"q1": hits("a", "b")}, "keyword": {"q1": hits("b", "a")}}, **fusion)
    got.runs[FUSED]["q1"] = {"b": 0.0, "a": -1.0}  # the served one put b first: weights unlike these
    assert without_each(got, ["dense", "keyword"], ["q1"], qrels, **fusion)[1] == 1


# -- latency ------------------------------------------------------------------------------------------
def response(query: str, results: list[tuple[str, str, int, float]], statuses: dict[str, tuple]) -> SearchResponse:
    return SearchResponse.model_validate({
        "query": query, "degraded": False, "latency_ms": 1.0,
        "retrievers": {n: {"status": s, "latency_ms": ms, "cache": cache} for n, (s, ms, cache) in statuses.items()},
        "results": [{"id": doc, "score": 0.0, "text": "", "metadata": {},
                     "sources": [{"retriever": r, "rank": rank, "score": score}]} for doc, r, rank, score in results],
    })


class ScriptedClient:
    """Answers each batch from `answer(query, retrievers)`."""

    def __init__(self, answer) -> None:
        self.answer = answer

    async def search_batch_async(self, texts, *, top_k, retrievers, fusion):
        return [self.answer(t, tuple(retrievers)) for t in texts]


async def test_collects_each_retrievers_own_hits_and_the_latency_of_the_searches_it_ran():
    def answer(text: str, retrievers: tuple[str, ...]) -> SearchResponse:
        if retrievers == ("dense",):  # results in the fused order; the source keeps dense's own rank and score
            return response(text, [("b", "dense", 2, 0.5), ("a", "dense", 1, 0.9)], {"dense": ("ok", 30.0, "miss")})
        if retrievers == ("graph",):
            return response(text, [], {"graph": ("timeout", 2000.0, "miss")})
        statuses = {"dense": ("ok", 0.1, "hit"), "graph": ("ok", 12.0, "off")}
        return response(text, [("a", "dense", 1, 0.9)], statuses)

    systems = {"dense": ["dense"], "graph": ["graph"], FUSED: ["dense", "graph"]}
    got = await _run_queries(ScriptedClient(answer), {"q1": "one", "q2": "two"}, systems, fusion=None,
                             ignore_identical_ids=False, concurrency=16)
    assert got.hits["dense"]["q1"] == [Hit("a", 0.9, "", {}), Hit("b", 0.5, "", {})] and "graph" not in got.hits
    # dense: its two searches alone (the fused run's came from the cache); graph: the fused run's (it timed out alone)
    assert got.latency_ms == {"dense": [30.0, 30.0], "graph": [12.0, 12.0]}
    assert p50({"dense": [30.0, 10.0, 20.0]}, ["dense", "graph"]) == {"dense": 20.0, "graph": None}


def test_the_table_shows_what_each_retriever_adds_and_costs():
    report = {
        "dataset": "d", "split": "test", "config": None, "num_queries": 2, "seconds": 1.0,
        "fusion": {"method": "minmax"},
        "metrics": {"dense": {"nDCG@10": 0.5, "R@100": 0.6, "RR@10": 0.4},
                    FUSED: {"nDCG@10": 0.7, "R@100": 0.9, "RR@10": 0.6},
                    "fused-without-dense": {"nDCG@10": 0.6, "R@100": 0.9, "RR@10": 0.62}},
        "failed_queries": {"dense": 0, FUSED: 0, "fused-without-dense": 0},
        "adds": {"dense": {"nDCG@10": 0.1, "R@100": 0.0, "RR@10": -0.02}},
        "latency_p50_ms": {"dense": 31.25}, "refused_unlike_served": 0,
    }
    table = format_table(report)
    assert "fused-without-dense      0.6000    0.9000    0.6200       0" in table
    assert "dense                   +0.1000   +0.0000   -0.0200      31.2" in table
