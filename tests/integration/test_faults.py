"""Fan-out behaviour with retrievers that sleep, fail and hang, and replicas killed mid-traffic."""

from __future__ import annotations

import itertools
import threading
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import ray

from tests.integration.conftest import held, holding, replica_actors, wait_until

SLOW = ["slow1", "slow2", "slow3", "slow4"]


def search(http, url, **body):
    return http.post(f"{url}/v1/search", json={"query": "vitamin d cancer risk", **body})


def detail(http, url, name) -> dict:
    """What the retriever's replica reports about itself (describe()), through /v1/retrievers."""
    infos = http.get(f"{url}/v1/retrievers").json()["retrievers"]
    return next(i for i in infos if i["name"] == name)["detail"]


def all_started_before_any_ended(calls: list[dict]) -> bool:
    """Calls overlapped: the last to start started before the first to end ended (one clock per machine)."""
    return max(c["started"] for c in calls) < min(c["ended"] for c in calls)


def test_four_200ms_retrievers_answer_together(faults_url, http):
    search(http, faults_url, retrievers=SLOW)  # warm the path once
    for _ in range(3):
        r = search(http, faults_url, retrievers=SLOW)
        assert r.status_code == 200
        body = r.json()
        assert all(body["retrievers"][n]["status"] == "ok" for n in SLOW)
        # each retriever's call of this request: the last one its replica made
        calls = [detail(http, faults_url, n)["recent_calls"][-1] for n in SLOW]
        # one after another, each would end before the next started; in parallel, all four 200 ms
        # calls started before any of them ended
        assert all_started_before_any_ended(calls), calls


def test_a_raising_retriever_degrades_the_answer(faults_url, http):
    r = search(http, faults_url, retrievers=["slow1", "failing"])
    assert r.status_code == 200
    body = r.json()
    assert body["degraded"] is True and body["results"]
    assert body["retrievers"]["slow1"]["status"] == "ok"
    failing = body["retrievers"]["failing"]
    assert failing["status"] == "error" and "configured to fail" in failing["error"]
    assert body["retrievers"]["hanging"]["status"] == "skipped"


def test_a_hanging_retriever_times_out_at_its_deadline(faults_url, http):
    wait_until(lambda: detail(http, faults_url, "hanging")["calls"]["running"] == 0, 30)
    before = detail(http, faults_url, "hanging")["calls"]
    r = search(http, faults_url, retrievers=["slow1", "hanging"])
    assert r.status_code == 200
    body = r.json()
    assert body["degraded"] is True and body["retrievers"]["slow1"]["status"] == "ok"
    hanging = body["retrievers"]["hanging"]
    assert hanging["status"] == "timeout" and "300 ms" in hanging["error"]
    assert hanging["latency_ms"] >= 300  # the deadline never fires early
    # The 5 s sleep is never waited for: the call was cancelled and stopped, it did not run out.
    wait_until(lambda: detail(http, faults_url, "hanging")["calls"]["running"] == 0, 30)
    after = detail(http, faults_url, "hanging")["calls"]
    assert {k: after[k] - before[k] for k in ("started", "cancelled", "stopped_early")} == {
        "started": 1, "cancelled": 1, "stopped_early": 1,
    }


def test_a_cancelled_call_stops_working_in_the_replica(faults_url, http):
    """At the deadline the replica is told to stop, and the search stops: counted in the replica."""
    def calls() -> dict:
        return detail(http, faults_url, "stuck")["calls"]

    wait_until(lambda: calls()["running"] == 0, 30)  # calls left by earlier tests have stopped
    before = calls()
    for _ in range(4):  # each call sleeps for a minute, unless it is stopped
        r = search(http, faults_url, retrievers=["quick", "stuck"])
        assert r.status_code == 200 and r.json()["retrievers"]["stuck"]["status"] == "timeout"
        wait_until(lambda: calls()["running"] == 0, 30)
    after = calls()
    grew = {k: after[k] - before[k] for k in ("started", "cancelled", "stopped_early")}
    print(f"\nstuck, 4 requests past their 300 ms deadline: replica calls {grew}")
    # every call was cancelled in the replica, and every one stopped there rather than sleeping on
    assert grew == {"started": 4, "cancelled": 4, "stopped_early": 4}


