"""What the death of the HTTP ingress costs: how long HTTP is down, and what clients lose.

    .venv/bin/python -m benchmarks.ingress_kill --output docs/data/ingress-kill.json
    RAY_SERVE_PROXY_HEALTH_CHECK_PERIOD_S=10 .venv/bin/python -m benchmarks.ingress_kill   # Serve's default

A local cluster started as `ragfan serve` starts it (serve_app/app.py: SERVE_ENV; a value already in
the environment wins), and a small app: one synthetic retriever on the demo corpus, as the ingress
neither knows nor cares what the app does. Each round, four `RagClient(url=...)` threads (they try
a refused connection again until `timeout_s`) and one raw httpx loop (no retry) search for 3 s;
then Serve's HTTP proxy actor, the process that owns the HTTP port, is killed with `ray.kill`, and
the loops go on until HTTP has answered for 3 s again. Per round:

- `down_s`: from the kill to the raw loop's first answer after its last failure;
- `raw`: what the raw loop got, by kind (200, ConnectError, ...);
- `client_lost`: RagClient searches that raised; `client_slowest_s`: their slowest answer.

The report has each round, the medians, and the CPU that Serve's controller and proxy use at rest
(`idle_cpu_pct`, measured before the first round): what checking the proxy more often costs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

ROUNDS = 3
CLIENT_THREADS = 4
STEADY_S = 3.0  # searching before the kill, and answering again after it, before a round ends
GIVE_UP_S = 120.0  # a round whose HTTP is not back by then ends anyway, and says so
PERIOD_ENV = "RAY_SERVE_PROXY_HEALTH_CHECK_PERIOD_S"
IDLE_S = 20.0


def _proxy() -> Any:
    import ray

    for a in ray.util.list_named_actors(all_namespaces=True):
        if a["name"].startswith("SERVE_PROXY_ACTOR"):
            return ray.get_actor(a["name"], namespace=a["namespace"])
    raise RuntimeError("no Serve HTTP proxy actor is running")


def idle_cpu() -> dict[str, float]:
    """% of a core that Serve's controller and proxy use with no traffic, over IDLE_S: what checking
    the proxy more often costs."""
    from benchmarks import resources

    time.sleep(5)  # let start-up settle
    before = resources.cpu_snapshot()
    time.sleep(IDLE_S)
    used = resources.cpu_seconds_by_role(before, resources.cpu_snapshot())
    return {role: round(100 * used.get(role, 0.0) / IDLE_S, 2) for role in ("controller", "proxy")}


def one_round(url: str) -> dict[str, Any]:
    from serve_app.client import RagClient

    stop = threading.Event()
    raw: list[tuple[float, str]] = []  # (when it ended, what it got)
    client: list[tuple[float, str]] = []  # (how long it took, "ok" or the error)

    def raw_loop() -> None:
        with httpx.Client(timeout=10) as c:
            while not stop.is_set():
                try:
                    r = c.post(f"{url}/v1/search", json={"query": "vitamin d cancer risk"})
                    raw.append((time.monotonic(), str(r.status_code)))
                except httpx.TransportError as exc:
                    raw.append((time.monotonic(), type(exc).__name__))
                    time.sleep(0.01)  # a refused port answers at once: do not spin

    def client_loop() -> None:
        with RagClient(url=url, timeout_s=60) as c:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    c.search("vitamin d cancer risk")
                    client.append((time.monotonic() - started, "ok"))
                except Exception as exc:  # a lost search: what the benchmark counts
                    client.append((time.monotonic() - started, f"{type(exc).__name__}: {exc}"[:200]))

    threads = [threading.Thread(target=raw_loop)]
    threads += [threading.Thread(target=client_loop) for _ in range(CLIENT_THREADS)]
    for t in threads:
        t.start()
    try:
        time.sleep(STEADY_S)
        import ray

        killed_at = time.monotonic()
        ray.kill(_proxy(), no_restart=True)
        back_at = None
        while time.monotonic() - killed_at < GIVE_UP_S:
            time.sleep(0.1)
            failures = [t for t, got in raw if t > killed_at and got != "200"]
            if failures:
                back_at = next((t for t, got in raw if t > failures[-1] and got == "200"), None)
                if back_at is not None and time.monotonic() - back_at >= STEADY_S:
                    break
            elif time.monotonic() - killed_at >= 2 * STEADY_S:  # no failure seen at all
                back_at = killed_at
                break
    finally:
        stop.set()
        for t in threads:
            t.join()
    lost = [got for _, got in client if got != "ok"]
    return {
        "down_s": round(back_at - killed_at, 2) if back_at is not None else None,
        "raw": dict(Counter(got for t, got in raw if t > killed_at)),
        "client_searches": len(client),
        "client_lost": len(lost),
        "client_lost_examples": lost[:3],
        "client_slowest_s": round(max(s for s, _ in client), 2),
    }


def run(rounds: int) -> dict[str, Any]:
    import ray
    from ray import serve

    from benchmarks.bench import machine, versions
    from serve_app.app import app_from_config, serve_env
    from serve_app.config import DEFAULT_CONFIG, parse_config

    with serve_env():
        period = os.environ.get(PERIOD_ENV)
        ray.init(include_dashboard=False, log_to_driver=False)
    port = 8000 + os.getpid() % 1000
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    corpus = DEFAULT_CONFIG.parent / "data" / "corpus.jsonl"
    config = parse_config({
        "app_name": "ingress-bench", "cache": None,
        "gateway": {"ray_actor_options": {"num_cpus": 0.2}},
        "retrievers": [{"name": "corpus", "kind": "synthetic", "data": str(corpus),
                        "ray_actor_options": {"num_cpus": 0.2}}],
    }, base_dir=Path("."))
    serve.run(app_from_config(config, api_keys=[]), name="ingress-bench", route_prefix="/bench")
    url = f"http://127.0.0.1:{port}/bench"
    try:
        idle = idle_cpu()
        print(f"idle, % of a core: {idle}", flush=True)
        results = []
        for i in range(rounds):
            results.append(one_round(url))
            print(f"round {i + 1}: {results[-1]}", flush=True)
    finally:
        serve.delete("ingress-bench")
        ray.shutdown()
    downs = [r["down_s"] for r in results if r["down_s"] is not None]
    return {
        "benchmark": "ingress_kill",
        "proxy_health_check_period_s": float(period) if period else 10.0,
        "idle_cpu_pct": idle,
        "rounds": results,
        "median_down_s": statistics.median(downs) if downs else None,
        "client_lost": sum(r["client_lost"] for r in results),
        "client_searches": sum(r["client_searches"] for r in results),
        "machine": machine(),
        "versions": versions(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--output", help="write the report as JSON here")
    args = parser.parse_args()
    report = run(args.rounds)
    print(json.dumps({k: v for k, v in report.items() if k not in ("machine", "versions")}, indent=1))
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
