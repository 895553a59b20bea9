"""What the gateway records per search: the metrics it sets, and the window behind GET /v1/stats.

No Ray: the instruments are `Recorded` (below), the stats hub a plain StatsHub, the replicas fakes.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from actors.metrics import METRICS
from actors.synthetic import SyntheticRetriever
from serve_app.config import parse_config
from serve_app.gateway import Gateway
from serve_app.http import build_api, digest
from serve_app.outcome import Outcome
from serve_app.telemetry import (
    BUCKET_S,
    LATENCY_RATIO,
    WINDOW_S,
    Bucket,
    StatsHub,
    Telemetry,
    latency_bucket,
    quantile,
)
from serve_app.testing import FakeHandle
from tests.unit.fakes import Clock

DOCS = Path(__file__).resolve().parents[2] / "docs" / "MONITORING.md"


class Recorded:
    """An instrument that keeps every call: ("inc" | "observe" | "set", value, tags)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float, dict[str, str]]] = []

    def inc(self, value=1.0, tags=None):
        self.calls.append(("inc", value, tags or {}))

    def observe(self, value, tags=None):
        self.calls.append(("observe", value, tags or {}))

    def set(self, value, tags=None):
        self.calls.append(("set", value, tags or {}))

    def total(self, **tags) -> float:
        return sum(v for _, v, t in self.calls if tags.items() <= t.items())


def instruments() -> dict[str, Recorded]:
    return {spec.name: Recorded() for spec in METRICS}


def config(**gateway):
    retrievers = [
        {"name": "fine", "kind": "synthetic", "data": "unused.jsonl", "timeout_ms": 2000},
        {"name": "broken", "kind": "synthetic", "data": "unused.jsonl", "timeout_ms": 2000, "fail": "always",
         "circuit_breaker": {"failures": 2, "cooldown_s": 60}},
    ]
    return parse_config({"retrievers": retrievers, "gateway": gateway, "cache": None}, base_dir=Path("."))


def gateway(docs, recorded, *, clock=None, hub=None, replica="r1", **gateway_options) -> Gateway:
    conf = config(**gateway_options)
    telemetry = Telemetry({"fine": 2.0, "broken": 2.0}, instruments=recorded, clock=clock or Clock(1_000_000.0))
    replicas = {
        "fine": SyntheticRetriever(name="fine", documents=docs),
        "broken": SyntheticRetriever(name="broken", documents=docs, fail="always"),
    }
    return Gateway(conf, {n: [FakeHandle(r)] for n, r in replicas.items()},
                   telemetry=telemetry if conf.gateway.metrics else None, stats_hub=hub, replica=replica)


# -- the histogram the window keeps ------------------------------------------------------------------
def test_quantile_is_within_a_bucket_of_the_truth():
    latencies = [0.7 * i for i in range(1, 1001)]  # 0.7 .. 700 ms
    histogram = Counter(latency_bucket(ms) for ms in latencies)
    for q in (0.5, 0.99):
        truth = sorted(latencies)[int(q * len(latencies)) - 1]
        assert truth / LATENCY_RATIO <= quantile(histogram, q) <= truth * LATENCY_RATIO
    assert quantile(Counter(), 0.5) is None


def test_buckets_merge_by_adding():
    a, b = Bucket(), Bucket()
    a.answers["complete"] += 2
    a.statuses["x"] = Counter(ok=3)
    b.answers["complete"] += 1
    b.statuses["x"] = Counter(ok=1, error=2)
    b.latencies["y"] = Counter({4: 1})
    a.add(b)
    assert a.answers == Counter(complete=3)
    assert a.statuses == {"x": Counter(ok=4, error=2)}
    assert a.latencies == {"y": Counter({4: 1})}


