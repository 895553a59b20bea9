import contextlib
import time
import types

import numpy as np
import pytest

from actors import synthetic
from actors.data import Triple
from actors.dense import DenseRetriever, make_index
from actors.errors import Cancelled, RetrieverFailed
from actors.graph import GraphRetriever
from actors.keyword import KeywordRetriever
from actors.synthetic import SyntheticRetriever
from actors.types import CancelToken, Query


@pytest.mark.parametrize("index_type", ["flat", "hnsw"])
def test_dense_ranks_the_matching_document_first(docs, embedder, index_type):
    r = DenseRetriever.from_documents(name="d", documents=docs, embedder=embedder, index_type=index_type)
    [hits] = r.search([Query("metformin glucose diabetes", top_k=3)])
    assert hits[0].doc_id == "d2"
    assert len(hits) == 3
    assert hits[0].score == pytest.approx(max(h.score for h in hits))
    assert hits[0].metadata["domain"] == "metabolism"


def test_dense_batches_queries_into_one_encode_call_and_filters_per_query(docs, embedder):
    r = DenseRetriever.from_documents(name="d", documents=docs, embedder=embedder)
    embedder.calls.clear()
    results = r.search([
        Query("cancer", top_k=5, filters={"domain": "oncology"}),
        Query("cancer", top_k=5),
        Query("cancer", top_k=5, filters={"domain": "nowhere"}),
    ])
    assert embedder.calls == [3]
    assert {h.doc_id for h in results[0]} == {"d3", "d5"}
    assert len(results[1]) == 5
    assert results[2] == []


@pytest.mark.parametrize("index_type", ["flat", "hnsw"])
def test_dense_filter_finds_matches_beyond_the_unfiltered_top_k(docs, embedder, index_type):
    r = DenseRetriever.from_documents(name="d", documents=docs, embedder=embedder, index_type=index_type)
    [hits] = r.search([Query("metformin glucose diabetes", top_k=1, filters={"domain": "oncology"})])
    assert len(hits) == 1 and hits[0].metadata["domain"] == "oncology"


def test_dense_rejects_an_index_of_another_dimension(docs, embedder):
    wrong = make_index(np.eye(len(docs), 8, dtype=np.float32), "flat")
    with pytest.raises(RetrieverFailed, match="dimension 8"):
        DenseRetriever(name="d", documents=docs, index=wrong, embedder=embedder)


def test_keyword_stems_and_drops_stopwords(docs):
    r = KeywordRetriever(name="k", documents=docs)
    [hits] = r.search([Query("runs exercising", top_k=2)])
    assert hits[0].doc_id == "d4"  # "running"/"runs" and "exercise"/"exercising" share stems
    [none] = r.search([Query("the and of", top_k=5)])
    assert none == []  # only stopwords: nothing to match


def test_keyword_filters_and_top_k(docs):
    r = KeywordRetriever(name="k", documents=docs)
    [hits] = r.search([Query("cancer risk", top_k=5, filters={"domain": "oncology"})])
    assert hits and all(h.metadata["domain"] == "oncology" for h in hits)
    [one] = r.search([Query("cancer risk", top_k=1)])
    assert len(one) == 1
    assert r.describe()["num_docs"] == 5


TRIPLES = [
    Triple("p53", "mutated_in", "breast cancer", "doc-1", "p53 is often mutated in breast cancer."),
    Triple("breast cancer", "treated_by", "tamoxifen", "doc-2", "Tamoxifen treats breast cancer."),
    Triple("obesity", "increases_risk_of", "type 2 diabetes", "doc-3"),
    Triple("metformin", "treats", "type 2 diabetes", "doc-4"),
]


def graph(embedder, **kw):
    return GraphRetriever(
        name="g", triples=TRIPLES, embedder=embedder, aliases={"p53": ["tp53"], "type 2 diabetes": ["t2d"]}, **kw
    )


