"""RagClient without a network or Ray: HTTP through `httpx.MockTransport` (and the real HTTP app on
fake handles through `httpx.ASGITransport`), the handle client on fake handles, and `ragfan query`.

Each HTTP case runs the sync and the async path: they must map every answer the same way.
"""

from __future__ import annotations

import asyncio
import functools
import json
from pathlib import Path

import httpx
import pytest
from ray.exceptions import ActorDiedError, RayTaskError

import serve_app.client
from actors.errors import (
    InvalidRequest,
    MalformedRequest,
    NoRetrieverAvailable,
    Overloaded,
    PayloadTooLarge,
    RagError,
    Unauthorized,
)
from actors.synthetic import SyntheticRetriever
from serve_app.cli import main
from serve_app.client import RagClient
from serve_app.config import parse_config
from serve_app.gateway import Gateway
from serve_app.http import build_api, digest
from serve_app.schemas import SearchResponse
from serve_app.testing import FakeHandle

URL = "http://ragfan.test/guard"
ANSWER = {
    "query": "vitamin d",
    "results": [{"id": "d1", "text": "Vitamin D deficiency\nand MS", "score": 0.03, "metadata": {},
                 "sources": [{"retriever": "dense", "rank": 1, "score": 0.8}]}],
    "retrievers": {"dense": {"status": "ok", "latency_ms": 12.5, "num_hits": 1},
                   "graph": {"status": "timeout", "latency_ms": 300.0, "num_hits": 0, "error": "no answer"}},
    "degraded": True,
    "latency_ms": 301.0,
}
REASONS = {"dense": {"status": "error", "error": "RetrieverFailed: index file is corrupt"},
           "graph": {"status": "skipped", "error": "circuit open"}}


class Server:
    """Answers each request with the next of `answers` (the last one repeats) and records the requests.
    An answer is an httpx.Response, or an exception to raise as the network would."""

    def __init__(self, *answers: httpx.Response | Exception) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers[min(len(self.requests), len(self.answers)) - 1]
        if isinstance(answer, Exception):
            raise answer
        # a copy: httpx binds a response's stream to the client that received it
        return httpx.Response(answer.status_code, headers=answer.headers, content=answer.read())

    def client(self, **options) -> RagClient:
        return RagClient(url=URL, transport=httpx.MockTransport(self), **options)


def ok() -> httpx.Response:
    return httpx.Response(200, json=ANSWER)


def error(status: int, detail, **headers) -> httpx.Response:
    return httpx.Response(status, json={"detail": detail}, headers=headers)


def dropped(exc_type: type[httpx.TransportError]) -> httpx.TransportError:
    return exc_type("the connection went away", request=httpx.Request("POST", URL))


@pytest.fixture(params=["sync", "async"])
def search(request):
    """client, **kwargs -> the response, through search() or search_async()."""
    if request.param == "sync":
        return lambda client, query="vitamin d", **kw: client.search(query, **kw)
    return lambda client, query="vitamin d", **kw: asyncio.run(client.search_async(query, **kw))


# -- answers ------------------------------------------------------------------------------------
def test_an_answer_is_the_typed_response_and_the_request_is_what_was_asked(search):
    server = Server(ok())
    r = search(server.client(api_key="k-1"), "vitamin D\x97deficiency", top_k=3, retrievers=["dense"],
               filters={"domain": "neuro"})
    assert isinstance(r, SearchResponse) and r.results[0].id == "d1" and r.retrievers["graph"].status == "timeout"
    (sent,) = server.requests
    assert (sent.method, sent.url.path) == ("POST", "/guard/v1/search")
    assert sent.headers["authorization"] == "Bearer k-1"
    # validated and cleaned as the gateway would; unset options are left to the server's defaults
    assert json.loads(sent.content) == {"query": "vitamin D deficiency", "top_k": 3, "retrievers": ["dense"],
                                        "filters": {"domain": "neuro"}}


@pytest.mark.parametrize(("kwargs", "field"), [({"top_k": 0}, "top_k"), ({"query": " \x00\x07 "}, "query"),
                                               ({"fusion": {"method": "nope"}}, "fusion")])
def test_an_invalid_request_is_refused_before_anything_is_sent(search, kwargs, field):
    server = Server(ok())
    with pytest.raises(InvalidRequest) as info:
        search(server.client(), **kwargs)
    assert info.value.errors[0]["loc"][:2] == ["body", field] and not server.requests


