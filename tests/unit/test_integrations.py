"""The framework adapters without a network or Ray: RagClient over `httpx.MockTransport` (and once over
the real gateway on fake handles), through each adapter's sync and async path.

What every adapter owes: ragfan's results as its framework's documents with the same metadata, the
search options it was given (and a call's overrides) sent, a degraded answer in the metadata and
logged once, ragfan's own errors raised, async that never blocks the loop, and an ImportError that
names the extra when its framework is missing.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from haystack.utils import Secret
from llama_index.core.schema import MetadataMode
from llama_index.core.vector_stores.types import FilterCondition, FilterOperator, MetadataFilter, MetadataFilters

from actors.errors import InvalidRequest, NoRetrieverAvailable
from actors.synthetic import SyntheticRetriever
from serve_app.client import RagClient
from serve_app.config import parse_config
from serve_app.gateway import Gateway
from serve_app.integrations import common
from serve_app.integrations import haystack as hs
from serve_app.integrations import langchain as lc
from serve_app.integrations import llama_index as li
from serve_app.testing import FakeHandle

URL = "http://ragfan.test"
KINDS = ["langchain", "llama_index", "haystack"]
FRAMEWORKS = ["langchain_core", "llama_index", "haystack", "langchain_tests"]


def answer(degraded: bool = False, **retrievers: dict) -> dict:
    return {
        "query": "vitamin d",
        "results": [
            {"id": "d1", "text": "Vitamin D deficiency and MS", "score": 0.032, "metadata": {"domain": "neuro"},
             "sources": [{"retriever": "dense", "rank": 1, "score": 0.8}, {"retriever": "keyword", "rank": 3,
                                                                           "score": 7.5}]},
            {"id": "d2", "text": "Sunlight and vitamin D", "score": 0.016, "metadata": {},
             "sources": [{"retriever": "keyword", "rank": 1, "score": 9.1}]},
        ],
        "retrievers": {"dense": {"status": "ok", "latency_ms": 12.5, "num_hits": 1},
                       "keyword": {"status": "ok", "latency_ms": 3.0, "num_hits": 2}, **retrievers},
        "degraded": degraded,
        "latency_ms": 15.0,
    }


class Server:
    """Answers every request with `body` (or `status` and `body`) and records what was sent."""

    def __init__(self, body: dict, status: int = 200) -> None:
        self.body, self.status = body, status
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return httpx.Response(self.status, json=self.body)

    def client(self) -> RagClient:
        return RagClient(url=URL, transport=httpx.MockTransport(self))

    def sent(self) -> list[dict]:
        return [json.loads(r.content) for r in self.requests]


def adapter(kind: str, **options: Any) -> Any:
    return {"langchain": lc.RagfanRetriever, "llama_index": li.RagfanRetriever, "haystack": hs.RagfanRetriever}[kind](
        **options)


def search(kind: str, retriever: Any, mode: str, query: str = "vitamin d") -> list[tuple[str, str, float, dict]]:
    """(id, text, score, metadata) of each document the adapter answers, through its sync or async path."""
    if kind == "langchain":
        docs = retriever.invoke(query) if mode == "sync" else asyncio.run(retriever.ainvoke(query))
        return [(d.id, d.page_content, d.metadata["ragfan_score"], d.metadata) for d in docs]
    if kind == "llama_index":
        nodes = retriever.retrieve(query) if mode == "sync" else asyncio.run(retriever.aretrieve(query))
        return [(n.node.node_id, n.node.get_content(), n.score, n.node.metadata) for n in nodes]
    out = retriever.run(query) if mode == "sync" else asyncio.run(retriever.run_async(query))
    return [(d.id, d.content, d.score, d.meta) for d in out["documents"]]


@pytest.fixture(params=KINDS)
def kind(request) -> str:
    return request.param


@pytest.fixture(params=["sync", "async"])
def mode(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def no_environment(monkeypatch):
    monkeypatch.delenv(common.URL_ENV, raising=False)
    monkeypatch.delenv(common.API_KEY_ENV, raising=False)


# -- documents -------------------------------------------------------------------------------------
def test_each_result_is_a_document_with_ragfans_metadata(kind, mode, caplog):
    server = Server(answer())
    docs = search(kind, adapter(kind, client=server.client()), mode)
    assert [(i, text, score) for i, text, score, _ in docs] == [
        ("d1", "Vitamin D deficiency and MS", 0.032), ("d2", "Sunlight and vitamin D", 0.016)]
    assert docs[0][3] == {
        "domain": "neuro",  # the document's own
        "ragfan_id": "d1",
        "ragfan_score": 0.032,
        "ragfan_sources": [{"retriever": "dense", "rank": 1, "score": 0.8},
                           {"retriever": "keyword", "rank": 3, "score": 7.5}],
        "ragfan_degraded": False,
        "ragfan_missing": {},
    }
    assert not [r for r in caplog.records if r.name == "serve_app.integrations"]


def test_the_constructors_options_are_sent(kind, mode):
    server = Server(answer())
    fusion = {"method": "rrf", "k": 30, "weights": {"dense": 2.0}}
    retriever = adapter(kind, client=server.client(), top_k=2, retrievers=["dense", "keyword"],
                        filters={"domain": "neuro"}, fusion=fusion)
    search(kind, retriever, mode, "vitamin D\x07deficiency")
    assert server.sent() == [{"query": "vitamin D deficiency", "top_k": 2, "retrievers": ["dense", "keyword"],
                              "filters": {"domain": "neuro"}, "fusion": fusion}]


def test_a_langchain_call_overrides_the_options_with_its_kwargs(mode):
    server = Server(answer())
    retriever = lc.RagfanRetriever(client=server.client(), k=5, filters={"domain": "neuro"})
    assert retriever.top_k == 5
    overrides = {"k": 2, "retrievers": ["dense"], "filters": {"domain": "onco"}, "fusion": {"method": "minmax"}}
    if mode == "sync":
        retriever.invoke("x", **overrides)
        retriever.invoke("x", top_k=3)
    else:
        asyncio.run(retriever.ainvoke("x", **overrides))
        asyncio.run(retriever.ainvoke("x", top_k=3))
    assert server.sent() == [{"query": "x", "top_k": 2, "retrievers": ["dense"], "filters": {"domain": "onco"},
                              "fusion": {"method": "minmax"}},
                             {"query": "x", "top_k": 3, "filters": {"domain": "neuro"}}]


def test_a_langchain_chain_binds_the_overrides_and_a_batch_passes_them():
    server = Server(answer())
    retriever = lc.RagfanRetriever(client=server.client())
    retriever.bind(k=3, retrievers=["dense"]).invoke("a")
    retriever.batch(["b", "c"], k=2)
    assert sorted(server.sent(), key=lambda s: s["query"]) == [
        {"query": "a", "top_k": 3, "retrievers": ["dense"]}, {"query": "b", "top_k": 2}, {"query": "c", "top_k": 2}]


def test_a_haystack_run_overrides_the_options_with_its_parameters(mode):
    server = Server(answer())
    retriever = hs.RagfanRetriever(client=server.client(), top_k=5, filters={"domain": "neuro"})
    overrides = {"top_k": 2, "retrievers": ["dense"], "filters": {"domain": "onco"}, "fusion": {"method": "dbsf"}}
    if mode == "sync":
        retriever.run("x", **overrides)
        retriever.run("x")
    else:
        asyncio.run(retriever.run_async("x", **overrides))
        asyncio.run(retriever.run_async("x"))
    assert server.sent() == [{"query": "x", "top_k": 2, "retrievers": ["dense"], "filters": {"domain": "onco"},
                              "fusion": {"method": "dbsf"}},
                             {"query": "x", "top_k": 5, "filters": {"domain": "neuro"}}]


def test_llama_index_keeps_ragfans_keys_out_of_the_llms_text_and_takes_its_own_names():
    server = Server(answer())
    filters = MetadataFilters(filters=[MetadataFilter(key="domain", value="neuro"),
                                       MetadataFilter(key="year", value=2020, operator=FilterOperator.EQ)])
    (first, _) = li.RagfanRetriever(client=server.client(), similarity_top_k=3, filters=filters).retrieve("x")
    assert server.sent() == [{"query": "x", "top_k": 3, "filters": {"domain": "neuro", "year": 2020}}]
    assert first.node.get_content(MetadataMode.LLM) == "domain: neuro\n\nVitamin D deficiency and MS"
    assert first.node.get_content(MetadataMode.EMBED) == "domain: neuro\n\nVitamin D deficiency and MS"
    assert "ragfan_sources" in first.node.get_content(MetadataMode.ALL)


@pytest.mark.parametrize("filters", [
    MetadataFilters(filters=[MetadataFilter(key="domain", value="neuro", operator=FilterOperator.NE)]),
    MetadataFilters(filters=[MetadataFilter(key="a", value="1"), MetadataFilter(key="b", value="2")],
                    condition=FilterCondition.OR),
    MetadataFilters(filters=[MetadataFilter(key="a", value=["1", "2"], operator=FilterOperator.IN)]),
], ids=["not-equal", "or", "in"])
def test_llama_index_refuses_filters_ragfan_cannot_match(filters):
    with pytest.raises(ValueError, match="ragfan filters match"):
        li.RagfanRetriever(client=Server(answer()).client(), filters=filters)


def test_haystack_takes_its_own_filter_syntax_for_exact_matches():
    server = Server(answer())
    retriever = hs.RagfanRetriever(client=server.client())
    retriever.run("x", filters={"field": "meta.domain", "operator": "==", "value": "neuro"})
    retriever.run("x", filters={"operator": "AND", "conditions": [
        {"field": "meta.domain", "operator": "==", "value": "neuro"},
        {"operator": "AND", "conditions": [{"field": "meta.year", "operator": "==", "value": 2020}]}]})
    assert [s["filters"] for s in server.sent()] == [{"domain": "neuro"}, {"domain": "neuro", "year": 2020}]
    for refused in [{"field": "meta.year", "operator": ">", "value": 2020},
                    {"operator": "OR", "conditions": [{"field": "meta.a", "operator": "==", "value": "1"}]},
                    {"field": "content", "operator": "==", "value": "x"}]:
        with pytest.raises(ValueError, match="ragfan filters match metadata exactly"):
            retriever.run("x", filters=refused)


def test_haystack_saves_and_loads_a_pipeline_component(monkeypatch):
    monkeypatch.setenv(common.API_KEY_ENV, "k-env")
    retriever = hs.RagfanRetriever(url=URL, top_k=3, retrievers=["dense"], filters={"domain": "neuro"}, timeout_s=5)
    data = retriever.to_dict()
    assert data["init_parameters"]["api_key"] == {"type": "env_var", "env_vars": ["RAGFAN_API_KEY"], "strict": False}
    loaded = hs.RagfanRetriever.from_dict(data)
    assert loaded.to_dict() == data and loaded.options == retriever.options
    with pytest.raises(ValueError, match="Cannot serialize token-based secret"):
        hs.RagfanRetriever(url=URL, api_key="k-plain").to_dict()
    with pytest.raises(ValueError, match="cannot be serialized: give it url="):
        hs.RagfanRetriever(client=Server(answer()).client()).to_dict()


# -- degraded answers ------------------------------------------------------------------------------
def test_a_degraded_answer_names_the_missing_retrievers_in_every_document_and_warns_once(kind, mode, caplog):
    body = answer(degraded=True,
                  graph={"status": "timeout", "latency_ms": 300.0, "error": "no answer within 300 ms"},
                  persona={"status": "skipped", "error": "circuit open"},
                  corpus={"status": "ok", "latency_ms": 9.0, "num_hits": 4, "coverage": 0.5},
                  domain={"status": "skipped"})  # not asked: not missing
    caplog.set_level(logging.WARNING, logger="serve_app.integrations")
    docs = search(kind, adapter(kind, client=Server(body).client()), mode)
    missing = {"graph": {"status": "timeout", "error": "no answer within 300 ms"},
               "persona": {"status": "skipped", "error": "circuit open"},
               "corpus": {"status": "ok", "error": None, "coverage": 0.5}}
    assert [(m["ragfan_degraded"], m["ragfan_missing"]) for *_, m in docs] == [(True, missing)] * 2
    (warning,) = [r for r in caplog.records if r.name == "serve_app.integrations"]
    assert warning.levelno == logging.WARNING
    assert warning.getMessage() == ("ragfan answered degraded (2 results): graph timeout: no answer within 300 ms; "
                                    "persona skipped: circuit open; corpus ok: no reason given")


async def test_a_degraded_answer_of_the_real_gateway_reaches_the_metadata(docs, caplog):
    config = parse_config({"retrievers": [{"name": n, "kind": "synthetic", "data": "unused.jsonl"}
                                          for n in ("quick", "failing")]}, base_dir=Path("."))
    gateway = Gateway(config, {"quick": [FakeHandle(SyntheticRetriever(name="quick", documents=docs))],
                               "failing": [FakeHandle(SyntheticRetriever(name="failing", documents=docs,
                                                                         fail="always"))]})
    retriever = lc.RagfanRetriever(client=RagClient.from_handle(FakeHandle(gateway)))
    found = await retriever.ainvoke("vitamin D deficiency")
    assert found[0].id == "d1" and found[0].metadata["domain"] == "neuro"
    assert found[0].metadata["ragfan_sources"] == [{"retriever": "quick", "rank": 1,
                                                    "score": pytest.approx(found[0].metadata["ragfan_sources"][0]
                                                                           ["score"])}]
    (state,) = found[0].metadata["ragfan_missing"].values()
    assert list(found[0].metadata["ragfan_missing"]) == ["failing"] and state["status"] == "error"
    assert "configured to fail" in state["error"]


# -- errors ----------------------------------------------------------------------------------------
def test_a_failed_search_raises_ragfans_own_error(kind, mode):
    reasons = {"dense": {"status": "error", "error": "RetrieverFailed: index file is corrupt"}}
    server = Server({"detail": {"message": "no retriever answered", "retrievers": reasons}}, status=503)
    with pytest.raises(NoRetrieverAvailable) as info:
        search(kind, adapter(kind, client=server.client()), mode)
    assert info.value.reasons == reasons


def test_a_request_the_gateway_refuses_raises_invalid_request(kind, mode):
    errors = [{"loc": ["body", "retrievers"], "msg": "unknown retriever(s) 'zzz'; valid: dense", "type": "value_error"}]
    with pytest.raises(InvalidRequest) as info:
        search(kind, adapter(kind, client=Server({"detail": errors}, status=422).client()), mode)
    assert info.value.errors == errors


@pytest.mark.parametrize(("options", "message"), [
    ({"top_k": 0}, "top_k: Input should be greater than or equal to 1"),
    ({"retrievers": []}, "retrievers: List should have at least 1 item"),
    ({"fusion": {"method": "nope"}}, "fusion.method: Input should be 'rrf', 'minmax' or 'dbsf'"),
])
def test_bad_options_fail_in_the_constructor(kind, options, message):
    with pytest.raises(ValueError, match=message):
        adapter(kind, client=Server(answer()).client(), **options)


def test_bad_call_arguments_fail_naming_the_valid_ones():
    retriever = lc.RagfanRetriever(client=Server(answer()).client())
    with pytest.raises(ValueError, match="unknown argument.*'n'.*valid: filters, fusion, k, retrievers, top_k"):
        retriever.invoke("x", n=3)
    with pytest.raises(ValueError, match="k=3 and top_k=4 disagree"):
        retriever.invoke("x", k=3, top_k=4)
    with pytest.raises(ValueError, match="k=3 and top_k=4 disagree"):
        lc.RagfanRetriever(client=Server(answer()).client(), k=3, top_k=4)
    with pytest.raises(ValueError, match="disagree"):
        li.RagfanRetriever(client=Server(answer()).client(), top_k=3, similarity_top_k=4)
    with pytest.raises(ValueError, match="top_k: Input should be less than or equal to 100"):
        hs.RagfanRetriever(client=Server(answer()).client()).run("x", top_k=101)


# -- where ragfan is -------------------------------------------------------------------------------
def test_an_adapter_needs_a_url_or_a_client_not_both(kind):
    with pytest.raises(ValueError, match=r"say where ragfan is: url=.*RAGFAN_URL.*client="):
        adapter(kind)
    with pytest.raises(ValueError, match="pass either client= or url="):
        adapter(kind, url=URL, client=Server(answer()).client())


@pytest.fixture
def made(monkeypatch) -> tuple[Server, list[dict]]:
    """What an adapter given a url makes: the RagClient's arguments, recorded, and the requests it sends."""
    server, made = Server(answer()), []

    def rag_client(**kwargs: Any) -> RagClient:
        made.append(kwargs)
        return RagClient(transport=httpx.MockTransport(server), **kwargs)

    monkeypatch.setattr(common, "RagClient", rag_client)
    return server, made


