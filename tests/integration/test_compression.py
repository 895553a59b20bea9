"""Compressed answers from the live embedded default app, read as a plain HTTP client reads them."""

from __future__ import annotations

import gzip
import json

import httpx

from serve_app.client import RagClient

QUERY = {"query": "vitamin D deficiency and multiple sclerosis", "top_k": 50}


def raw(base_url: str, accept_encoding: str) -> tuple[httpx.Headers, bytes]:
    with httpx.Client(base_url=base_url, timeout=60) as client, client.stream(
        "POST", "/v1/search", json=QUERY, headers={"accept-encoding": accept_encoding}
    ) as r:
        assert r.status_code == 200
        return r.headers, b"".join(r.iter_raw())


def test_a_gzip_answer_decodes_to_the_uncompressed_one(base_url):
    plain_headers, plain = raw(base_url, "identity")
    headers, body = raw(base_url, "gzip")
    assert "content-encoding" not in plain_headers
    assert headers["content-encoding"] == "gzip" and int(headers["content-length"]) == len(body) < len(plain)
    assert json.loads(gzip.decompress(body))["results"] == json.loads(plain)["results"]


class Recording(httpx.HTTPTransport):
    """httpx's own transport, noting each answer's Content-Encoding: what came over the wire."""

    def __init__(self) -> None:
        super().__init__()
        self.encodings: list[str | None] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        self.encodings.append(response.headers.get("content-encoding"))
        return response


def test_the_client_gets_the_same_answer_compressed_and_trimmed(base_url):
    wire = Recording()
    with RagClient(url=base_url, transport=wire) as client:
        full = client.search(QUERY["query"], top_k=QUERY["top_k"])
        ids = client.search(QUERY["query"], top_k=QUERY["top_k"], include=[])
    assert wire.encodings[0] in {"zstd", "br", "gzip"}  # the full answer (50 hits with texts) came compressed
    assert full.results and [(r.id, r.score) for r in ids.results] == [(r.id, r.score) for r in full.results]
    assert all(r.text is None and r.metadata is None for r in ids.results)