# -- every status maps back to its error ----------------------------------------------------------
def test_422_is_invalid_request_with_the_servers_errors(search):
    errors = [{"loc": ["body", "retrievers"], "msg": "unknown retriever(s) 'zzz'; valid: a, b", "type": "value_error"}]
    with pytest.raises(InvalidRequest) as info:
        search(Server(error(422, errors)).client())
    assert type(info.value) is InvalidRequest and info.value.errors == errors
    assert info.value.message == "retrievers: unknown retriever(s) 'zzz'; valid: a, b"


@pytest.mark.parametrize(("status", "error_type"), [(400, MalformedRequest), (401, Unauthorized),
                                                    (413, PayloadTooLarge)])
def test_400_401_413_are_their_errors_with_the_servers_message(search, status, error_type):
    server = Server(error(status, "what was wrong"))
    with pytest.raises(error_type) as info:
        search(server.client())
    assert type(info.value) is error_type and info.value.message == "what was wrong"
    assert len(server.requests) == 1


def test_503_with_ragfans_body_is_no_retriever_available_with_each_reason(search):
    body = {"message": "no selected retriever answered", "retrievers": REASONS}
    server = Server(error(503, body, **{"Retry-After": "7"}))
    with pytest.raises(NoRetrieverAvailable) as info:
        search(server.client())
    assert info.value.reasons == REASONS and info.value.retry_after_s == 7
    assert info.value.message == "no selected retriever answered" and len(server.requests) == 1


def test_any_other_503_is_overloaded_with_retry_after(search):
    # Serve's backpressure: the proxy refuses before ragfan sees the request, with a plain-text body
    server = Server(httpx.Response(503, text="Service Unavailable", headers={"Retry-After": "2"}))
    with pytest.raises(Overloaded) as info:
        search(server.client())
    assert type(info.value) is Overloaded and info.value.retry_after_s == 2 and "retry after 2 s" in info.value.message
    assert len(server.requests) == 1


# -- the retry-once rule ----------------------------------------------------------------------------
@pytest.mark.parametrize("first", [
    dropped(httpx.ConnectError), dropped(httpx.ReadError), dropped(httpx.RemoteProtocolError),
    httpx.Response(500, text="Internal Server Error"), httpx.Response(502, text="Bad Gateway"),
    httpx.Response(504, text="Gateway Timeout"),
], ids=["connect", "read", "remote-protocol", "500", "502", "504"])
def test_a_search_lost_on_the_way_is_sent_once_more(search, first):
    server = Server(first, ok())
    assert search(server.client()).results[0].id == "d1"
    assert len(server.requests) == 2 and server.requests[0].content == server.requests[1].content


@pytest.fixture
def pauses(monkeypatch) -> list[float]:
    """A clock that moves only when the client waits before a retry; the waits, in order."""
    waited: list[float] = []
    now = [100.0]

    def wait(seconds: float) -> None:
        waited.append(seconds)
        now[0] += seconds

    async def wait_async(seconds: float) -> None:
        wait(seconds)

    monkeypatch.setattr(serve_app.client, "_clock", lambda: now[0])
    monkeypatch.setattr(serve_app.client, "_sleep", wait)
    monkeypatch.setattr(serve_app.client, "_sleep_async", wait_async)
    return waited


@pytest.mark.parametrize("failure", [httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError])
def test_a_search_whose_connection_keeps_failing_is_retried_with_backoff_until_timeout(search, pauses, failure):
    server = Server(dropped(failure))
    with pytest.raises(failure):
        search(server.client(timeout_s=4.0))
    # 0.05 s, doubling up to 1 s, while the waits fit in timeout_s: 0.05+0.1+0.2+0.4+0.8+1+1 = 3.55 s
    assert pauses == [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0] and len(server.requests) == len(pauses) + 1


def test_a_search_answers_once_the_ingress_is_back(search, pauses):
    server = Server(*[dropped(httpx.ConnectError)] * 5, ok())  # refused while the ingress restarts
    assert search(server.client(timeout_s=10)).results[0].id == "d1"
    assert len(server.requests) == 6 and pauses == [0.05, 0.1, 0.2, 0.4, 0.8]
    batch = Server(dropped(httpx.ConnectError), batch_answer({**ANSWER, "status": 200}))
    assert batch.client().search_batch(["vitamin d"])[0].results[0].id == "d1"  # a batch is read-only too
    assert len(batch.requests) == 2


def test_a_write_whose_connection_fails_twice_raises_httpx_error(pauses):
    server = Server(dropped(httpx.ConnectError))
    with pytest.raises(httpx.ConnectError):
        server.client(timeout_s=60).delete(["d1"])
    assert len(server.requests) == 2 and pauses == [0.0]  # once more at once, as any lost call


