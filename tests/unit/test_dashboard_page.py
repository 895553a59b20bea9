"""The /dashboard page as the real app serves it, and the /v1/stats figures it reads: no Ray, no browser.

The page itself is drawn and clicked in a real Chromium by tests/integration/test_dashboard.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from actors.synthetic import SyntheticRetriever
from serve_app.config import parse_config
from serve_app.gateway import Gateway
from serve_app.http import DASHBOARD, build_api, digest
from serve_app.testing import FakeHandle

KEY = "k-dashboard"
AUTH = {"Authorization": f"Bearer {KEY}"}
STATUSES = {"ok", "timeout", "error", "skipped", "circuit_open"}
# What the page's script reads from /v1/stats (serve_app/dashboard/index.html, render()).
TOP = {"window_s", "bucket_s", "now", "gateways", "searches", "cache", "retrievers", "totals"}
SEARCH_SERIES = {"qps", "degraded_rate", "failed_rate"}
TOTALS = {"searches", "degraded", "failed", "cache_hits", "cache_lookups"}
RETRIEVER = {"p50_ms", "p99_ms", "status", "totals", "health"}
HEALTH = {"state", "circuit", "in_flight", "error"}


@pytest.fixture
def client(docs):
    """The app with an API key, over `fine` (answers) and `broken` (always fails)."""
    retrievers = [
        {"name": "fine", "kind": "synthetic", "data": "unused.jsonl", "timeout_ms": 2000},
        {"name": "broken", "kind": "synthetic", "data": "unused.jsonl", "timeout_ms": 2000, "fail": "always"},
    ]
    config = parse_config({"retrievers": retrievers}, base_dir=Path("."))
    replicas = {name: SyntheticRetriever(name=name, documents=docs, fail=fail)
                for name, fail in (("fine", "never"), ("broken", "always"))}
    gateway = Gateway(config, {name: [FakeHandle(r)] for name, r in replicas.items()})
    with TestClient(build_api(gateway, key_digests=[digest(KEY)])) as c:
        yield c


def test_the_page_is_served_as_html_without_a_key(client):
    page = client.get("/dashboard")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert page.text == DASHBOARD.read_text(encoding="utf-8")
    assert client.get("/v1/stats").status_code == 401  # the figures are not open
    redirected = client.get("/dashboard/", follow_redirects=False)  # a trailing slash, as people type it
    assert redirected.status_code == 307 and redirected.headers["location"].endswith("/dashboard")
    assert client.get("/dashboard/").text == page.text
    assert client.get("/v1/stats/", follow_redirects=False).status_code == 401  # a slash opens nothing else


def test_the_page_loads_nothing_from_another_origin():
    page = DASHBOARD.read_text(encoding="utf-8")
    assert not re.findall(r"https?://[^\s\"'<>)]*", page)  # no CDN, no font, no library: not even one URL
    assert not re.search(r"""(src|href)\s*=\s*["']//""", page)  # nor a scheme-relative one
    assert not re.search(r"<script[^>]*\bsrc=|<link[^>]*stylesheet", page)  # everything is inline
    # v1/stats is read relative to the page, so an app under a route prefix reads its own
    assert '"v1/stats"' in page and '"/v1/stats"' not in page


def test_stats_have_every_key_the_page_reads(client):
    for query in ("vitamin d", "aspirin", "vitamin d"):
        assert client.post("/v1/search", json={"query": query}, headers=AUTH).status_code == 200
    stats = client.get("/v1/stats", headers=AUTH)
    assert stats.status_code == 200
    s = stats.json()
    assert TOP <= s.keys()
    n = len(s["times"])  # the page places points by index: one per bucket, the last one now
    assert n == s["window_s"] // s["bucket_s"]
    assert SEARCH_SERIES <= s["searches"].keys() and "hit_rate" in s["cache"]
    assert TOTALS <= s["totals"].keys() and s["totals"]["searches"] == 3
    for series in (*(s["searches"][k] for k in SEARCH_SERIES), s["cache"]["hit_rate"]):
        assert len(series) == n  # one point per bucket, aligned with `times`
    assert set(s["retrievers"]) == {"fine", "broken"}
    for name, r in s["retrievers"].items():
        assert RETRIEVER <= r.keys() and HEALTH <= r["health"].keys(), name
        assert set(r["totals"]) == set(r["status"]) == STATUSES
        for status, counts in r["status"].items():  # a shorter range sums these; the whole window is `totals`
            assert len(counts) == n and sum(counts) == r["totals"][status], (name, status)
        assert len(r["p50_ms"]) == len(r["p99_ms"]) == n
        assert r["p99_ms"][0] is None  # an empty bucket is a gap (null) in the line, not a zero
    assert s["retrievers"]["fine"]["totals"]["ok"] == 3 and s["retrievers"]["fine"]["health"]["state"] == "ok"
    assert s["retrievers"]["broken"]["health"]["state"] == "failing"
    page = DASHBOARD.read_text(encoding="utf-8")
    for key in TOP | SEARCH_SERIES | TOTALS | RETRIEVER | HEALTH | {"hit_rate"}:
        assert re.search(rf"\.{key}\b", page), f"the page no longer reads {key!r}: update this test's lists"
