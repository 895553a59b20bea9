"""The gateway's search path and its HTTP API, on fake deployment handles: no Ray, no model.

Each case checks what happened (statuses, calls, cancellations), never how long it took.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from actors.errors import InvalidRequest, NoRetrieverAvailable, RetrieverFailed
from actors.synthetic import SyntheticRetriever
from serve_app.config import parse_config
from serve_app.gateway import Gateway
from serve_app.http import build_api, digest
from serve_app.testing import FakeHandle

MESSY = [
    ("vitamin D\x00deficiency and multiple sclerosis", "vitamin D deficiency and multiple sclerosis"),
    ("aspirin\x07 and colorectal cancer", "aspirin  and colorectal cancer"),
    ("metformin lowers\x85blood glucose", "metformin lowers blood glucose"),
    ("p53 \u0097 mutated in many cancers", "p53   mutated in many cancers"),  # a cp1252 em dash, mis-decoded
]


def make_config(**retriever_options):
    """Three retrievers, `a`, `b` and `c`; `retriever_options[name]` overrides one's config."""
    retrievers = [
        {"name": name, "kind": "synthetic", "data": "unused.jsonl", "timeout_ms": 2000, "filter_keys": ["domain"],
         **retriever_options.get(name, {})}
        for name in ("a", "b", "c")
    ]
    return parse_config({"retrievers": retrievers, "max_query_chars": 200}, base_dir=Path("."))


class Hanging:
    """A replica whose calls never end, until cancelled; it counts both."""

    def __init__(self) -> None:
        self.started = 0
        self.cancelled = 0
        self.entered = asyncio.Event()

    async def search(self, queries):
        self.started += 1
        self.entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise


class Broken:
    async def search(self, queries):
        raise RetrieverFailed("index file is corrupt")

    def describe(self):
        return {"name": "broken"}


@pytest.fixture
def replicas(docs):
    return {name: SyntheticRetriever(name=name, documents=docs) for name in ("a", "b", "c")}


def searches(handle: FakeHandle) -> list:
    """The search calls a replica got, each its list of queries (lanes also ask `describe`)."""
    return [args[0] for method, args in handle.calls if method == "search"]


def gateway_over(targets: dict, config=None) -> tuple[Gateway, dict[str, list[FakeHandle]]]:
    handles = {name: [FakeHandle(t) for t in (target if isinstance(target, list) else [target])]
               for name, target in targets.items()}
    return Gateway(config or make_config(), handles), handles


async def test_every_retriever_answers_and_the_answer_is_fused(replicas):
    gateway, handles = gateway_over(replicas)
    r = await gateway.search({"query": "risk of cancers", "top_k": 3})
    assert [s.status for s in r.retrievers.values()] == ["ok", "ok", "ok"] and not r.degraded
    assert len(r.results) == 3 and {s.retriever for s in r.results[0].sources} == {"a", "b", "c"}
    assert all(len(searches(h[0])) == 1 for h in handles.values())


async def test_a_retriever_that_raises_degrades_the_answer(replicas):
    gateway, _ = gateway_over({**replicas, "b": Broken()})
    r = await gateway.search({"query": "cancer risk"})
    assert r.retrievers["b"].status == "error" and "index file is corrupt" in r.retrievers["b"].error
    assert r.degraded and r.results and all(s.retriever != "b" for x in r.results for s in x.sources)


async def test_a_retriever_past_its_deadline_times_out_and_its_call_is_cancelled(replicas):
    hanging = Hanging()
    gateway, handles = gateway_over({**replicas, "c": hanging}, make_config(c={"timeout_ms": 20}))
    r = await gateway.search({"query": "cancer risk"})
    assert r.retrievers["c"].status == "timeout" and r.retrievers["c"].error == "no answer within 20 ms"
    assert r.degraded and r.results
    await asyncio.sleep(0)
    assert handles["c"][0].responses[0].cancelled and hanging.cancelled == hanging.started == 1


async def test_no_answer_in_the_requests_own_time_is_empty_and_degraded_but_a_failure_of_its_own_is_503():
    gateway, _ = gateway_over({"a": Hanging(), "b": Hanging(), "c": Hanging()}, make_config(c={"timeout_ms": 10}))
    r = await gateway.search({"query": "x", "retrievers": ["a", "b"], "timeout_ms": 10})  # theirs: 2000 ms
    assert r.results == [] and r.degraded and {r.retrievers[n].status for n in "ab"} == {"timeout"}
    with pytest.raises(NoRetrieverAvailable):  # c's own deadline is 10 ms: c failed, not the request
        await gateway.search({"query": "x", "retrievers": ["c"], "timeout_ms": 10})


async def test_a_dead_replica_degrades_the_answer(replicas):
    gateway, handles = gateway_over(replicas)
    handles["a"][0].kill()
    r = await gateway.search({"query": "cancer risk"})
    assert r.retrievers["a"].status == "error" and "ReplicaDied" in r.retrievers["a"].error
    assert r.degraded and r.retrievers["b"].status == "ok"