def test_the_request_timeout_lowers_every_deadline(faults_url, http):
    r = search(http, faults_url, retrievers=["slow1", "slow2"], timeout_ms=50)
    # the request's own deadline cut both short: a degraded empty answer, not a 503 (see the gateway)
    assert r.status_code == 200
    body = r.json()
    assert body["results"] == [] and body["degraded"] is True
    reasons = {n: {"status": body["retrievers"][n]["status"], "error": body["retrievers"][n]["error"]}
               for n in ("slow1", "slow2")}
    assert reasons == {
        "slow1": {"status": "timeout", "error": "no answer within 50 ms"},
        "slow2": {"status": "timeout", "error": "no answer within 50 ms"},
    }


def test_503_when_every_selected_retriever_fails(faults_url, http):
    r = search(http, faults_url, retrievers=["failing"])
    assert r.status_code == 503
    assert r.json()["detail"]["retrievers"]["failing"]["status"] == "error"


def test_max_concurrent_batches_lets_a_replica_overlap_slow_batches(faults_url, http):
    def one() -> dict:
        with httpx.Client(timeout=150) as c:
            r = search(c, faults_url, retrievers=["overlapping"])
            assert r.status_code == 200, r.text
            return r.json()["retrievers"]["overlapping"]

    assert one()["status"] == "ok"  # the path is up
    # the hold goes first, then the pool waits for the answers (the other order would wait out the deadline)
    with ThreadPoolExecutor(4) as pool, holding("overlapping"):
        answers = [pool.submit(one) for _ in range(4)]
        # Every call waits inside the replica until the hold goes. Four batches of one are inside at
        # once only if the replica runs four at a time: one at a time, the second would wait for the
        # first, which waits for the hold.
        inside = wait_until(lambda: held("overlapping") == 4, 90, 0.05)
        assert not any(a.done() for a in answers)
    assert [a.result()["status"] for a in answers] == ["ok"] * 4
    calls = detail(http, faults_url, "overlapping")["recent_calls"][-4:]  # the four requests' batches
    assert all_started_before_any_ended(calls), calls
    print(f"\noverlapping: 4 held batches inside the replica at once {inside:.2f} s after they were sent")


def test_disabled_app_answers_empty_at_once(off_url, http):
    r = http.post(f"{off_url}/v1/search", json={"query": "anything"})
    assert r.status_code == 200
    body = r.json()
    assert body["results"] == [] and body["degraded"] is False
    assert {s["status"] for s in body["retrievers"].values()} == {"skipped"}
    assert all("disabled" in s["error"] for s in body["retrievers"].values())  # answered without asking any
    assert http.post(f"{off_url}/v1/search", json={"query": ""}).status_code == 422
    info = http.get(f"{off_url}/v1/retrievers").json()
    assert info["enabled"] is False and not any(i["healthy"] for i in info["retrievers"])
    # no retriever deployment (and so no model) exists for the disabled app
    assert replica_actors("off", "corpus") == []


def test_killing_a_retrievers_replicas_during_traffic_loses_no_request(base_url, http):
    codes: list[int] = []
    keyword: list[tuple[int, str]] = []  # (request sequence number, keyword's status), in answer order
    sent = itertools.count()
    killed = threading.Event()
    stop = threading.Event()

    def client_loop() -> None:
        with httpx.Client(timeout=30) as c:
            while not stop.is_set():
                number = next(sent) if killed.is_set() else -1  # numbered once the kill is done
                r = c.post(f"{base_url}/v1/search", json={"query": "insulin resistance and obesity", "top_k": 5,
                                                         "cache": False})  # reach the retriever
                codes.append(r.status_code)
                if r.status_code == 200:
                    keyword.append((number, r.json()["retrievers"]["keyword"]["status"]))

    def down_then_back() -> tuple[int, int] | None:
        """The first request sent after the kill that saw keyword not ok, and a later one that saw it ok."""
        down = min((n for n, s in keyword if n >= 0 and s != "ok"), default=None)
        back = min((n for n, s in keyword if down is not None and n > down and s == "ok"), default=None)
        return None if back is None else (down, back)

    victims = replica_actors("ragfan", "keyword")
    assert victims
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(client_loop) for _ in range(4)]
        wait_until(lambda: len(keyword) >= 8, 30)  # traffic flows before the kill
        for actor in victims:
            ray.kill(actor, no_restart=True)
        killed.set()
        try:
            recovered_s = wait_until(lambda: down_then_back() is not None, timeout_s=60)
        finally:
            stop.set()
            for f in futures:
                f.result()
    print(
        f"\nkill test: {len(codes)} requests, {codes.count(200)} x 200, "
        f"{sum(c >= 500 for c in codes)} x 5xx, keyword statuses {dict(Counter(s for _, s in keyword))}, "
        f"keyword seen down, then ok again {recovered_s:.1f} s after the kill"
    )
    assert codes and all(c == 200 for c in codes), sorted(set(codes))
    down, back = down_then_back()
    assert down < back  # keyword was seen down by an answer after the kill, then seen back