def test_an_adapter_reads_the_url_and_key_from_the_environment_as_ragfan_query_does(kind, made, monkeypatch):
    monkeypatch.setenv(common.URL_ENV, "http://from-env:8000")
    monkeypatch.setenv(common.API_KEY_ENV, "k-env")
    server, options = made
    search(kind, adapter(kind), "sync")
    assert options == [{"url": "http://from-env:8000", "api_key": "k-env"}]
    assert [str(r.url) for r in server.requests] == ["http://from-env:8000/v1/search"]
    assert server.requests[0].headers["authorization"] == "Bearer k-env"


def test_the_url_key_and_timeout_given_make_the_client(kind, made):
    server, options = made
    retriever = adapter(kind, url=URL, api_key="k-1", timeout_s=5.0)
    search(kind, retriever, "sync")
    if kind == "haystack":  # Haystack's own way to hold a key
        search(kind, adapter(kind, url=URL, api_key=Secret.from_token("k-1"), timeout_s=5.0), "sync")
    assert options == [{"url": URL, "api_key": "k-1", "timeout_s": 5.0}] * len(server.requests)
    assert {r.headers["authorization"] for r in server.requests} == {"Bearer k-1"}
    assert "k-1" not in repr(retriever)


# -- async -----------------------------------------------------------------------------------------
async def test_async_searches_run_concurrently_on_the_loop(kind):
    """Two searches in flight at once, answered by a handler that waits for both: a search that blocked the
    loop (or went through the sync client, which cannot call an async handler) would never let the second start."""
    arrived: list[httpx.Request] = []
    both = asyncio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        arrived.append(request)
        if len(arrived) == 2:
            both.set()
        await both.wait()
        return httpx.Response(200, json=answer())

    retriever = adapter(kind, client=RagClient(url=URL, transport=httpx.MockTransport(handler)))
    call = {"langchain": lambda q: retriever.ainvoke(q), "llama_index": lambda q: retriever.aretrieve(q),
            "haystack": lambda q: retriever.run_async(q)}[kind]
    first, second = await asyncio.wait_for(asyncio.gather(call("a"), call("b")), timeout=10)
    assert len(arrived) == 2 and first and second


# -- imports ---------------------------------------------------------------------------------------
def test_the_client_and_the_package_import_no_framework():
    code = ("import sys, serve_app.client, serve_app.integrations, serve_app.integrations.common; "
            "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))")
    run = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    loaded = set(run.stdout.split())
    assert not loaded & set(FRAMEWORKS), f"loads {sorted(loaded & set(FRAMEWORKS))}"


@pytest.mark.parametrize(("module", "framework", "extra"), [
    ("langchain", "langchain_core", "langchain"),
    ("llama_index", "llama_index", "llamaindex"),
    ("haystack", "haystack", "haystack"),
])
def test_without_its_framework_an_adapter_says_which_extra_to_install(monkeypatch, module, framework, extra):
    # None in sys.modules makes `import framework` (and any of its modules) fail as if it were not installed
    for name in [n for n in sys.modules if n == framework or n.startswith(framework + ".")] + [framework]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, f"serve_app.integrations.{module}")
    with pytest.raises(ImportError, match=rf'pip install "ragfan\[{extra}\]"') as info:
        importlib.import_module(f"serve_app.integrations.{module}")
    assert isinstance(info.value.__cause__, ImportError)