async def test_an_open_circuit_skips_the_retriever_and_sets_retry_after(replicas):
    config = make_config(a={"circuit_breaker": {"failures": 1, "cooldown_s": 7}})
    gateway, handles = gateway_over({**replicas, "a": Broken()}, config)
    first = await gateway.search({"query": "x", "retrievers": ["a", "b"]})
    assert first.retrievers["a"].status == "error"
    second = await gateway.search({"query": "x", "retrievers": ["a", "b"]})
    assert (second.retrievers["a"].status, second.retrievers["a"].error) == ("skipped", "circuit open")
    assert len(searches(handles["a"][0])) == 1  # skipped: not called again
    with pytest.raises(NoRetrieverAvailable) as info:
        await gateway.search({"query": "x", "retrievers": ["a"]})
    assert info.value.retry_after_s == 7  # the breaker's cooldown, not the default of 1
    assert info.value.reasons == {"a": {"status": "skipped", "error": "circuit open"}}


async def test_shards_with_one_failing_answer_with_partial_coverage(docs):
    config = make_config(a={"kind": "dense", "shards": 2, "encoder": "local"})
    halves = [SyntheticRetriever(name="a0", documents=docs[:3]), Broken()]
    gateway, _ = gateway_over({"a": halves}, config)
    r = await gateway.search({"query": "cancer risk", "retrievers": ["a"]})
    status = r.retrievers["a"]
    assert (status.status, status.coverage) == ("ok", 0.5) and "shard 1: error" in status.error
    assert r.degraded and {x.id for x in r.results} <= {d.doc_id for d in docs[:3]}


async def test_cancelling_a_search_cancels_its_calls_in_the_replicas(replicas):
    hanging = [Hanging(), Hanging()]
    gateway, handles = gateway_over({"a": hanging[0], "b": hanging[1], "c": replicas["c"]})
    search = asyncio.ensure_future(gateway.search({"query": "cancer", "retrievers": ["a", "b"]}))
    await asyncio.gather(*(h.entered.wait() for h in hanging))  # every call started ...
    search.cancel()  # ... and the caller went away
    with pytest.raises(asyncio.CancelledError):
        await search
    await asyncio.sleep(0)
    assert [h.cancelled for h in hanging] == [1, 1]
    assert all(h[0].responses[0].cancelled for name, h in handles.items() if name != "c")
    assert [lane.in_flight for lane in gateway.lanes.values()] == [0, 0, 0]


async def test_bad_input_is_invalid_request_naming_the_field(replicas):
    gateway, handles = gateway_over(replicas)
    for body, field in [({"query": "x", "retrievers": ["zzz"]}, "retrievers"), ({"query": "x" * 201}, "query"),
                        ({"query": " \x00 "}, "query"), ({"query": "x", "filters": {"colour": "red"}}, "filters")]:
        with pytest.raises(InvalidRequest) as info:
            await gateway.search(body)
        assert info.value.errors[0]["loc"] == ["body", field]
    assert not any(searches(h[0]) for h in handles.values())


@pytest.mark.parametrize(("query", "searched"), MESSY)
async def test_messy_text_is_searched_with_its_controls_as_spaces(replicas, query, searched):
    gateway, handles = gateway_over(replicas)
    r = await gateway.search({"query": query})
    assert r.query == searched and r.results
    assert searches(handles["a"][0])[0][0].text == searched


async def test_health_reports_each_retriever_and_a_dead_one(replicas):
    gateway, handles = gateway_over(replicas)
    handles["b"][0].kill()
    info = {r.name: r for r in (await gateway.retrievers()).retrievers}
    assert info["a"].healthy and info["a"].detail["num_docs"] == 5
    assert not info["b"].healthy and "ReplicaDied" in info["b"].error


# -- HTTP ----------------------------------------------------------------------------------------
@pytest.fixture
def client(replicas):
    gateway, _ = gateway_over({**replicas, "c": Broken()}, make_config(c={"circuit_breaker": {"failures": 1,
                                                                                                "cooldown_s": 9}}))
    with TestClient(build_api(gateway, max_body_bytes=2048)) as c:
        yield c


def test_http_search_answers_and_degrades(client):
    r = client.post("/v1/search", json={"query": "cancer risk", "top_k": 2})
    assert r.status_code == 200 and len(r.json()["results"]) == 2 and r.json()["degraded"]


@pytest.mark.parametrize(("query", "searched"), MESSY)
def test_http_serves_messy_text(client, query, searched):
    r = client.post("/v1/search", json={"query": query, "retrievers": ["a"]})
    assert r.status_code == 200 and r.json()["query"] == searched


