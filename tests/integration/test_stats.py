"""GET /v1/stats counts the whole app: two gateway replicas share the traffic, and every search is
counted once, whichever replica served it and whichever replica answers the read."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.integration.conftest import WATCH_KEY, wait_until

AUTH = {"Authorization": f"Bearer {WATCH_KEY}"}
SEARCHES = 40


def _stats(http: httpx.Client, url: str) -> dict:
    answer = http.get(f"{url}/v1/stats", headers=AUTH)
    assert answer.status_code == 200, answer.text
    return answer.json()


def _outcomes(stats: dict) -> dict[tuple[str, str], int]:
    return {(name, status): n for name, r in stats["retrievers"].items() for status, n in r["totals"].items()}


def _per_replica(text: str) -> dict[str, float]:
    """ray_ragfan_searches_total of the watch app, per gateway replica, from Ray's metrics export."""
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("ray_ragfan_searches_total{") and 'application="watch"' in line:
            replica = re.search(r'replica="([^"]+)"', line).group(1)
            counts[replica] = counts.get(replica, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


def test_stats_count_every_search_once_over_two_gateway_replicas(watch_url, metrics_port, http):
    export = f"http://127.0.0.1:{metrics_port}/metrics"
    before, replicas_before = _stats(http, watch_url), _per_replica(http.get(export).text)
    responses = []

    def search(i: int) -> None:
        answer = http.post(f"{watch_url}/v1/search", json={"query": f"vitamin d and bone density {i}"}, headers=AUTH)
        assert answer.status_code == 200, answer.text
        responses.append(answer.json())

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(search, range(SEARCHES)))
    seen: dict[tuple[str, str], int] = {}
    for response in responses:
        for name, status in response["retrievers"].items():
            key = (name, "circuit_open" if status["error"] == "circuit open" else status["status"])
            seen[key] = seen.get(key, 0) + 1

    def counted() -> dict:
        stats = _stats(http, watch_url)
        return stats if stats["totals"]["searches"] - before["totals"]["searches"] >= SEARCHES else {}

    wait_until(counted, timeout_s=15)  # the other replica pushes its counts within 2 s
    after = _stats(http, watch_url)
    assert after["gateways"] == 2
    assert after["totals"]["searches"] - before["totals"]["searches"] == SEARCHES
    assert after["totals"]["degraded"] - before["totals"]["degraded"] == SEARCHES  # `failing` never answers
    delta = {k: n - _outcomes(before).get(k, 0) for k, n in _outcomes(after).items()}
    assert {k: n for k, n in delta.items() if n} == seen  # each outcome, as the answers reported it
    assert seen[("steady", "ok")] == SEARCHES and seen[("hanging", "timeout")] == SEARCHES
    health = {name: r["health"]["state"] for name, r in after["retrievers"].items()}
    assert health == {"steady": "ok", "failing": "failing", "hanging": "failing"}

    # Both replicas served part of the traffic, so the figures above are not one replica's.
    def both_served() -> dict:
        now = _per_replica(http.get(export).text)
        grown = {r: n - replicas_before.get(r, 0.0) for r, n in now.items()}
        return grown if sum(grown.values()) >= SEARCHES else {}

    wait_until(both_served, timeout_s=15)
    grown = both_served()
    assert len([r for r, n in grown.items() if n > 0]) == 2, grown
