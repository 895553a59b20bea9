"""Batch queries (POST /v1/search/batch) on fake deployment handles: no Ray, no model.

Each case checks what happened (calls per handle, statuses, order, cancellations), never timing.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from actors.errors import PayloadTooLarge
from actors.synthetic import SyntheticRetriever
from serve_app.batcher import Batcher
from serve_app.clock import now
from serve_app.config import parse_config
from serve_app.gateway import Gateway
from serve_app.http import build_api
from serve_app.lanes import EncoderLane
from serve_app.schemas import BatchSearchError, BatchSearchResult
from serve_app.testing import FakeHandle
from tests.unit.fakes import FakeEncoder
from tests.unit.test_gateway import Broken, Hanging

QUERIES = ["aspirin and cancer", "metformin diabetes", "p53 mutations", "vitamin d levels", "statins and risk"]


def make_config(**options):
    """Retrievers `a`, `b`, `c` that batch at most 2 queries a call, so that a batch of more proves
    it goes whole; `options[name]` overrides one's config, `options["gateway"]` the gateway's."""
    retrievers = [
        {"name": name, "kind": "synthetic", "data": "unused.jsonl", "timeout_ms": 2000, "filter_keys": ["domain"],
         "batch": {"max_batch_size": 2}, **options.get(name, {})}
        for name in ("a", "b", "c")
    ]
    return parse_config({"retrievers": retrievers, "gateway": options.get("gateway", {}), "cache": None},
                        base_dir=Path("."))


@pytest.fixture
def replicas(docs):
    return {name: SyntheticRetriever(name=name, documents=docs) for name in ("a", "b", "c")}


def gateway_over(targets: dict, config=None) -> tuple[Gateway, dict[str, FakeHandle]]:
    handles = {name: FakeHandle(target) for name, target in targets.items()}
    return Gateway(config or make_config(), {name: [h] for name, h in handles.items()}), handles


def searches(handle: FakeHandle) -> list[list[str]]:
    """The queries of each search call the handle got."""
    return [[q.text for q in args[0]] for method, args in handle.calls if method == "search"]


async def test_each_retriever_gets_one_call_with_every_query_that_selects_it(replicas):
    gateway, handles = gateway_over(replicas)
    batch = [{"query": q} for q in QUERIES] + [{"query": "only b", "retrievers": ["b"]}]
    r = await gateway.search_batch({"searches": batch})
    assert [item.status for item in r.responses] == [200] * 6
    assert searches(handles["a"]) == searches(handles["c"]) == [QUERIES]  # one call of 5, past max_batch_size 2
    assert searches(handles["b"]) == [[*QUERIES, "only b"]]
    assert [item.query for item in r.responses] == [*QUERIES, "only b"]  # in the request's order
    only_b = r.responses[5]
    assert isinstance(only_b, BatchSearchResult) and only_b.retrievers["a"].status == "skipped"


async def test_a_batch_answers_as_the_single_searches_would(replicas):
    gateway, _ = gateway_over(replicas)
    batch = [{"query": q, "top_k": 3, "retrievers": ["a", "b"]} for q in QUERIES]
    r = await gateway.search_batch({"searches": batch})
    for request, item in zip(batch, r.responses, strict=True):
        single = await gateway.search(request)
        assert [(x.id, x.score) for x in item.results] == [(x.id, x.score) for x in single.results]


async def test_a_bad_item_is_422_in_its_place_and_the_others_answer(replicas):
    gateway, handles = gateway_over(replicas)
    batch = [{"query": QUERIES[0]}, {"query": "  "}, {"query": QUERIES[1], "retrievers": ["nope"]}, "not an object",
             {"query": QUERIES[2]}]
    r = await gateway.search_batch({"searches": batch})
    assert [item.status for item in r.responses] == [200, 422, 422, 422, 200]
    blank, unknown = r.responses[1], r.responses[2]
    assert isinstance(blank, BatchSearchError) and blank.error.detail[0]["loc"] == ["body", "query"]
    assert isinstance(unknown, BatchSearchError) and "unknown retriever(s) 'nope'" in unknown.error.detail[0]["msg"]
    assert searches(handles["a"]) == [[QUERIES[0], QUERIES[2]]]  # the bad ones never went out


async def test_an_item_whose_only_retriever_fails_is_503_and_the_others_answer(replicas):
    gateway, _ = gateway_over({**replicas, "c": Broken()})
    r = await gateway.search_batch({"searches": [{"query": QUERIES[0]}, {"query": QUERIES[1], "retrievers": ["c"]},
                                                 {"query": QUERIES[2], "retrievers": ["a"]}]})
    first, failed, last = r.responses
    assert first.status == 200 and first.degraded and first.retrievers["c"].status == "error"
    assert isinstance(failed, BatchSearchError) and failed.status == 503 and failed.retry_after_s == 1
    assert "index file is corrupt" in failed.error.detail["retrievers"]["c"]["error"]
    assert last.status == 200 and not last.degraded


async def test_a_timeout_degrades_every_item_that_asked_that_retriever_and_its_one_call_is_cancelled(replicas):
    hanging = Hanging()
    gateway, handles = gateway_over({**replicas, "c": hanging}, make_config(c={"timeout_ms": 20}))
    batch = [{"query": QUERIES[0]}, {"query": QUERIES[1], "retrievers": ["a", "b"]}, {"query": QUERIES[2]}]
    r = await gateway.search_batch({"searches": batch})
    asked, spared, also = r.responses
    for item in (asked, also):
        assert item.degraded and item.retrievers["c"].status == "timeout" and item.results
    assert not spared.degraded and spared.retrievers["c"].status == "skipped"
    await asyncio.sleep(0)
    assert hanging.started == hanging.cancelled == 1 and handles["c"].responses[0].cancelled


async def test_one_call_records_one_breaker_outcome_and_takes_one_slot(replicas):
    gateway, _ = gateway_over({**replicas, "c": Broken()}, make_config(c={"circuit_breaker": {"failures": 2}}))
    await gateway.search_batch({"searches": [{"query": q} for q in QUERIES]})
    assert gateway.lanes["c"].breaker.consecutive_failures == 1 and gateway.lanes["c"].breaker.state == "closed"
    assert all(lane.in_flight == 0 for lane in gateway.lanes.values())


async def test_over_the_limit_is_413_naming_it_and_an_empty_batch_is_422(replicas):
    gateway, handles = gateway_over(replicas, make_config(gateway={"max_batch_searches": 3}))
    with pytest.raises(PayloadTooLarge, match=r"4 searches; the limit is 3 \(gateway.max_batch_searches\)"):
        await gateway.search_batch({"searches": [{"query": "x"}] * 4})
    assert searches(handles["a"]) == []
    with TestClient(build_api(gateway)) as http:
        too_many = http.post("/v1/search/batch", json={"searches": [{"query": "x"}] * 4})
        assert too_many.status_code == 413 and "the limit is 3" in too_many.json()["detail"]
        empty = http.post("/v1/search/batch", json={"searches": []})
        assert empty.status_code == 422 and empty.json()["detail"][0]["loc"] == ["body", "searches"]
        assert http.post("/v1/search/batch", json={"queries": ["x"]}).status_code == 422


def test_over_http_a_mixed_batch_is_200_item_by_item_and_the_schema_states_the_items(replicas):
    gateway, _ = gateway_over({**replicas, "c": Broken()})
    with TestClient(build_api(gateway)) as http:
        r = http.post("/v1/search/batch", json={"searches": [
            {"query": QUERIES[0]}, {"query": ""}, {"query": QUERIES[1], "retrievers": ["c"]}, {"query": QUERIES[2]},
        ]})
        assert r.status_code == 200
        body = r.json()
        assert [item["status"] for item in body["responses"]] == [200, 422, 503, 200]
        assert body["responses"][0]["query"] == QUERIES[0] and body["responses"][3]["results"]
        assert set(body["responses"][1]) >= {"status", "error"} and "detail" in body["responses"][1]["error"]
        schema = http.get("/openapi.json").json()["components"]["schemas"]
    searches_schema = schema["BatchSearchRequest"]["properties"]["searches"]
    # any value: a bad search is answered 422 in its place, so the schema must not refuse the batch for it
    assert "$ref" not in searches_schema["items"] and "SearchRequest" in searches_schema["items"]["description"]
    assert searches_schema["maxItems"] == 64
    items = schema["BatchSearchResponse"]["properties"]["responses"]["items"]
    assert set(items["discriminator"]["mapping"]) == {"200", "422", "503"}


async def test_a_disabled_service_answers_every_item_empty():
    gateway, handles = gateway_over({"a": Hanging(), "b": Hanging(), "c": Hanging()},
                                    make_config().model_copy(update={"enabled": False}))
    r = await gateway.search_batch({"searches": [{"query": "x"}, {"query": ""}]})
    assert [item.status for item in r.responses] == [200, 422] and r.responses[0].results == []
    assert all(searches(h) == [] for h in handles.values())


# -- the parts below the gateway ---------------------------------------------------------------
async def test_the_encoder_gets_one_call_for_every_text_of_a_batch(embedder):
    encoder = FakeHandle(FakeEncoder(embedder))
    lane = EncoderLane("default", encoder, max_batch_size=2, max_concurrent=1)
    vectors = await lane.encode_many(["a", "b", "c"], timeout_s=5)
    assert [args[0] for method, args in encoder.calls] == [["a", "b", "c"]]
    assert set(vectors) == {"a", "b", "c"} and vectors["a"].shape == (embedder.dim,)


async def test_a_group_goes_whole_and_single_requests_still_share_calls_up_to_the_limit():
    sent: list[list[str]] = []
    gate = asyncio.Event()

    async def send(items, deadline):
        sent.append(list(items))
        await gate.wait()
        return [x.upper() for x in items]

    batcher: Batcher[str, str] = Batcher(send, max_batch_size=3, max_concurrent=1)
    deadline = now() + 5
    first = asyncio.ensure_future(batcher.submit_many(["a"], deadlines=[deadline]))
    await asyncio.sleep(0)
    group = asyncio.ensure_future(batcher.submit_many(list("bcdef"), deadlines=[deadline] * 5))
    singles = [asyncio.ensure_future(batcher.submit_many([x], deadlines=[deadline])) for x in "gh"]
    await asyncio.sleep(0)
    gate.set()
    assert await group == list("BCDEF") and await first == ["A"] and [await s for s in singles] == [["G"], ["H"]]
    assert sent == [["a"], list("bcdef"), ["g", "h"]]