def test_a_5xx_that_persists_raises_rag_error_with_status_and_body(search):
    server = Server(httpx.Response(502, text="upstream   replica\n died"))
    with pytest.raises(RagError) as info:
        search(server.client())
    assert type(info.value) is RagError and len(server.requests) == 2
    assert info.value.message == f"ragfan at {URL} answered HTTP 502 Bad Gateway: upstream replica died"


@pytest.mark.parametrize("answer", [
    error(500, "ragfan's own failure"),  # the gateway answered: the same search would fail again
    error(503, {"message": "none", "retrievers": REASONS}), error(422, []), error(401, "no key"),
    httpx.Response(404, text="Not Found"), dropped(httpx.ReadTimeout),  # a timeout would double the wait
], ids=["ragfan-500", "503", "422", "401", "404", "timeout"])
def test_anything_else_is_not_retried(search, answer):
    server = Server(answer, ok())
    with pytest.raises((RagError, httpx.ReadTimeout)):
        search(server.client())
    assert len(server.requests) == 1


# -- connections ----------------------------------------------------------------------------------
def test_the_client_closes_its_pools_on_exit():
    server = Server(ok())
    with server.client() as client:
        client.search("x")
    assert client._transport._client.is_closed

    async def use() -> RagClient:
        async with server.client() as client:
            await client.search_async("x")
        assert client._transport._async.is_closed
        return client

    asyncio.run(use())


def test_the_async_pool_follows_the_event_loop_it_is_used_on():
    client = Server(ok()).client()
    for _ in range(2):  # a pool's connections belong to one loop: a second asyncio.run needs its own
        assert asyncio.run(client.search_async("x")).results


def test_a_handle_client_takes_no_api_key():
    with pytest.raises(ValueError, match="pass url="):
        RagClient(api_key="k")


async def test_a_handle_client_connects_on_its_first_call_not_before(monkeypatch):
    joined = []
    gateways = Gateways()

    def app_handle(app_name, address):
        joined.append((app_name, address))
        return FakeHandle(gateways)

    monkeypatch.setattr(serve_app.client, "app_handle", app_handle)
    client = RagClient("docs", address="ray://head:10001")
    await client.aclose()  # nothing to close yet, and closing connects nothing
    assert joined == [] and gateways.calls == 0
    assert (await client.search_async("vitamin d")).query == "vitamin d"
    assert (await client.search_async("aspirin")).query == "aspirin"
    assert joined == [("docs", "ray://head:10001")] and gateways.calls == 2  # joined once, on the first call


# -- against the real HTTP app, on fake handles ----------------------------------------------------
@pytest.fixture
def app(docs):
    config = parse_config({"retrievers": [{"name": n, "kind": "synthetic", "data": "unused.jsonl"} for n in "ab"]},
                          base_dir=Path("."))
    gateway = Gateway(config, {n: [FakeHandle(SyntheticRetriever(name=n, documents=docs))] for n in "ab"})
    return build_api(gateway, key_digests=[digest("k-1")])


async def test_the_real_app_answers_and_its_errors_map_back(app):
    transport = httpx.ASGITransport(app=app)
    async with RagClient(url="http://app", api_key="k-1", transport=transport) as client:
        r = await client.search_async("vitamin D\x00deficiency\x85and multiple sclerosis", top_k=2)
        assert r.query == "vitamin D deficiency and multiple sclerosis" and r.results[0].id == "d1"
        with pytest.raises(InvalidRequest) as info:
            await client.search_async("x", retrievers=["zzz"])
        assert info.value.errors[0]["loc"] == ["body", "retrievers"] and "valid: a, b" in info.value.message
    async with RagClient(url="http://app", api_key="wrong", transport=transport) as client:
        with pytest.raises(Unauthorized):
            await client.search_async("x")


# -- through a handle -----------------------------------------------------------------------------
class Gateways:
    """A gateway's `search` for FakeHandle: the first `die` calls fail as a dead replica's would."""

    def __init__(self, die: int = 0, error: Exception | None = None) -> None:
        self.die, self.error, self.calls = die, error, 0

    async def search(self, request):
        self.calls += 1
        if self.calls <= self.die:
            raise ActorDiedError()
        if self.error is not None:
            raise self.error
        return SearchResponse.model_validate({**ANSWER, "query": request.query})


async def test_the_handle_client_sends_once_more_when_the_gateway_replica_died():
    gateways = Gateways(die=1)
    r = await RagClient.from_handle(FakeHandle(gateways)).search_async("vitamin D\x07deficiency")
    assert r.query == "vitamin D deficiency" and gateways.calls == 2
    gateways = Gateways(die=2)
    with pytest.raises(ActorDiedError):
        await RagClient.from_handle(FakeHandle(gateways)).search_async("x")
    assert gateways.calls == 2