@pytest.mark.parametrize(
    ("body", "status", "expected"),
    [
        (b'{"query": "\\u0000\\u0007 "}', 422, "query must contain text"),
        (b'{"query": "caf\xe9"}', 422, "not valid UTF-8"),
        (b'{"query": "x", "top_k": NaN}', 422, "NaN is not valid JSON"),
        (b"[" * 40 + b"]" * 40, 422, "nested too deeply"),
        (b'{"query": "x", "retrievers": ["zzz"]}', 422, "unknown retriever(s) 'zzz'; valid: a, b, c"),
        (b'{"query": "' + b"x" * 3000 + b'"}', 413, "the limit is 2048"),
    ],
)
def test_http_errors_have_one_shape(client, body, status, expected):
    r = client.post("/v1/search", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status and expected in str(r.json()["detail"])


def test_http_503_carries_the_breakers_retry_after(client):
    assert client.post("/v1/search", json={"query": "x", "retrievers": ["c"]}).status_code == 503
    r = client.post("/v1/search", json={"query": "x", "retrievers": ["c"]})
    assert r.status_code == 503 and r.headers["retry-after"] == "9"
    assert r.json()["detail"]["retrievers"]["c"] == {"status": "skipped", "error": "circuit open"}


def test_api_keys_are_app_state_not_global(replicas):
    gateway, _ = gateway_over(replicas)
    with TestClient(build_api(gateway, key_digests=[digest("k1")])) as keyed, TestClient(build_api(gateway)) as open_:
        assert keyed.post("/v1/search", json={"query": "x"}).status_code == 401
        assert keyed.post("/v1/search", json={"query": "x"}, headers={"authorization": "Bearer k1"}).status_code == 200
        assert keyed.get("/healthz").status_code == 200
        assert open_.post("/v1/search", json={"query": "x"}).status_code == 200  # the other app has no keys
        schema = keyed.get("/openapi.json").json()
        assert schema["paths"]["/v1/search"]["post"]["security"] == [{"APIKey": []}]
        assert "security" not in open_.get("/openapi.json").json()["paths"]["/v1/search"]["post"]


def test_the_openapi_schema_states_the_configs_rules(client):
    schema = client.get("/openapi.json").json()["components"]["schemas"]
    request = schema["SearchRequest"]["properties"]
    assert request["query"]["maxLength"] == 200 and request["query"]["pattern"]
    assert request["retrievers"]["anyOf"][0]["items"]["enum"] == ["a", "b", "c"]
    assert request["filters"]["anyOf"][0]["propertyNames"] == {"enum": ["domain"]}
    assert schema["FusionOptions"]["properties"]["weights"]["anyOf"][0]["propertyNames"]["enum"] == ["a", "b", "c"]


class SlowToDescribe:
    """A replica whose `describe` (the lane asks it first, for the result cache's key) waits for `gate`."""

    def __init__(self, retriever) -> None:
        self.retriever, self.gate, self.asked = retriever, asyncio.Event(), asyncio.Event()

    async def describe(self):
        self.asked.set()
        await self.gate.wait()
        return self.retriever.describe()

    async def search(self, queries):
        return self.retriever.search(queries)


async def test_a_changed_config_applied_mid_search_serves_later_searches_and_spares_the_running_one(replicas, docs):
    gated = SlowToDescribe(replicas["c"])
    gateway, handles = gateway_over({**replicas, "c": gated})
    running = asyncio.ensure_future(gateway.search({"query": "cancer risk"}))
    await gated.asked.wait()  # the search is looking c up in the result cache
    without_c = parse_config({"retrievers": [
        {"name": name, "kind": "synthetic", "data": "unused.jsonl", "timeout_ms": 3000 if name == "b" else 2000,
         "filter_keys": ["domain"]}
        for name in ("a", "b")]}, base_dir=Path("."))
    kept = gateway.lanes["a"]
    gateway.configure(without_c, {"a": handles["a"], "b": handles["b"]}, {})
    assert gateway.lanes["a"] is kept and gateway.lanes["b"].timeout_ms == 3000 and "c" not in gateway.lanes
    gated.gate.set()
    answer = await running  # validated with c, answered although c is gone from the config now
    assert answer.retrievers["a"].status == "ok" and "c" not in answer.retrievers
    later = await gateway.search({"query": "cancer risk"})
    assert set(later.retrievers) == {"a", "b"}
    with pytest.raises(InvalidRequest, match="unknown retriever"):
        await gateway.search({"query": "cancer risk", "retrievers": ["c"]})


async def test_a_line_per_search_is_logged_only_with_log_searches(replicas, caplog):
    caplog.set_level(logging.INFO, logger="ray.serve")
    quiet, _ = gateway_over(replicas)
    await quiet.search({"query": "risk of cancers"})
    assert not [r for r in caplog.records if r.getMessage().startswith("search ")]
    config = make_config()
    config.gateway.log_searches = True
    chatty, _ = gateway_over(replicas, config)
    await chatty.search({"query": "risk of cancers"})
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("search ")]
    assert "a=ok/" in line and "risk" not in line  # each retriever's status; never the query
