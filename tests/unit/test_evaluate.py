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
    from serve_app.evaluate import BATCH, _run_queries, without_each
    from serve_app.gateway import Gateway
    from serve_app.testing import FakeHandle

    config = parse_config({"retrievers": [{"name": n, "kind": "synthetic", "data": "unused.jsonl", "top_k": 100}
                                          for n in ("dense", "keyword")]}, base_dir=Path("."))
    handle = FakeHandle(Gateway(config, {n: [FakeHandle(SyntheticRetriever(name=n, documents=docs))]
                                         for n in ("dense", "keyword")}))
    words = ["aspirin", "cancer", "metformin", "diabetes", "p53", "vitamin", "risk", "glucose"]
    queries = {f"q{i}": f"{words[i % 8]} {words[i * 3 % 8]} {i}" for i in range(BATCH + 6)}
    systems = {"dense": ["dense"], "keyword": ["keyword"], "fused": ["dense", "keyword"]}
    got = await _run_queries(RagClient.from_handle(handle), queries, systems, fusion=None,
                             ignore_identical_ids=False, concurrency=BATCH)
    runs = got.runs
    assert got.requests == 2 * 3 and [name for name, _ in handle.calls] == ["search_batch"] * 6
    assert got.failed == {"dense": {}, "keyword": {}, "fused": {}} and all(runs["fused"].values())
    # What --degrade fuses again: each retriever's own hits from its run alone. Fused from both, they
    # rank every query as the gateway's fused answer does.
    _, differ = without_each(got, ["dense", "keyword"], queries, {q: {"d1": 1} for q in queries},
                             method=config.fusion.method, weights={"dense": 1.0, "keyword": 1.0}, k=config.fusion.k)
    assert set(got.hits) == {"dense", "keyword"} and differ == 0
    # a latency per search each retriever ran: alone and fused (a synthetic retriever's answers are not cached)
    assert {n: len(ms) for n, ms in got.latency_ms.items()} == {"dense": 2 * len(queries), "keyword": 2 * len(queries)}
    client = RagClient.from_handle(FakeHandle(handle.target))
    for system, retrievers in systems.items():
        for qid, text in queries.items():
            single = await client.search_async(text, top_k=100, retrievers=retrievers)
            assert runs[system][qid] == to_run(single, qid, ignore_identical_ids=False), (system, qid)


# -- the cluster eval runs on: what it may stop, and what it needs free -----------------------------------
class FakeRay:
    """What `evaluate` asks of Ray and Serve, recorded in order; no Ray starts."""

    def __init__(self, monkeypatch, *, initialized: bool = False, free_cpus: float = 8.0) -> None:
        import ray
        from ray import serve

        self.calls: list[str] = []
        self.initialized = initialized
        monkeypatch.setattr(ray, "is_initialized", lambda: self.initialized)
        monkeypatch.setattr(ray, "init", lambda **kw: self._init(kw))
        monkeypatch.setattr(ray, "shutdown", lambda: self.calls.append("ray.shutdown"))
        monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": free_cpus})
        monkeypatch.setattr(serve, "start", lambda **kw: self.calls.append("serve.start"))
        monkeypatch.setattr(serve, "run", lambda app, name, route_prefix: self.calls.append(f"serve.run {name}"))
        monkeypatch.setattr(serve, "delete", lambda name: self.calls.append(f"serve.delete {name}"))
        monkeypatch.setattr(serve, "shutdown", lambda: self.calls.append("serve.shutdown"))
        monkeypatch.setattr("actors.ingest.ingest", lambda *a, **kw: self.calls.append("ingest") or [])

    def _init(self, kw) -> None:
        self.calls.append(f"ray.init {kw.get('address') or 'local'}")
        self.initialized = True


@pytest.fixture
def beir(tmp_path):
    (tmp_path / "qrels").mkdir()
    (tmp_path / "corpus.jsonl").write_text('{"_id": "d1", "text": "t"}\n')
    (tmp_path / "queries.jsonl").write_text('{"_id": "1", "text": "judged"}\n')
    (tmp_path / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n1\td1\t1\n")
    return tmp_path


@pytest.mark.parametrize("fails", [False, True])
def test_eval_on_a_cluster_it_joined_deletes_only_its_own_app(beir, monkeypatch, fails):
    """`ragfan eval --address`: never serve.shutdown (it deletes every app, production included);
    its own app goes, also when the run raises."""
    from serve_app import evaluate as ev

    ray = FakeRay(monkeypatch)

    async def run(*args, **kwargs):
        if fails:
            raise RuntimeError("the gateway died")
        return ev.Collected({s: {"1": {}} for s in args[2]}, {s: {} for s in args[2]}, 3)

    monkeypatch.setattr(ev, "_run_queries", run)
    if fails:
        with pytest.raises(RuntimeError, match="the gateway died"):
            ev.evaluate(beir, address="auto")
    else:
        ev.evaluate(beir, address="auto")
    assert "serve.shutdown" not in ray.calls
    assert ray.calls[-2:] == [f"serve.delete {ev.APP}", "ray.shutdown"]  # its app, then it disconnects


def test_eval_on_a_cluster_it_started_ends_it_and_in_a_callers_ray_only_deletes_its_app(beir, monkeypatch):
    from serve_app import evaluate as ev

    async def run(*args, **kwargs):
        raise RuntimeError("the gateway died")

    monkeypatch.setattr(ev, "_run_queries", run)
    started = FakeRay(monkeypatch)
    with pytest.raises(RuntimeError):
        ev.evaluate(beir)
    # its app goes, then the cluster with Serve in it; never serve.shutdown, whose controller kill Ray
    # reports as a failed task on every run
    assert started.calls[0] == "ray.init local" and started.calls[-2:] == [f"serve.delete {ev.APP}", "ray.shutdown"]
    assert "serve.shutdown" not in started.calls
    callers = FakeRay(monkeypatch, initialized=True)  # a caller's Ray (a notebook, a test session)
    with pytest.raises(RuntimeError):
        ev.evaluate(beir)
    assert callers.calls[-1] == f"serve.delete {ev.APP}" and "ray.shutdown" not in callers.calls


def test_eval_on_a_cluster_without_the_cpus_it_needs_says_so_at_once(beir, monkeypatch):
    """A cluster whose CPUs a running app holds would leave eval waiting forever for its replicas."""
    from actors.errors import RagError
    from serve_app import evaluate as ev

    ray = FakeRay(monkeypatch, free_cpus=0.5)
    # the gateway 0.25 and the shared encoder in it 0.5, dense and keyword 0.5 each, the hub 0.05
    with pytest.raises(RagError, match=r"0.5 CPUs free.*needs 1.8 \(its gateway with its encoder and the replicas of "
                                       r"dense, keyword\)"):
        ev.evaluate(beir, address="auto")
    assert ray.calls == ["ray.init auto", "ray.shutdown"]  # nothing started, nothing deleted
