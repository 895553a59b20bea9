"""What one served search costs, per process: a result-cache hit and a miss, through the handle and over HTTP.

    .venv/bin/python -m benchmarks.request_cost --dataset ../shared/datasets/scifact \
        --output docs/data/request-cost.json
    .venv/bin/python -m benchmarks.request_cost --dataset ../shared/datasets/scifact --pyspy docs/data/profile-hit.md

The app is `ragfan bench`'s SciFact app with the result cache on (three retrievers: dense, keyword
and a second dense, on the shared encoder; the embedded default's memory cache). One client at a
time (c=1), so that each figure is the cost of one search and not of contention. Each round asks
every test query once with a suffix of its own (misses: every retriever searches, the encoder
encodes), then the same queries again (hits: the cache answers, nothing is searched), first
through the handle (`RagClient.from_handle`), then over HTTP (httpx, one kept-alive connection).

Reported per run: requests, p50 latency, and CPU milliseconds per request by process role
(benchmarks/resources.py: driver = this process, the client's side; proxy; gateway; encoder; each
retriever; "ray" = raylet, GCS and agents), the median over the rounds. With `--pyspy FILE`, py-spy
records each busy process during an extra, longer hit run through the handle and one over HTTP,
summarised in FILE (benchmarks/profile.py explains how to read it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.bench import TOP_K, ServedProbe, closed_loop, dataset_cluster, machine, served_config, versions
from benchmarks.profile import Recorder, busiest_pids, to_markdown

ROUNDS = 3
PYSPY_S = 8


async def _run(system: str, call: Callable[[str], Any], queries: Sequence[str], probe: ServedProbe) -> dict[str, Any]:
    await probe.start()
    latencies, _ = await closed_loop(call, queries, 1, 3600, once=True)
    out = await probe.stop(len(latencies))
    latencies.sort()
    return {"system": system, "requests": len(latencies), "p50_ms": round(latencies[len(latencies) // 2], 2),
            "cpu_ms_by_role": out["cpu_ms_per_query_by_role"],
            "cpu_ms": round(sum(out["cpu_ms_per_query_by_role"].values()), 2)}


async def one_round(n: int, handle: Any, url: str, queries: Sequence[str]) -> list[dict[str, Any]]:
    import httpx

    from serve_app.client import RagClient

    client = RagClient.from_handle(handle)
    probe = ServedProbe(handle)
    runs = []
    by_handle = [f"{q} (round {n}, handle)" for q in queries]
    runs.append(await _run("handle-miss", lambda q: client.search_async(q, top_k=TOP_K), by_handle, probe))
    runs.append(await _run("handle-hit", lambda q: client.search_async(q, top_k=TOP_K), by_handle, probe))
    async with httpx.AsyncClient(timeout=60) as http:
        async def post(q: str) -> None:
            r = await http.post(url, json={"query": q, "top_k": TOP_K})
            r.raise_for_status()

        over_http = [f"{q} (round {n}, http)" for q in queries]
        runs.append(await _run("http-miss", post, over_http, probe))
        runs.append(await _run("http-hit", post, over_http, probe))
    return runs


async def profiled_hits(handle: Any, url: str, queries: Sequence[str]) -> list[dict[str, Any]]:
    """py-spy on every busy process during PYSPY_S seconds of hits, through the handle, then over HTTP."""
    import httpx

    from serve_app.client import RagClient

    client = RagClient.from_handle(handle)
    reports = []
    warm = [f"{q} (profiled)" for q in queries]
    for q in warm:  # every one cached
        await client.search_async(q, top_k=TOP_K)
    with Recorder(busiest_pids(), PYSPY_S) as rec:
        await closed_loop(lambda q: client.search_async(q, top_k=TOP_K), warm, 1, PYSPY_S)
    reports.append(rec.report("cache hits through the handle, c=1"))
    async with httpx.AsyncClient(timeout=60) as http:
        async def post(q: str) -> None:
            (await http.post(url, json={"query": q, "top_k": TOP_K})).raise_for_status()

        with Recorder(busiest_pids(), PYSPY_S) as rec:
            await closed_loop(post, warm, 1, PYSPY_S)
    reports.append(rec.report("cache hits over HTTP, c=1"))
    return reports


def medians(rounds: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    out = []
    for runs in zip(*rounds, strict=True):
        roles = sorted({role for r in runs for role in r["cpu_ms_by_role"]})
        out.append({
            "system": runs[0]["system"],
            "requests": runs[0]["requests"],
            "p50_ms": statistics.median(r["p50_ms"] for r in runs),
            "cpu_ms": statistics.median(r["cpu_ms"] for r in runs),
            "cpu_ms_by_role": {role: statistics.median(r["cpu_ms_by_role"].get(role, 0.0) for r in runs)
                               for role in roles},
        })
    return out


def run(dataset: Path, rounds: int, pyspy: bool, *, log_searches: bool = False,
        encoder: str = "gateway") -> dict[str, Any]:
    from ray import serve

    from serve_app.app import app_from_config

    with dataset_cluster(dataset) as (artifacts, queries):
        port = 8000 + os.getpid() % 1000
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = served_config("dataset", artifacts, 32, encoder, cache=True)
        config.gateway.log_searches = log_searches
        handle = serve.run(app_from_config(config), name="ragfan-bench", route_prefix="/bench")
        url = f"http://127.0.0.1:{port}/bench/v1/search"
        all_rounds = []
        for n in range(rounds):
            all_rounds.append(asyncio.run(one_round(n, handle, url, queries)))
            print(f"round {n + 1}: " + "; ".join(f"{r['system']} {r['cpu_ms']} ms CPU, p50 {r['p50_ms']} ms"
                                                  for r in all_rounds[-1]), flush=True)
        profiles = asyncio.run(profiled_hits(handle, url, queries)) if pyspy else []
        serve.delete("ragfan-bench")
    return {"benchmark": "request_cost", "dataset": str(dataset), "log_searches": log_searches, "encoder": encoder,
            "rounds": all_rounds, "median": medians(all_rounds),
            "pyspy": profiles, "machine": machine(), "versions": versions()}


def format_table(report: dict[str, Any]) -> str:
    roles = sorted({role for r in report["median"] for role in r["cpu_ms_by_role"]})
    lines = [f"{'run':<13}{'p50 ms':>8}{'CPU ms':>8}" + "".join(f"{role[:10]:>11}" for role in roles)]
    for r in report["median"]:
        lines.append(f"{r['system']:<13}{r['p50_ms']:>8.2f}{r['cpu_ms']:>8.2f}"
                     + "".join(f"{r['cpu_ms_by_role'].get(role, 0.0):>11.2f}" for role in roles))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, type=Path, help="a BEIR dataset directory (its test queries)")
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--output", help="write the report as JSON here")
    parser.add_argument("--pyspy", metavar="FILE", help="also profile hits with py-spy; the summary goes here")
    parser.add_argument("--log-searches", action="store_true", help="the gateway logs a line per search, as "
                        "before gateway.log_searches existed (its default is off)")
    parser.add_argument("--encoder", choices=["gateway", "deployment"], default="gateway",
                        help="queries encoded in the gateway replica (the default) or on an encoder deployment")
    args = parser.parse_args()
    report = run(args.dataset, args.rounds, bool(args.pyspy), log_searches=args.log_searches, encoder=args.encoder)
    print(format_table(report))
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=1) + "\n")
    if args.pyspy:
        Path(args.pyspy).write_text("\n\n".join(to_markdown(p) for p in report["pyspy"]) + "\n")


if __name__ == "__main__":
    main()