async def test_the_handle_client_raises_ragfans_error_from_inside_rays_wrapper():
    reasons_error = NoRetrieverAvailable("none answered", REASONS, retry_after_s=4)
    wrapped = RayTaskError("search", "traceback", reasons_error)
    gateways = Gateways(error=wrapped)
    with pytest.raises(NoRetrieverAvailable) as info:
        await RagClient.from_handle(FakeHandle(gateways)).search_async("x")
    assert info.value.reasons == REASONS and info.value.retry_after_s == 4 and gateways.calls == 1


# -- ragfan query --------------------------------------------------------------------------------
@pytest.fixture
def serve(monkeypatch):
    """serve(*answers): `ragfan query --url URL` from now on talks to a Server with those answers."""
    def install(*answers) -> Server:
        server = Server(*answers)
        mock = functools.partial(RagClient, transport=httpx.MockTransport(server))
        monkeypatch.setattr(serve_app.client, "RagClient", mock)
        return server
    return install


def query(*args: str) -> int:
    return main(["query", "vitamin d", "--url", URL, *args])


def test_query_prints_the_fused_results(serve, capsys):
    server = serve(ok())
    assert query("--api-key", "k-1", "--top-k", "3", "--filter", "domain=neuro", "--retrievers", "dense, graph") == 0
    assert json.loads(server.requests[0].content) == {"query": "vitamin d", "top_k": 3,
                                                       "retrievers": ["dense", "graph"], "filters": {"domain": "neuro"}}
    out = capsys.readouterr().out
    assert "dense#1" in out and "Vitamin D deficiency and MS" in out and "degraded: yes" in out


def test_query_json_prints_the_response(serve, capsys):
    serve(ok())
    assert query("--json") == 0
    assert SearchResponse.model_validate_json(capsys.readouterr().out) == SearchResponse.model_validate(ANSWER)


@pytest.mark.parametrize(("answer", "code", "lines"), [
    (error(401, "missing key"), 2, ["ragfan: error: the service needs an API key: pass --api-key or set "
                                    "RAGFAN_API_KEY"]),
    (error(422, [{"loc": ["body", "retrievers"], "msg": "unknown retriever(s) 'zzz'", "type": "value_error"},
                 {"loc": ["body", "top_k"], "msg": "too many", "type": "value_error"}]), 2,
     ["ragfan: invalid request: retrievers: unknown retriever(s) 'zzz'", "ragfan: invalid request: top_k: too many"]),
    (error(503, {"message": "no selected retriever answered", "retrievers": REASONS}), 1,
     ["ragfan: unavailable: no selected retriever answered", "  dense: error: RetrieverFailed: index file is corrupt",
      "  graph: skipped: circuit open"]),
    (httpx.Response(503, text="Service Unavailable", headers={"Retry-After": "3"}), 1,
     [f"ragfan: error: ragfan at {URL} is overloaded: retry after 3 s"]),
    (httpx.Response(502, text="Bad Gateway"), 1, [f"ragfan: error: ragfan at {URL} answered HTTP 502 Bad Gateway: "
                                                  "Bad Gateway"]),
    (dropped(httpx.ConnectError), 1, [f"ragfan: error: cannot reach ragfan at {URL} (the connection went away). "
                                      "Is `make serve` running?"]),
], ids=["401", "422", "503-ragfan", "503-overloaded", "502", "unreachable"])
def test_query_says_what_went_wrong(serve, capsys, answer, code, lines):
    serve(answer)
    assert query() == code
    assert capsys.readouterr().err.splitlines() == lines


def test_query_checks_the_request_before_sending_it(serve, capsys):
    server = serve(ok())
    assert query("--top-k", "0") == 2
    assert capsys.readouterr().err.startswith("ragfan: invalid request: top_k: ") and not server.requests



# -- batches ------------------------------------------------------------------------------------
def batch_answer(*items) -> httpx.Response:
    return httpx.Response(200, json={"responses": list(items), "latency_ms": 5.0})


FAILED_ITEM = {"status": 503, "error": {"detail": {"message": "no selected retriever answered", "retrievers": REASONS}},
               "retry_after_s": 3}


@pytest.fixture(params=["sync", "async"])
def search_batch(request):
    """client, searches, **kwargs -> the results, through search_batch() or search_batch_async()."""
    if request.param == "sync":
        return lambda client, searches, **kw: client.search_batch(searches, **kw)
    return lambda client, searches, **kw: asyncio.run(client.search_batch_async(searches, **kw))


