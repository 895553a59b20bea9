"""POST /v1/search/batch against the live default app (five real retrievers): over plain HTTP, and
through both clients, which answer each search as a single search would."""

from __future__ import annotations

import pytest
from ray import serve

from actors.errors import InvalidRequest
from serve_app.client import RagClient
from serve_app.schemas import SearchResponse

QUERIES = ["vitamin D and multiple sclerosis", "metformin and type 2 diabetes", "aspirin and colorectal cancer"]


def test_a_mixed_batch_is_answered_item_by_item_over_http(base_url, http):
    r = http.post(f"{base_url}/v1/search/batch", json={"searches": [
        {"query": QUERIES[0], "top_k": 3}, {"query": ""}, {"query": QUERIES[1], "retrievers": ["nope"]},
        {"query": QUERIES[2], "retrievers": ["keyword"]},
    ]})
    assert r.status_code == 200, r.text
    items = r.json()["responses"]
    assert [item["status"] for item in items] == [200, 422, 422, 200]
    assert items[0]["query"] == QUERIES[0] and len(items[0]["results"]) == 3
    assert items[1]["error"]["detail"][0]["loc"] == ["body", "query"]
    assert {n for n, s in items[3]["retrievers"].items() if s["status"] != "skipped"} == {"keyword"}
    too_many = http.post(f"{base_url}/v1/search/batch", json={"searches": [{"query": "x"}] * 65})
    assert too_many.status_code == 413 and "the limit is 64" in too_many.json()["detail"]


@pytest.mark.parametrize("transport", ["http", "handle"])
async def test_both_clients_answer_a_batch_as_single_searches(base_url, transport):
    client = RagClient(url=base_url) if transport == "http" else RagClient.from_handle(serve.get_app_handle("ragfan"))
    async with client:
        results = await client.search_batch_async([*QUERIES, " "], top_k=5, retrievers=["keyword", "persona"])
        singles = [await client.search_async(q, top_k=5, retrievers=["keyword", "persona"]) for q in QUERIES]
    assert [type(r) for r in results] == [SearchResponse] * 3 + [InvalidRequest]
    for batched, single in zip(results, singles, strict=False):
        assert [x.id for x in batched.results] == [x.id for x in single.results] and batched.results
