"""ragfan's metrics through a real Prometheus (Debian's `prometheus`), scraping the session's Ray cluster.

Searches go to the `watch` app (two gateway replicas; `steady` answers, `failing` always fails, `hanging`
times out at 300 ms), and a few to the default app (which has the shared encoder). Then PromQL, over
Prometheus's HTTP API, must agree with what the answers said: each retriever's p99, every outcome count
exactly (totals before and after, summed over the gateway replicas), every search degraded. Last, the
Grafana dashboard: every metric it reads exists, and every one of its queries runs and returns series.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import httpx
import pytest
import yaml

from serve_app.breaker import CIRCUIT_OPEN
from tests.integration.conftest import ROOT, WATCH_KEY, free_port

PROMETHEUS = shutil.which("prometheus")
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(PROMETHEUS is None, reason="Debian's prometheus is not installed: run `make debs`"),
]
AUTH = {"Authorization": f"Bearer {WATCH_KEY}"}
WARM_UP = 6  # searches that open `failing`'s breakers and create every series before the counts start
SEARCHES = 60  # the searches counted
WATCH = 'application="watch"'
SCRAPE_MIN_S = 3  # the scrape interval and timeout, at least; more when one export takes longer (see `prometheus`)
T = TypeVar("T")


def eventually(read: Callable[[], T], done: Callable[[T], bool], timeout_s: float = 60) -> T:
    """Read until done(value) or the deadline; the last value either way, for the assertion to show."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = read()
        if done(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.5)


# -- Prometheus ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def prometheus(metrics_port, tmp_path_factory) -> Iterator[str]:
    """A Prometheus scraping the session's Ray metrics export every second; its URL."""
    root = tmp_path_factory.mktemp("prometheus")
    config = root / "prometheus.yml"
    # Not every second: with the whole suite's apps deployed, one export of Ray's metrics (tens of thousands of
    # series, on two busy cores) takes seconds, and a scrape past its timeout is dropped (`up` is 0). So time
    # the export here and give Prometheus three times the slowest of three reads.
    scrape_s = max(SCRAPE_MIN_S, math.ceil(3 * max(export_seconds(metrics_port) for _ in range(3))))
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": f"{scrape_s}s", "scrape_timeout": f"{scrape_s}s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "ray", "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}],
    }))
    url = f"http://127.0.0.1:{free_port()}"
    log_path = root / "prometheus.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={root / 'data'}",
             f"--web.listen-address={url.removeprefix('http://')}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            def ready() -> bool:
                if process.poll() is not None:
                    pytest.fail(f"prometheus exited with {process.returncode}: {log_path.read_text()[-2000:]}")
                try:
                    return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
                except httpx.TransportError:
                    return False

            assert eventually(ready, bool, timeout_s=60), log_path.read_text()[-2000:]
            up = eventually(lambda: query(url, 'up{job="ray"}'), lambda r: bool(r) and r[0]["value"][1] == "1")
            assert up and up[0]["value"][1] == "1", (up, scrape_s, last_scrape_error(url))
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def export_seconds(metrics_port: int) -> float:
    """How long one read of Ray's whole metrics export takes now."""
    start = time.monotonic()
    httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=60).raise_for_status()
    return time.monotonic() - start