def test_a_batch_answers_each_search_typed_in_order_and_bad_ones_are_not_sent(search_batch):
    server = Server(batch_answer({**ANSWER, "status": 200}, FAILED_ITEM, {**ANSWER, "query": "p53", "status": 200}))
    results = search_batch(server.client(), ["vitamin d", " \x00 ", "aspirin", {"query": "p53", "top_k": 2}], top_k=3)
    assert [type(r) for r in results] == [SearchResponse, InvalidRequest, NoRetrieverAvailable, SearchResponse]
    assert results[0].results[0].id == "d1" and results[3].query == "p53"
    assert results[1].errors[0]["loc"] == ["body", "query"]  # refused here, as search() refuses it
    assert results[2].reasons == REASONS and results[2].retry_after_s == 3
    [sent] = server.requests
    assert sent.url.path == "/guard/v1/search/batch"
    assert json.loads(sent.content)["searches"] == [
        {"query": "vitamin d", "top_k": 3}, {"query": "aspirin", "top_k": 3}, {"query": "p53", "top_k": 2},
    ]


def test_a_batch_item_422_is_the_servers_invalid_request(search_batch):
    detail = [{"loc": ["body", "retrievers"], "msg": "unknown retriever(s) 'x'", "type": "value_error"}]
    server = Server(batch_answer({"status": 422, "error": {"detail": detail}}))
    [result] = search_batch(server.client(), [{"query": "q", "retrievers": ["x"]}])
    assert isinstance(result, InvalidRequest) and result.errors == detail


def test_a_batch_over_the_limit_raises_and_an_all_bad_batch_sends_nothing(search_batch):
    server = Server(error(413, "the batch has 65 searches; the limit is 64 (gateway.max_batch_searches)"))
    with pytest.raises(PayloadTooLarge, match="the limit is 64"):
        search_batch(server.client(), ["q"] * 65)
    server = Server(ok())
    assert [type(r) for r in search_batch(server.client(), ["", " "])] == [InvalidRequest, InvalidRequest]
    assert server.requests == []


def test_a_batch_lost_on_the_way_is_sent_once_more(search_batch):
    server = Server(dropped(httpx.ConnectError), batch_answer({**ANSWER, "status": 200}))
    assert isinstance(search_batch(server.client(), ["q"])[0], SearchResponse) and len(server.requests) == 2


async def test_the_real_app_and_a_handle_answer_a_batch_the_same(app, docs):
    async with RagClient(url="http://app", api_key="k-1", transport=httpx.ASGITransport(app=app)) as client:
        over_http = await client.search_batch_async(["vitamin d", "", {"query": "x", "retrievers": ["zzz"]}], top_k=2)
    config = parse_config({"retrievers": [{"name": n, "kind": "synthetic", "data": "unused.jsonl"} for n in "ab"]},
                          base_dir=Path("."))
    gateway = Gateway(config, {n: [FakeHandle(SyntheticRetriever(name=n, documents=docs))] for n in "ab"})
    handle = FakeHandle(gateway)
    through_handle = await RagClient.from_handle(handle).search_batch_async(
        ["vitamin d", "", {"query": "x", "retrievers": ["zzz"]}], top_k=2
    )
    assert [name for name, _ in handle.calls] == ["search_batch"]
    for results in (over_http, through_handle):
        assert [type(r) for r in results] == [SearchResponse, InvalidRequest, InvalidRequest]
        assert results[0].results[0].id == "d1" and "valid: a, b" in results[2].message
    assert [r.id for r in over_http[0].results] == [r.id for r in through_handle[0].results]


def test_query_file_prints_a_block_per_line_in_batches_of_64_and_fails_if_any_failed(serve, capsys, tmp_path):
    lines = [f"query {i}" for i in range(70)]
    path = tmp_path / "queries.txt"
    path.write_text("\n".join(lines[:3] + ["", "  "] + lines[3:]) + "\n", encoding="utf-8")
    first = [{**ANSWER, "query": q, "status": 200} for q in lines[:64]]
    first[1] = FAILED_ITEM
    server = serve(batch_answer(*first), batch_answer(*({**ANSWER, "query": q, "status": 200} for q in lines[64:])))
    assert main(["query", "--file", str(path), "--url", URL]) == 1
    assert [len(json.loads(r.content)["searches"]) for r in server.requests] == [64, 6]
    out = capsys.readouterr().out
    assert out.count("degraded: yes") == 69 and "== 70. query 69" in out
    assert "== 2. query 1\nragfan: unavailable: no selected retriever answered" in out


def test_query_wants_a_query_or_a_file(serve, capsys):
    serve(ok())
    assert main(["query", "--url", URL]) == 2
    assert "give a query, or --file" in capsys.readouterr().err