def test_killing_the_encoder_degrades_the_dense_retrievers_while_keyword_and_graph_answer(base_url, http):
    query = {"query": "vitamin D and multiple sclerosis", "top_k": 5, "cache": False}  # reach the retrievers
    before = http.post(f"{base_url}/v1/search", json=query).json()
    assert {n: s["status"] for n, s in before["retrievers"].items()} == dict.fromkeys(before["retrievers"], "ok")
    victims = replica_actors("ragfan", "encoder")
    assert victims
    for actor in victims:
        ray.kill(actor, no_restart=True)

    r = http.post(f"{base_url}/v1/search", json=query)
    assert r.status_code == 200
    body = r.json()
    statuses = body["retrievers"]
    print("\nencoder killed:", {n: (s["status"], s["error"]) for n, s in statuses.items()})
    assert body["degraded"] is True and body["results"]
    for name in ("corpus", "persona", "domain"):  # their queries need the encoder's vector
        assert statuses[name]["status"] in {"error", "timeout"}, statuses[name]
        assert "encoder" in statuses[name]["error"], statuses[name]
    assert statuses["keyword"]["status"] == "ok"
    assert statuses["graph"]["status"] == "ok" and "linked entities by name only" in statuses["graph"]["error"]
    assert statuses["graph"]["num_hits"] > 0  # "multiple sclerosis" and "vitamin D" are entities by name

    def dense_ok_again() -> bool:  # a 503 while corpus's circuit is open; its probes pass once the encoder is back
        again = http.post(f"{base_url}/v1/search", json={**query, "retrievers": ["corpus"]})
        return again.status_code == 200 and again.json()["retrievers"]["corpus"]["status"] == "ok"

    print(f"encoder back after {wait_until(dense_ok_again, timeout_s=90):.1f} s")


def test_with_log_searches_the_gateway_logs_one_line_per_request_without_the_query(faults_url, http):
    query = f"log line check {uuid.uuid4().hex}"  # text no other request sends
    r = search(http, faults_url, query=query, retrievers=["quick", "slow1"])
    assert r.status_code == 200
    body = r.json()
    # What this request's line says, read off its answer: the total latency to 0.1 ms and each asked
    # retriever's status and latency. Another request's line matches only if all of them coincide.
    parts = [f" search {body['latency_ms']:.1f} ms ", *(
        f" {name}={s['status']}/{s['latency_ms']:.0f}ms" for name, s in body["retrievers"].items()
        if s["status"] != "skipped"
    )]
    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"

    def matching() -> list[tuple[str, str]]:
        return [
            (path.name, line)
            for path in logs.glob("*.log")
            for line in path.read_text(errors="replace").splitlines()
            if all(part in line for part in parts)
        ]

    wait_until(lambda: matching(), 10)  # the replica's log buffer reaches the file
    [(file, line)] = matching()  # exactly one line: this request's
    assert file.startswith("replica_faults_gateway_") and line.startswith("INFO "), (file, line)
    leaked = [p.name for p in logs.glob("*.log") if query in p.read_text(errors="replace")]
    assert leaked == []  # the query text is never logged, by any replica