def last_scrape_error(prometheus: str) -> str:
    """Why Prometheus's last scrape of each target failed, as its targets API says."""
    targets = httpx.get(f"{prometheus}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
    return "; ".join(f"{t['scrapeUrl']}: {t['lastError'] or 'no error'} ({t['lastScrapeDuration']:.2f} s)"
                     for t in targets)


def query(prometheus: str, promql: str) -> list[dict[str, Any]]:
    """An instant query, now: the series of the result."""
    answer = httpx.get(f"{prometheus}/api/v1/query", params={"query": promql}, timeout=10)
    body = answer.json()
    assert answer.status_code == 200 and body["status"] == "success", (promql, body)
    return body["data"]["result"]


def values(prometheus: str, promql: str, *labels: str) -> dict[Any, float]:
    """{label value (a tuple for several): number} of an instant query."""
    out = {}
    for series in query(prometheus, promql):
        key = tuple(series["metric"].get(label, "") for label in labels)
        out[key[0] if len(key) == 1 else key] = float(series["value"][1])
    return out


def outcomes(prometheus: str) -> Counter:
    """ragfan_retriever_outcomes_total of the watch app, per (retriever, status), over every replica."""
    totals = values(prometheus, f"sum by (retriever, status) (ray_ragfan_retriever_outcomes_total{{{WATCH}}})",
                    "retriever", "status")
    return Counter({k: round(v) for k, v in totals.items()})


def answers(prometheus: str) -> Counter:
    totals = values(prometheus, f"sum by (answer) (ray_ragfan_searches_total{{{WATCH}}})", "answer")
    return Counter({k: round(v) for k, v in totals.items()})


def counted(prometheus: str, before: tuple[Counter, Counter], n: int) -> tuple[Counter, Counter]:
    """Wait until Prometheus has n more watch searches than `before`, each retriever asked n more times,
    and return (outcome deltas, answer deltas)."""
    def deltas() -> tuple[Counter, Counter]:
        return outcomes(prometheus) - before[0], answers(prometheus) - before[1]

    def complete(d: tuple[Counter, Counter]) -> bool:
        per_retriever = Counter()
        for (retriever, _), k in d[0].items():
            per_retriever[retriever] += k
        return d[1].total() == n and set(per_retriever.values()) == {n}

    return eventually(deltas, complete)


def settled(prometheus: str, before: tuple[Counter, Counter], n: int) -> None:
    d = counted(prometheus, before, n)
    assert d[1].total() == n, f"Prometheus did not count the {n} searches in time: {d}; {scrapes(prometheus)}"


def scrapes(prometheus: str) -> list[dict[str, Any]]:
    """What Prometheus says of its scrapes of Ray's export: health, last error, how long the last took."""
    targets = httpx.get(f"{prometheus}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
    return [{k: t.get(k) for k in ("health", "lastError", "lastScrapeDuration")} for t in targets]


# -- traffic ---------------------------------------------------------------------------------------
def search_watch(http: httpx.Client, url: str, queries: list[str]) -> tuple[Counter, dict[str, list[float]]]:
    """Send the searches, 4 at a time; (retriever, status) counts as the answers reported them, and each
    retriever's latencies (s) that the gateway observed into ragfan_retriever_seconds (all but circuit_open)."""
    def one(q: str) -> dict:
        answer = http.post(f"{url}/v1/search", json={"query": q}, headers=AUTH)
        assert answer.status_code == 200, answer.text
        return answer.json()

    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(one, queries))
    seen: Counter = Counter()
    latencies: dict[str, list[float]] = {}
    for response in responses:
        assert response["degraded"]
        for name, status in response["retrievers"].items():
            state = "circuit_open" if status["error"] == CIRCUIT_OPEN else status["status"]
            seen[name, state] += 1
            if state != "circuit_open":  # a retriever its breaker skipped took no time, and none is observed
                latencies.setdefault(name, []).append(status["latency_ms"] / 1000)
    return seen, latencies


@pytest.fixture(scope="module")
def traffic(prometheus, watch_url, base_url, http) -> dict[str, Any]:
    run = uuid.uuid4().hex[:8]  # queries no other test sends: the watch app's result cache must miss
    for i in range(8):  # the default app: its encoder's batch sizes
        answer = http.post(f"{base_url}/v1/search", json={"query": f"prometheus {run} vitamin d {i}"})
        assert answer.status_code == 200, answer.text

    start = outcomes(prometheus), answers(prometheus)
    search_watch(http, watch_url, [f"warm-up {run} {i}" for i in range(WARM_UP)])
    settled(prometheus, start, WARM_UP)  # every series exists now, and the totals below are settled

    started, before_at = time.monotonic(), time.time()
    before = outcomes(prometheus), answers(prometheus)
    seen, latencies = search_watch(http, watch_url, [f"metrics {run} bone density {i}" for i in range(SEARCHES)])
    sent_s = time.monotonic() - started
    outcome_delta, answer_delta = counted(prometheus, before, SEARCHES)
    return {"seen": seen, "latencies": latencies, "outcomes": outcome_delta, "answers": answer_delta,
            "sent_s": sent_s, "counted_s": time.monotonic() - started, "before_at": before_at,
            "after_at": time.time()}


# -- what Prometheus says --------------------------------------------------------------------------
def test_each_retrievers_p99(prometheus, traffic):
    """The p99 of exactly the counted searches (`@` picks the bucket counts before and after them) lies in the
    histogram bucket of the slowest latency the answers reported: with fewer than 100 searches, rank 0.99 * n
    is past the second slowest, and histogram_quantile interpolates inside that bucket."""
    def counted_only(by: str, selector: str = "") -> str:
        at = [f"sum by ({by}) (ray_ragfan_retriever_seconds_bucket{{{WATCH}{selector}}} @ {t:.3f})"
              for t in (traffic["after_at"], traffic["before_at"])]
        return f"{at[0]} - {at[1]}"

    p99 = values(prometheus, f"histogram_quantile(0.99, {counted_only('le, retriever')})", "retriever")
    in_histogram = values(prometheus, counted_only("retriever", ', le="+Inf"'), "retriever")
    bounds = sorted({float(s["metric"]["le"]) for s in query(prometheus, counted_only("le"))})
    latencies = traffic["latencies"]
    print(f"p99 (s): {p99}; slowest answered (s): { {n: max(v) for n, v in latencies.items()} }; {SEARCHES} "
          f"searches sent in {traffic['sent_s']:.1f} s, all counted by Prometheus after {traffic['counted_s']:.1f} s")
    assert set(p99) == set(latencies) == {"steady", "failing", "hanging"}
    for name, seen in latencies.items():
        assert len(seen) < 100 and in_histogram[name] == len(seen)  # every latency observed once, no other
        upper = next(le for le in bounds if max(seen) <= le)
        lower = max((le for le in bounds if le < upper), default=0.0)
        if math.isinf(upper):  # past the last finite bound, Prometheus answers that bound
            assert p99[name] == lower, (name, p99[name], max(seen))
        else:
            assert lower < p99[name] <= upper, (name, p99[name], max(seen), lower, upper)
    assert min(latencies["hanging"]) >= 0.3 and p99["hanging"] >= 0.3  # it times out at 300 ms, every time


def test_every_outcome_counted_as_the_answers_said(prometheus, traffic):
    seen = traffic["seen"]
    assert traffic["outcomes"] == seen  # every (retriever, status), summed over both gateway replicas
    assert seen["steady", "ok"] == SEARCHES and seen["hanging", "timeout"] == SEARCHES
    assert {status for (name, status) in seen if name == "failing"} <= {"error", "circuit_open"}
    print(f"outcomes counted: {dict(sorted(seen.items()))}")
    # the failing retriever never answered, since the app started
    failing = values(prometheus, "sum by (status) (ray_ragfan_retriever_outcomes_total"
                                 f'{{{WATCH}, retriever="failing"}})', "status")
    assert set(failing) <= {"error", "circuit_open"} and failing, failing


def test_the_error_rate_is_the_failing_retrievers_alone(prometheus, traffic):
    rate = values(prometheus, "sum by (retriever) (rate(ray_ragfan_retriever_outcomes_total"
                              f'{{{WATCH}, status=~"error|circuit_open"}}[1m])) / sum by (retriever) '
                              f"(rate(ray_ragfan_retriever_outcomes_total{{{WATCH}}}[1m]))", "retriever")
    assert rate == {"failing": 1.0}


def test_every_search_to_the_watch_app_was_degraded(prometheus, traffic):
    assert traffic["answers"] == Counter({"degraded": SEARCHES})
    share = values(prometheus, f'sum(rate(ray_ragfan_searches_total{{{WATCH}, answer="degraded"}}[1m])) '
                               f"/ sum(rate(ray_ragfan_searches_total{{{WATCH}}}[1m]))")
    assert list(share.values()) == [1.0]


# -- the Grafana dashboard -------------------------------------------------------------------------
def load_build():
    spec = importlib.util.spec_from_file_location("ragfan_grafana_build", ROOT / "cluster_configs/grafana/build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dashboard_queries() -> list[tuple[str, str, list[str]]]:
    build = load_build()
    board = json.loads(build.OUT.read_text(encoding="utf-8"))
    return [(title, expr, build.metric_names(expr)) for title, expr in build.expressions(board)]


def test_every_metric_the_dashboard_reads_exists(prometheus, traffic, dashboard_queries):
    answer = httpx.get(f"{prometheus}/api/v1/label/__name__/values", timeout=10).json()
    exported = set(answer["data"])
    read = {name for _, _, names in dashboard_queries for name in names}
    assert len(read) >= 12
    assert read <= exported, sorted(read - exported)


def test_every_dashboard_query_runs_and_returns_series(prometheus, traffic, dashboard_queries):
    for title, expr, _ in dashboard_queries:
        promql = expr.replace("$application", ".*").replace("$__rate_interval", "1m")
        assert query(prometheus, promql), (title, promql)