def test_graph_links_by_alias_and_expands_two_hops(embedder):
    g = graph(embedder)
    [hits] = g.search([Query("what does TP53 do?", top_k=10)])
    by_id = {h.doc_id: h for h in hits}
    direct = by_id["kg:p53|mutated_in|breast cancer"]
    two_hop = by_id["kg:breast cancer|treated_by|tamoxifen"]
    assert direct.metadata["hops"] == "1" and direct.metadata["source_id"] == "doc-1"
    assert two_hop.metadata["hops"] == "2"
    assert two_hop.metadata["path"] == "p53 mutated in breast cancer -> breast cancer treated by tamoxifen"
    assert direct.score > two_hop.score
    assert "Source: p53 is often mutated" in direct.text
    assert "obesity" not in " ".join(by_id)  # a separate component is not reached


def test_graph_hops_limit_expansion(embedder):
    g = graph(embedder, hops=1)
    [hits] = g.search([Query("tp53", top_k=10)])
    assert [h.doc_id for h in hits] == ["kg:p53|mutated_in|breast cancer"]


def test_graph_links_by_embedding_similarity_without_an_exact_name(embedder):
    g = graph(embedder, link_threshold=0.3)
    seeds = g.link("metformin's effects", embedder.encode(["metformin's effects"])[0])
    assert "metformin" in seeds and seeds["metformin"] < 1.0
    assert g.link("t2d", embedder.encode(["t2d"])[0])["type 2 diabetes"] == 1.0


def test_graph_with_no_linked_entity_returns_nothing(embedder):
    [hits] = graph(embedder).search([Query("quantum chromodynamics", top_k=5)])
    assert hits == []


def test_synthetic_ranks_by_overlap_and_can_fail(docs):
    ok = SyntheticRetriever(name="s", documents=docs)
    [hits] = ok.search([Query("aspirin cancer", top_k=2)])
    assert hits[0].doc_id == "d3"
    bad = SyntheticRetriever(name="s", documents=docs, fail="always")
    with pytest.raises(RetrieverFailed, match="configured to fail"):
        bad.search([Query("x")])


class RecordedWaits(CancelToken):
    """A cancel token that records the waits asked of it instead of sleeping."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float] = []

    def wait(self, seconds: float) -> None:
        self.waits.append(seconds)


def test_synthetic_delay_is_the_whole_service_time_of_a_batch(docs, monkeypatch):
    # A clock that stands still: the ranking takes no time, so the wait is the whole delay.
    monkeypatch.setattr(synthetic, "time", types.SimpleNamespace(perf_counter=lambda: 7.0, monotonic=time.monotonic))
    for fail in ("never", "always"):
        retriever, token = SyntheticRetriever(name="s", documents=docs, delay_ms=60, fail=fail), RecordedWaits()
        with contextlib.suppress(RetrieverFailed):
            retriever.search([Query("aspirin cancer")] * 8, cancel=token)  # a batch of 8 costs one delay, not 8
        assert token.waits == [pytest.approx(0.06)]
    # The ranking's own time counts towards the delay: 20 ms of ranking leaves 40 ms to wait.
    ticks = iter([7.0, 7.02])
    clock = types.SimpleNamespace(perf_counter=lambda: next(ticks), monotonic=time.monotonic)
    monkeypatch.setattr(synthetic, "time", clock)
    token = RecordedWaits()
    SyntheticRetriever(name="s", documents=docs, delay_ms=60).search([Query("aspirin cancer")], cancel=token)
    assert token.waits == [pytest.approx(0.04)]


def test_query_top_k_must_be_positive():
    with pytest.raises(ValueError):
        Query("x", top_k=0)


def test_a_held_synthetic_search_waits_inside_until_its_hold_file_goes(docs, tmp_path):
    import threading

    hold = tmp_path / "hold"
    hold.touch()
    retriever = SyntheticRetriever(name="s", documents=docs, hold=hold)
    answers: list = []
    worker = threading.Thread(target=lambda: answers.append(retriever.search([Query("cancer risk", top_k=2)])))
    worker.start()
    inside = []
    for _ in range(1000):  # its marker appears once it waits
        if inside := list(tmp_path.glob("hold.*.inside")):
            break
        time.sleep(0.01)
    assert len(inside) == 1 and worker.is_alive() and not answers
    hold.unlink()  # let it go: it ranks, answers, and takes its marker away
    worker.join(10)
    assert answers and answers[0][0] and not list(tmp_path.glob("hold.*.inside"))
    hold.touch()
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        retriever.search([Query("cancer risk")], cancel=token)  # a held search still ends when cancelled
    assert not list(tmp_path.glob("hold.*.inside"))