# -- what one search records -------------------------------------------------------------------------
def test_one_search_records_each_metric_with_its_tags():
    metrics = instruments()
    telemetry = Telemetry({"a": 1.0, "b": 0.5, "s": 1.0}, sharded={"s"}, instruments=metrics)
    telemetry.searched({
        "a": Outcome("a", "ok", 250.0, value=[], cache="miss"),
        "b": Outcome("b", "timeout", 500.0, error="no answer within 500 ms", cache="miss"),
        "c": Outcome("c", "skipped", error="circuit open"),
        "s": Outcome("s", "ok", 100.0, value=[], coverage=0.5, cache="hit"),
    }, "degraded", 0.6, 0.0004)
    m = metrics
    assert m["ragfan_searches_total"].calls == [("inc", 1.0, {"answer": "degraded"})]
    assert m["ragfan_search_seconds"].calls == [("observe", 0.6, {})]
    assert m["ragfan_fusion_seconds"].calls == [("observe", 0.0004, {})]
    assert {(t["retriever"], t["status"]) for _, _, t in m["ragfan_retriever_outcomes_total"].calls} == {
        ("a", "ok"), ("b", "timeout"), ("c", "circuit_open"), ("s", "ok")}
    # latency for every status but the skipped ones, which took no time
    assert [(v, t["retriever"]) for _, v, t in m["ragfan_retriever_seconds"].calls] == [
        (0.25, "a"), (0.5, "b"), (0.1, "s")]
    # how close an answered call came to its own deadline
    assert [(v, t["retriever"]) for _, v, t in m["ragfan_retriever_deadline_ratio"].calls] == [(0.25, "a"), (0.1, "s")]
    assert m["ragfan_cache_lookups_total"].total(result="miss") == 2
    assert m["ragfan_cache_lookups_total"].total(result="hit", retriever="s") == 1
    assert m["ragfan_shard_coverage_ratio"].calls == [("observe", 0.5, {"retriever": "s"})]


async def test_the_gateway_records_answers_failures_and_batches(docs):
    metrics = instruments()
    gw = gateway(docs, metrics)
    await gw.search({"query": "vitamin d"})  # broken fails: degraded
    await gw.search({"query": "vitamin d", "retrievers": ["fine"]})  # complete
    with pytest.raises(Exception, match="no selected retriever answered"):
        await gw.search({"query": "vitamin d", "retrievers": ["broken"]})  # failed: 503
    await gw.search_batch({"searches": [{"query": "aspirin"}, {"query": "statins"}, {"query": "zinc"}]})
    answers = Counter(t["answer"] for _, _, t in metrics["ragfan_searches_total"].calls)
    assert answers == {"degraded": 4, "complete": 1, "failed": 1}  # each search of the batch counts
    outcomes = metrics["ragfan_retriever_outcomes_total"]
    assert outcomes.total(retriever="fine", status="ok") == 5
    # two failures open broken's breaker; the rest are skipped by it
    assert outcomes.total(retriever="broken", status="error") == 2
    assert outcomes.total(retriever="broken", status="circuit_open") == 3
    # the batch asked each lane once, with its three queries
    sizes = [(v, t["lane"]) for _, v, t in metrics["ragfan_gateway_batch_size"].calls]
    assert (3, "fine") in sizes and sizes.count((1, "fine")) == 2


# -- the window, across gateway replicas ---------------------------------------------------------------
async def test_stats_merge_every_gateway_replica(docs):
    clock = Clock(1_000_000.0)
    hub = StatsHub(clock=clock)
    hub_handle = FakeHandle(hub)
    one = gateway(docs, instruments(), clock=clock, hub=hub_handle, replica="one")
    two = gateway(docs, instruments(), clock=clock, hub=hub_handle, replica="two")
    for _ in range(3):
        await one.search({"query": "vitamin d", "retrievers": ["fine"]})
    for _ in range(5):
        await two.search({"query": "aspirin", "retrievers": ["fine"]})
    await one.push_stats()
    stats = await two.live_stats()  # two pushes its own counts before it reads
    assert stats["gateways"] == 2
    assert stats["totals"]["searches"] == 8
    assert stats["retrievers"]["fine"]["totals"]["ok"] == 8
    assert sum(stats["retrievers"]["fine"]["status"]["ok"]) == 8
    assert len(stats["times"]) == WINDOW_S // BUCKET_S == len(stats["searches"]["qps"])
    # nothing was lost and nothing counted twice: a second read adds nothing
    assert (await one.live_stats())["totals"]["searches"] == 8


