"""POST /v1/search/batch against the live default app (five real retrievers): over plain HTTP, and
through both clients, which answer each search as a single search would."""

from __future__ import annotations

import httpx
import pytest
from ray import serve

from actors.errors import InvalidRequest
from serve_app.client import RagClient
from serve_app.schemas import SearchRequest, SearchResponse

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
    """Both the batch and the single searches go uncached (`cache: false`): answered from the result
    cache, the singles would repeat what the batch had just put there, and compare the batch with itself."""
    handle = serve.get_app_handle("ragfan")
    client = RagClient(url=base_url) if transport == "http" else RagClient.from_handle(handle)
    options = {"top_k": 5, "retrievers": ["keyword", "persona"], "cache": False}
    async with client:
        results = await client.search_batch_async([*({"query": q, **options} for q in QUERIES), {"query": " "}])
    singles = []
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as http:
        for q in QUERIES:  # each as a single search, the same way: the handle's `search`, or POST /v1/search
            if transport == "http":
                r = await http.post("/v1/search", json={"query": q, **options})
                assert r.status_code == 200, r.text
                singles.append(SearchResponse.model_validate(r.json()))
            else:
                singles.append(await handle.search.remote(SearchRequest(query=q, **options)))
    assert [type(r) for r in results] == [SearchResponse] * 3 + [InvalidRequest]
    for batched, single in zip(results, singles, strict=False):
        assert {s.cache for s in [*batched.retrievers.values(), *single.retrievers.values()]} <= {"off", None}
        assert [x.id for x in batched.results] == [x.id for x in single.results] and batched.results
