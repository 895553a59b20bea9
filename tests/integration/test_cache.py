"""The result cache against a real redis-server (Debian's, installed by `make redis`), on the live cluster.

One app, `cached`, shares a Redis that this module starts on a free port: a keyword retriever over
artifacts built by `ragfan ingest` (so a re-ingest changes its fingerprint) and a synthetic one.
Covered: hit, miss, expiry, a re-ingest that must never be answered from the old index, Redis
killed under traffic with no failed request, and Redis coming back.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from ray import serve

from actors.ingest import ingest
from serve_app.app import app_from_config
from serve_app.config import parse_config
from tests.integration.conftest import TINYBEIR, free_port, synthetic, wait_until

pytestmark = pytest.mark.integration
TTL_S = 3


class RedisServer:
    """A real redis-server on a port of its own; `kill()` and `start()` it as a test needs."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed: run `make redis` (Debian's redis-server package)"
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_until(self._answers, 10, 0.05)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False


@pytest.fixture(scope="module")
def redis_server():
    server = RedisServer(free_port())
    server.start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cached") / "corpus.jsonl"
    shutil.copy(TINYBEIR / "corpus.jsonl", path)
    return path


def deploy(redis_url: str, corpus: Path, out: Path) -> str:
    ingest(corpus, out, kinds=("keyword",), progress=False)
    config = parse_config(
        {
            "app_name": "cached",
            "gateway": {"ray_actor_options": {"num_cpus": 0.1}},
            "cache": {"backend": "redis", "url": redis_url, "ttl_s": TTL_S},
            "retrievers": [
                {"name": "keyword", "kind": "keyword", "artifacts": str(out / "keyword"),
                 "ray_actor_options": {"num_cpus": 0.1}},
                synthetic("quick"),
            ],
        },
        base_dir=Path("."),
    )
    serve.run(app_from_config(config, api_keys=[]), name="cached", route_prefix="/cached")
    return "/cached"


@pytest.fixture(scope="module")
def cached_url(cluster, redis_server, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("cached-index")
    url = cluster + deploy(redis_server.url, corpus, out)
    yield url, out
    serve.delete("cached")


def search(url: str, query: str, **body) -> dict:
    r = httpx.post(f"{url}/v1/search", json={"query": query, **body}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def cache_states(answer: dict) -> dict[str, tuple[str | None, bool]]:
    return {name: (s["cache"], s["cached"]) for name, s in answer["retrievers"].items()}


def test_a_repeated_query_is_a_hit_with_the_same_answer_and_expires(cached_url):
    url, _ = cached_url
    first = search(url, "stem cells and nanotechnology")
    assert cache_states(first) == {"keyword": ("miss", False), "quick": ("miss", False)}
    again = search(url, "stem  cells and nanotechnology ")  # the same query, normalised
    assert cache_states(again) == {"keyword": ("hit", True), "quick": ("hit", True)}
    assert again["results"] == first["results"]
    # A smaller top_k is the same answer, cut: the key holds max(the retriever's top_k, the request's),
    # so it is a hit. A top_k above the retriever's own is another key: a miss, and a longer answer.
    fewer = search(url, "stem cells and nanotechnology", top_k=3)
    assert cache_states(fewer) == {"keyword": ("hit", True), "quick": ("hit", True)}
    assert fewer["results"] == first["results"][:3]
    more = search(url, "stem cells and nanotechnology", top_k=40)
    assert cache_states(more) == {"keyword": ("miss", False), "quick": ("miss", False)}
    assert len(more["results"]) > len(first["results"])
    bypass = search(url, "stem cells and nanotechnology", cache=False)
    assert cache_states(bypass) == {"keyword": ("off", False), "quick": ("off", False)}
    time.sleep(TTL_S + 0.5)  # Redis expires the entries (the key's TTL)
    assert cache_states(search(url, "stem cells and nanotechnology"))["keyword"] == ("miss", False)


def test_a_reingest_is_never_answered_from_the_old_index(cached_url, redis_server, corpus, cluster):
    url, out = cached_url
    query = "quokkaflux stem cells"  # a word no document has, until the re-ingest adds one
    before = search(url, query, retrievers=["keyword"])
    assert search(url, query, retrievers=["keyword"])["retrievers"]["keyword"]["cached"] is True
    new_doc = {"_id": "new-quokkaflux", "title": "", "text": "Quokkaflux labelling of stem cells in vivo."}
    with corpus.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(new_doc) + "\n")
    serve.delete("cached")
    deploy(redis_server.url, corpus, out)  # the re-ingest swaps the index in; new replicas load it
    after = search(url, query, retrievers=["keyword"])
    assert after["retrievers"]["keyword"]["cache"] == "miss"  # a new fingerprint: the old entries are never read
    assert "new-quokkaflux" not in {r["id"] for r in before["results"]}
    assert after["results"][0]["id"] == "new-quokkaflux"


def test_redis_killed_under_traffic_loses_no_request_and_comes_back(cached_url, redis_server):
    url, _ = cached_url
    codes: Counter[int] = Counter()
    states: list[tuple[float, str]] = []
    stop = threading.Event()

    def loop(i: int) -> None:
        with httpx.Client(timeout=30) as client:
            n = 0
            while not stop.is_set():
                n += 1
                r = client.post(f"{url}/v1/search", json={"query": f"stem cells {i} {n % 5}"})
                codes[r.status_code] += 1
                if r.status_code == 200:
                    states.append((time.monotonic(), r.json()["retrievers"]["keyword"]["cache"]))

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: any(s == "hit" for _, s in states), 30)
        redis_server.kill()
        killed = time.monotonic()
        wait_until(lambda: sum(s == "bypass" for t, s in states if t > killed) >= 5, 30)
        redis_server.start()
        back = time.monotonic()
        wait_until(lambda: any(s in {"hit", "miss"} for t, s in states if t > back), 30)
    finally:
        stop.set()
        for t in threads:
            t.join()
    after_kill = Counter(s for t, s in states if killed < t < back)
    print(f"\nRedis killed under 4 clients: {sum(codes.values())} requests {dict(codes)}; "
          f"keyword cache states while it was down {dict(after_kill)}")
    assert set(codes) == {200} and codes[200] > 0  # not one request failed
    assert after_kill["bypass"] >= 5