async def test_stats_points_fall_in_their_buckets_and_age_out(docs):
    clock = Clock(1_000_000.0)
    gw = gateway(docs, instruments(), clock=clock)
    await gw.search({"query": "vitamin d"})
    clock.now += 2 * BUCKET_S
    await gw.search({"query": "vitamin d"})
    await gw.search({"query": "vitamin d"})
    stats = await gw.live_stats()
    counts = [c for c in stats["retrievers"]["fine"]["status"]["ok"] if c]
    assert counts == [1, 2]  # two buckets apart, oldest first
    assert stats["searches"]["degraded_rate"][-1] == 1.0  # broken failed every one
    assert stats["searches"]["p50_ms"][-1] is not None
    assert stats["searches"]["p50_ms"][0] is None  # a bucket without searches has no latency
    clock.now += WINDOW_S + BUCKET_S
    assert (await gw.live_stats())["totals"]["searches"] == 0


async def test_health_shows_the_failing_retriever(docs):
    gw = gateway(docs, instruments())
    for _ in range(4):
        await gw.search({"query": "vitamin d"})
    health = {name: r["health"] for name, r in (await gw.live_stats())["retrievers"].items()}
    assert health["fine"]["state"] == "ok" and health["fine"]["circuit"] == "closed"
    assert health["broken"]["state"] == "failing" and health["broken"]["circuit"] == "open"


async def test_a_push_that_fails_keeps_its_counts_for_the_next(docs):
    clock = Clock(1_000_000.0)
    hub = FakeHandle(StatsHub(clock=clock))
    gw = gateway(docs, instruments(), clock=clock, hub=hub)
    await gw.search({"query": "vitamin d"})
    hub.kill()
    with pytest.raises(Exception, match="died"):
        await gw.push_stats()
    hub.dead = False
    assert (await gw.live_stats())["totals"]["searches"] == 1


# -- over HTTP ----------------------------------------------------------------------------------------
def test_stats_over_http_need_the_key_and_404_when_off(docs):
    keyed = TestClient(build_api(gateway(docs, instruments()), key_digests=[digest("k")]))
    assert keyed.get("/v1/stats").status_code == 401
    keyed.post("/v1/search", json={"query": "vitamin d"}, headers={"Authorization": "Bearer k"})
    answer = keyed.get("/v1/stats", headers={"Authorization": "Bearer k"})
    assert answer.status_code == 200
    assert answer.json()["totals"]["searches"] == 1
    off = TestClient(build_api(gateway(docs, instruments(), metrics=False)))
    answer = off.get("/v1/stats")
    assert answer.status_code == 404
    assert "gateway.metrics: false" in answer.json()["detail"]


def test_the_metrics_table_in_the_docs_matches_the_code():
    rows = re.findall(r"^\| `(ragfan_\w+)` \| (\w+) \| ([^|]*) \|", DOCS.read_text(encoding="utf-8"), re.M)
    documented = {name: (kind, tuple(re.findall(r"`(\w+)`", tags))) for name, kind, tags in rows}
    assert documented == {spec.name: (spec.kind, spec.tags) for spec in METRICS}


async def test_a_disabled_app_shows_every_retriever_down(docs):
    gw = gateway(docs, instruments())
    gw.config = gw.config.model_copy(update={"enabled": False})
    await gw.search({"query": "vitamin d"})
    stats = await gw.live_stats()
    assert stats["totals"]["searches"] == 0  # a disabled app answers without searching
    assert {r["health"]["state"] for r in stats["retrievers"].values()} == {"down"}
    assert all("disabled" in r["health"]["error"] for r in stats["retrievers"].values())
