"""The /dashboard page in a real headless Chromium, against the `watch` app (two gateway replicas, API key on).

The page asks for the key on its first 401, then draws what /v1/stats says about traffic this test sent.
Chromium is Debian's (`make debs`), driven by Playwright without its own browser download.

RAGFAN_SCREENSHOT=docs/data/dashboard.png writes the screenshot the docs show (docs/DASHBOARD.md), of the page's
last-minute view, after about 40 s more of traffic at four loads so that its lines have a shape. Without it
the screenshot goes to pytest's tmp_path, so a test run never changes the tree.
"""

from __future__ import annotations

import itertools
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import httpx
import pytest

from tests.integration.conftest import ROOT, WATCH_KEY

CHROMIUM = shutil.which("chromium")
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed: run `make debs`"),
]
AUTH = {"Authorization": f"Bearer {WATCH_KEY}"}
SEARCHES = 60  # each waits for `hanging`'s 300 ms deadline: about 9 s on two clients, two or three buckets
WAIT_MS = 20_000
PICTURE_LOADS = (1, 4, 2, 3)  # clients at once, PICTURE_PHASE_S each: the docs' screenshot only
PICTURE_PHASE_S = 10.0


def test_stats_need_the_key_and_the_page_does_not(watch_url, http):
    assert http.get(f"{watch_url}/v1/stats").status_code == 401
    assert http.get(f"{watch_url}/v1/stats", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert http.get(f"{watch_url}/v1/stats", headers=AUTH).status_code == 200
    page = http.get(f"{watch_url}/dashboard")  # the page holds no figures: it is open, like /docs
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright  # a dev dependency: only this module needs it

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


def _send_traffic(url: str) -> None:
    """SEARCHES searches on two clients at once, so the proxy spreads them over both gateway replicas;
    every query is asked twice, so the result cache hits."""
    with httpx.Client(timeout=30) as client:

        def search(i: int) -> None:
            query = f"vitamin d and bone density {i % (SEARCHES // 2)}"
            answer = client.post(f"{url}/v1/search", json={"query": query}, headers=AUTH)
            assert answer.status_code == 200, answer.text

        with ThreadPoolExecutor(2) as pool:
            list(pool.map(search, range(SEARCHES)))


def _send_varied_traffic(url: str) -> None:
    """For the docs' picture: a few loads in turn, over 40 queries asked again and again, so the cache hits more."""
    asked = itertools.count()
    with httpx.Client(timeout=30) as client:

        def load(until: float) -> None:
            while time.monotonic() < until:
                query = f"metformin and blood glucose {next(asked) % 40}"
                assert client.post(f"{url}/v1/search", json={"query": query}, headers=AUTH).status_code == 200

        for clients in PICTURE_LOADS:
            with ThreadPoolExecutor(clients) as pool:
                list(pool.map(load, [time.monotonic() + PICTURE_PHASE_S] * clients))


def test_the_dashboard_draws_the_traffic(watch_url, browser, tmp_path):
    target = os.environ.get("RAGFAN_SCREENSHOT")
    if target:
        _send_varied_traffic(watch_url)
    _send_traffic(watch_url)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    origin = "{0.scheme}://{0.netloc}".format(urlsplit(watch_url))
    requested: list[str] = []
    errors: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.on("pageerror", lambda exc: errors.append(str(exc)))

    page.goto(f"{watch_url}/dashboard")
    # keys are on: the page's first read of v1/stats is a 401, and it asks for the key
    page.wait_for_selector("#key-form", state="visible", timeout=WAIT_MS)
    page.fill("#key", "not-the-key")
    page.press("#key", "Enter")
    page.wait_for_function("document.getElementById('key-message').textContent.includes('refused')", timeout=WAIT_MS)
    assert page.get_attribute("body", "data-updated") is None
    page.fill("#key", WATCH_KEY)
    page.click("#key-form button[type=submit]")
    page.wait_for_function("Number(document.body.dataset.updated) >= 1", timeout=WAIT_MS)
    assert page.is_hidden("#key-form") and page.is_hidden("#error")
    assert page.evaluate("Object.values(sessionStorage)") == [WATCH_KEY]  # kept for this tab

    # Both replicas push their counts every 2 s: wait until the page shows every search this test sent.
    page.wait_for_function(f"Number(document.querySelector('.bar[data-retriever=steady]')?.dataset.ok) >= {SEARCHES}",
                           timeout=WAIT_MS)
    points = {c: int(page.get_attribute(f"svg.chart[data-chart={c}]", "data-points"))
              for c in ("qps", "rates", "cache", "latency")}
    assert points["qps"] > 0 and points["latency"] > 0, points
    assert points["rates"] > 0, points  # every search was degraded: `failing` never answers
    states = page.eval_on_selector_all(
        "tr[data-retriever]", "rows => rows.map(r => [r.dataset.retriever, r.dataset.state])")
    assert dict(states) == {"steady": "ok", "failing": "failing", "hanging": "failing"}
    failing = page.eval_on_selector(".bar[data-retriever=failing]", "bar => ({...bar.dataset})")
    assert int(failing["ok"]) == 0 and int(failing["error"]) + int(failing["circuit_open"]) >= SEARCHES
    assert int(page.get_attribute(".bar[data-retriever=hanging]", "data-timeout")) >= SEARCHES
    assert "2 gateway replicas" in page.text_content("#gateways")

    # The last minute instead of 15: every series cut to its last 12 buckets (qps has no gaps: 12 points).
    page.click("#range a[href='#1m']")
    page.wait_for_function("document.querySelector('svg.chart[data-chart=qps]').dataset.points === '12'",
                           timeout=WAIT_MS)
    assert page.get_attribute("#range a[href='#1m']", "aria-current") == "true"
    assert int(page.get_attribute("svg.chart[data-chart=latency]", "data-points")) > 0

    assert not errors, errors
    assert requested and all(url.startswith(origin + "/") for url in requested), requested  # nothing else fetched
    assert {urlsplit(url).path for url in requested} == {"/watch/dashboard", "/watch/v1/stats"}

    shot = ROOT / target if target else tmp_path / "dashboard.png"
    page.screenshot(path=str(shot), full_page=True)
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 10_000
    page.close()
