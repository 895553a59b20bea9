"""Compressed answers and trimmed results: the real HTTP app on fake handles, no Ray, no model.

What is checked is what went over the wire: the Content-Encoding, the raw body decoded by the
codec's own library, and which fields each result carries.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import brotli
import httpx
import pytest
import zstandard
from fastapi.testclient import TestClient

from actors.synthetic import SyntheticRetriever
from actors.types import Document
from serve_app.client import ACCEPT_ENCODING, RagClient
from serve_app.config import parse_config
from serve_app.gateway import Gateway
from serve_app.http import build_api
from serve_app.testing import FakeHandle

DECODE = {"gzip": gzip.decompress, "br": brotli.decompress,
          "zstd": lambda data: zstandard.ZstdDecompressor().decompressobj().decompress(data)}
LONG = "Aspirin and the risk of colorectal cancer in a cohort followed for twenty years, by dose and duration."


def api_for(**gateway_options) -> TestClient:
    docs = [Document(f"d{i}", f"{LONG} Study {i}.", {"domain": "oncology", "year": str(1990 + i)}) for i in range(30)]
    config = parse_config(
        {"retrievers": [{"name": n, "kind": "synthetic", "data": "unused.jsonl"} for n in ("a", "b")],
         "gateway": gateway_options},
        base_dir=Path("."),
    )
    handles = {n: [FakeHandle(SyntheticRetriever(name=n, documents=docs))] for n in ("a", "b")}
    return TestClient(build_api(Gateway(config, handles)))


def raw(client: TestClient, body: dict, accept_encoding: str) -> tuple[httpx.Headers, bytes]:
    with client.stream("POST", "/v1/search", json=body, headers={"accept-encoding": accept_encoding}) as r:
        assert r.status_code == 200
        return r.headers, b"".join(r.iter_raw())


def results(answer: dict) -> list[dict]:
    return answer["results"]


@pytest.mark.parametrize("encoding", ["gzip", "zstd", "br"])
def test_a_large_answer_is_compressed_as_asked(encoding):
    client = api_for()
    query = {"query": "aspirin colorectal cancer", "top_k": 20}
    plain_headers, plain = raw(client, query, "identity")
    headers, body = raw(client, query, encoding)
    assert "content-encoding" not in plain_headers and len(plain) > 1024
    assert headers["content-encoding"] == encoding and "accept-encoding" in headers["vary"].lower()
    assert int(headers["content-length"]) == len(body) < len(plain) / 3
    assert results(json.loads(DECODE[encoding](body))) == results(json.loads(plain))


def test_the_server_picks_zstd_then_br_then_gzip():
    client = api_for()
    query = {"query": "aspirin colorectal cancer", "top_k": 20}
    assert raw(client, query, "gzip, br, zstd")[0]["content-encoding"] == "zstd"
    assert raw(client, query, "gzip, br")[0]["content-encoding"] == "br"
    assert "content-encoding" not in raw(client, query, "deflate")[0]  # not served: identity, never a 406


def test_a_small_answer_is_not_compressed():
    client = api_for(compress_min_bytes="4KiB")
    headers, body = raw(client, {"query": "aspirin colorectal cancer", "top_k": 1}, "gzip")
    assert len(body) < 4096 and "content-encoding" not in headers
    assert len(results(json.loads(body))) == 1


def test_compression_can_be_turned_off():
    headers, _ = raw(api_for(compress_min_bytes=None), {"query": "aspirin colorectal cancer", "top_k": 20}, "gzip")
    assert "content-encoding" not in headers


def test_the_guards_refusals_are_not_compressed():
    client = api_for(compress_min_bytes=0, max_body_bytes=1024)
    r = client.post("/v1/search", content=b"x" * 2048, headers={"accept-encoding": "gzip"})
    assert r.status_code == 413 and "content-encoding" not in r.headers


def test_include_names_only_text_and_metadata():
    r = api_for().post("/v1/search", json={"query": "aspirin", "include": ["title"]})
    assert r.status_code == 422 and "'text' or 'metadata'" in r.text


@pytest.mark.parametrize(("include", "kept"), [
    ([], set()), (["text"], {"text"}), (["metadata"], {"metadata"}), (["text", "metadata"], {"text", "metadata"}),
    (None, {"text", "metadata"}),
])
def test_include_trims_each_result(include, kept):
    client = api_for()
    body = {"query": "aspirin colorectal cancer", "top_k": 5} | ({"include": include} if include is not None else {})
    answer = client.post("/v1/search", json=body).json()
    assert len(answer["results"]) == 5
    for result in answer["results"]:
        assert set(result) == {"id", "score", "sources"} | kept  # left out, not null
        assert result["sources"] and all(s["retriever"] in {"a", "b"} for s in result["sources"])


def test_the_schema_states_include_and_the_optional_fields():
    schema = api_for().app.openapi()["components"]["schemas"]  # type: ignore[attr-defined]
    include = schema["SearchRequest"]["properties"]["include"]["anyOf"][0]
    assert include["items"] == {"enum": ["text", "metadata"], "type": "string"}
    result = schema["Result"]
    assert set(result["required"]) == {"id", "score", "sources"}
    assert result["properties"]["text"]["type"] == "string"  # never null on the wire: absent instead


# -- the client asks for compression and decodes it ------------------------------------------------
def compressed_server(seen: list[httpx.Request]):
    answer = json.dumps({
        "query": "vitamin d", "degraded": False, "latency_ms": 3.0, "retrievers": {"dense": {"status": "ok"}},
        "results": [{"id": "d1", "score": 0.5, "sources": [{"retriever": "dense", "rank": 1, "score": 0.5}]}],
    }).encode()

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        encoding = request.headers["accept-encoding"].split(",")[0].strip()  # the client's first choice
        body = {"zstd": zstandard.ZstdCompressor().compress, "br": brotli.compress, "gzip": gzip.compress}[encoding]
        return httpx.Response(200, content=body(answer), headers={"content-encoding": encoding,
                                                                  "content-type": "application/json"})

    return handle


async def test_the_client_asks_for_compression_and_decodes_it():
    seen: list[httpx.Request] = []
    client = RagClient(url="http://ragfan.test", transport=httpx.MockTransport(compressed_server(seen)))
    r = client.search("vitamin d", include=[])
    r_async = await client.search_async("vitamin d", include=["text"])
    await client.aclose()
    assert r == r_async and r.results[0].id == "d1" and r.results[0].text is None
    assert [q.headers["accept-encoding"] for q in seen] == [ACCEPT_ENCODING] * 2
    assert [json.loads(q.content).get("include") for q in seen] == [[], ["text"]]


@pytest.mark.parametrize("encoding", [e.strip() for e in ACCEPT_ENCODING.split(",")])
def test_the_client_decodes_every_encoding_it_asks_for(encoding):
    seen: list[httpx.Request] = []
    server = compressed_server(seen)

    def only(request: httpx.Request) -> httpx.Response:
        request.headers["accept-encoding"] = encoding
        return server(request)

    with RagClient(url="http://ragfan.test", transport=httpx.MockTransport(only)) as client:
        assert client.search("vitamin d").results[0].id == "d1"


def test_the_client_omits_include_unless_given():
    seen: list[httpx.Request] = []
    with RagClient(url="http://ragfan.test", transport=httpx.MockTransport(compressed_server(seen))) as client:
        client.search("vitamin d")
    assert "include" not in json.loads(seen[0].content)
