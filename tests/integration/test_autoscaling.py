"""Serve autoscaling from ragfan's config: the busiest retriever scales up under load and back down."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.integration.conftest import replica_actors, wait_until


def test_autoscaling_a_busy_retriever_up_under_load_and_down_after(elastic_url):
    assert len(replica_actors("elastic", "busy")) == 1
    stop = threading.Event()
    codes: list[int] = []

    def client() -> None:
        with httpx.Client(timeout=30) as c:
            while not stop.is_set():
                codes.append(c.post(f"{elastic_url}/v1/search", json={"query": "vitamin d"}).status_code)

    counts: list[int] = []  # replica counts seen while the load ran

    def scaled_up() -> bool:
        counts.append(len(replica_actors("elastic", "busy")))
        return counts[-1] >= 2

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(client) for _ in range(6)]
        try:
            up = wait_until(scaled_up, 60, interval_s=0.5)
            for _ in range(8):  # keep the load on a little longer: it may reach the maximum
                time.sleep(0.5)
                counts.append(len(replica_actors("elastic", "busy")))
        finally:
            stop.set()
            for f in futures:
                f.result()
    peak = max(counts)
    down = wait_until(lambda: len(replica_actors("elastic", "busy")) == 1, 90, interval_s=0.5)
    print(f"\nautoscaling busy 1..3: up to {peak} replicas {up:.1f} s into the load, back to 1 replica"
          f" {down:.1f} s after it stopped; {len(codes)} requests, statuses {sorted(set(codes))}")
    assert 1 < peak <= 3  # above min_replicas under load, never above max_replicas
    assert set(codes) == {200}
