"""Both clients against the real cluster: RagClient(url=...) over Serve's HTTP proxy and RagClient on
the app's handle answer with the same responses and raise the same errors; and messy text (C0 and C1
control characters inside real sentences) is served over HTTP, through both clients, through
`ragfan query`, and in `ragfan eval`.
"""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest
from ray import serve

from actors.errors import InvalidRequest, NoRetrieverAvailable, Overloaded, Unauthorized
from serve_app.cli import main
from serve_app.client import RagClient
from serve_app.schemas import SearchResponse
from tests.integration.conftest import API_KEY, TINYBEIR, held, holding, wait_until_async

# (what is sent, what is searched): each control character becomes a space
MESSY = [
    ("vitamin D\x00deficiency and multiple sclerosis", "vitamin D deficiency and multiple sclerosis"),
    ("does aspirin\x07 reduce the risk of colorectal cancer", "does aspirin  reduce the risk of colorectal cancer"),
    ("metformin lowers\x85blood glucose in type 2 diabetes", "metformin lowers blood glucose in type 2 diabetes"),
    ("vitamin D\u0097deficiency and multiple sclerosis", "vitamin D deficiency and multiple sclerosis"),  # cp1252 —
]
IDS = ["U+0000", "U+0007", "U+0085", "U+0097"]


def served(r: SearchResponse, searched: str) -> None:
    assert r.query == searched and r.results, r
    assert not [n for n, s in r.retrievers.items() if s.status == "error"], r.retrievers  # none choked on it


@pytest.fixture(scope="module")
def handle_client(base_url) -> RagClient:
    return RagClient.from_handle(serve.get_app_handle("ragfan"))


@pytest.fixture(scope="module")
def http_client(base_url):
    with RagClient(url=base_url) as client:
        yield client


# -- messy text ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("query", "searched"), MESSY, ids=IDS)
def test_messy_text_is_served_through_both_clients(http_client, handle_client, query, searched):
    served(http_client.search(query, top_k=5), searched)
    served(handle_client.search(query, top_k=5), searched)

    async def both_async() -> list[SearchResponse]:
        return list(await asyncio.gather(http_client.search_async(query), handle_client.search_async(query)))

    for r in asyncio.run(both_async()):
        served(r, searched)


@pytest.mark.parametrize(("query", "searched"), MESSY, ids=IDS)
def test_messy_text_is_served_over_plain_http(base_url, http, query, searched):
    # the controls go over the wire as they are (JSON escapes for C0, UTF-8 for C1): the server cleans them
    r = http.post(f"{base_url}/v1/search", json={"query": query, "top_k": 5})
    assert r.status_code == 200, r.text
    served(SearchResponse.model_validate(r.json()), searched)


@pytest.mark.parametrize(("query", "searched"), MESSY, ids=IDS)
def test_messy_text_is_served_through_ragfan_query(base_url, capsys, query, searched):
    assert main(["query", query, "--url", base_url, "--top-k", "5", "--json"]) == 0
    served(SearchResponse.model_validate_json(capsys.readouterr().out), searched)


def test_ragfan_eval_scores_messy_queries(cluster, tmp_path, monkeypatch, capsys):
    """tinybeir with a control character inside four of its judged queries: every query is searched."""
    monkeypatch.setenv("RAGFAN_CACHE_DIR", str(tmp_path / "cache"))
    dataset = tmp_path / "messybeir"
    shutil.copytree(TINYBEIR, dataset)
    queries = [json.loads(line) for line in (dataset / "queries.jsonl").read_text().splitlines()]
    for q, control in zip(queries[:4], ["\x00", "\x07", "\x85", "\u0097"], strict=True):
        q["text"] = q["text"].replace(" ", control, 1)
    (dataset / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries), encoding="utf-8")
    assert "\\u0097" in (dataset / "queries.jsonl").read_text()
    out = tmp_path / "report.json"
    assert main(["eval", str(dataset), "--ignore-identical-ids", "--concurrency", "4", "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["num_queries"] == 8
    assert report["failed_queries"] == {"dense": 0, "keyword": 0, "fused": 0}, report.get("failures")
    # as good as the clean dataset (test_quality.py): the cleaned queries find their abstracts
    assert report["metrics"]["dense"]["nDCG@10"] > 0.8 and report["metrics"]["fused"]["RR@10"] > 0.8
    assert "messybeir" in capsys.readouterr().out


# -- the same errors either way ----------------------------------------------------------------------
def test_invalid_requests_raise_the_same_error_through_both_clients(http_client, handle_client):
    errors = []
    for client in (http_client, handle_client):
        with pytest.raises(InvalidRequest) as info:
            client.search("vitamin d", retrievers=["corpus", "nope"])
        errors.append(info.value.errors)
        with pytest.raises(InvalidRequest, match="query must contain text"):
            client.search(" \x00\x97 ")  # refused by the client itself: nothing left to search
    assert errors[0] == errors[1] and errors[0][0]["loc"] == ["body", "retrievers"]


def test_keys_and_unavailable_retrievers_raise_the_same_errors_through_both_clients(guard_url):
    with RagClient(url=guard_url) as anonymous, pytest.raises(Unauthorized):
        anonymous.search("vitamin d")
    with RagClient(url=guard_url, api_key="not-the-key") as wrong, pytest.raises(Unauthorized):
        wrong.search("vitamin d")
    raised = []
    with RagClient(url=guard_url, api_key=API_KEY) as client:
        assert client.search("vitamin d", retrievers=["steady"]).results
        for c in (client, RagClient.from_handle(serve.get_app_handle("guard"))):
            with pytest.raises(NoRetrieverAvailable) as info:
                c.search("vitamin d", retrievers=["broken"])
            raised.append(info.value)
    assert [set(e.reasons) for e in raised] == [{"broken"}, {"broken"}]
    assert {e.reasons["broken"]["status"] for e in raised} <= {"error", "skipped"}
    assert raised[0].retry_after_s == raised[1].retry_after_s >= 1


async def test_serves_backpressure_is_overloaded_with_its_retry_after(tight_url):
    # the tight app runs 2 searches and queues 2; Serve's proxy refuses the rest (503, not JSON)
    async with RagClient(url=tight_url) as client:
        with holding("slowish"):  # the two it runs wait in the retriever until the refusals are in
            calls = [asyncio.ensure_future(client.search_async("vitamin d")) for _ in range(12)]
            await wait_until_async(lambda: held("slowish") == 2 and sum(c.done() for c in calls) >= 8, 90)
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
    refused = [o for o in outcomes if isinstance(o, Exception)]
    assert refused and all(type(o) is Overloaded and o.retry_after_s == 2 for o in refused), refused
    assert any(isinstance(o, SearchResponse) for o in outcomes)
