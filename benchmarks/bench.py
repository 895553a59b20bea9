"""`ragfan bench`: latency, throughput, CPU and memory of ragfan against the in-process designs.

    ragfan bench --profile seed              # sleeping retrievers with the old design's latencies
    ragfan bench --dataset DIR               # real retrievers over a BEIR corpus

Every system runs in this one process tree and one run, over the same retrievers and queries.
Clients are closed-loop: each of `concurrency` clients sends its next query when the previous one
answers. In-process systems run first, before Ray starts, so their memory is this process alone;
the served systems' memory is summed over every process of the tree, Ray's included.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import platform
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from benchmarks import resources
from benchmarks.systems import (
    SEED_PROFILE_MS,
    Sequential,
    ThreadPoolManager,
    compute_limit,
    dataset_retrievers,
    seed_retrievers,
)

DEMO_CORPUS = Path(__file__).resolve().parents[1] / "serve_app" / "demo" / "data" / "corpus.jsonl"
SEED_QUERIES = [
    "vitamin D and multiple sclerosis", "metformin in type 2 diabetes", "p53 mutations in cancer",
    "statins and cardiovascular risk", "gut microbiota and obesity", "malaria vaccine efficacy",
]


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


async def closed_loop(call: Callable[[str], Awaitable[Any]], queries: Sequence[str], concurrency: int,
                      duration_s: float) -> tuple[list[float], float]:
    latencies: list[float] = []
    stream = itertools.cycle(queries)
    end = time.perf_counter() + duration_s

    async def client() -> None:
        while time.perf_counter() < end:
            started = time.perf_counter()
            await call(next(stream))
            latencies.append((time.perf_counter() - started) * 1000)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return latencies, time.perf_counter() - started


def measure(system: str, concurrency: int, call, queries, duration_s: float, warmup: int = 3) -> dict[str, Any]:
    async def run() -> tuple[list[float], float]:
        for q in queries[:warmup]:
            await call(q)
        return await closed_loop(call, queries, concurrency, duration_s)

    cpu0 = resources.cpu_seconds()
    with resources.PeakRSS() as rss:
        latencies, elapsed = asyncio.run(run())
    cpu = resources.cpu_seconds() - cpu0
    return row(system, concurrency, latencies, elapsed, cpu, rss.peak_mb)


def row(system, concurrency, latencies, elapsed, cpu, peak_mb) -> dict[str, Any]:
    n = len(latencies)
    return {
        "system": system,
        "concurrency": concurrency,
        "requests": n,
        "p50_ms": round(percentile(latencies, 50), 1),
        "p95_ms": round(percentile(latencies, 95), 1),
        "p99_ms": round(percentile(latencies, 99), 1),
        "qps": round(n / elapsed, 2),
        "cpu_s_per_query": round(cpu / max(n, 1), 4),
        "peak_rss_mb": round(peak_mb, 0),
    }


def _in_process_runs(retrievers, queries, concurrencies, duration_s, bar) -> list[dict[str, Any]]:
    runs = []
    sequential = Sequential(retrievers)
    for c in concurrencies:
        bar.set_description(f"sequential c={c}")
        pool = ThreadPoolExecutor(max_workers=c)  # c client threads, each one chain at a time

        async def call(q: str, pool=pool) -> Any:
            return await asyncio.get_running_loop().run_in_executor(pool, sequential.search, q)

        runs.append(measure("sequential", c, call, queries, duration_s))
        pool.shutdown()
        bar.update(1)
    for c in concurrencies:
        bar.set_description(f"threadpool c={c}")
        manager = ThreadPoolManager(retrievers)
        runs.append(measure("threadpool", c, manager.search, queries, duration_s))
        manager.close()
        bar.update(1)
    bar.set_description("compute-limit")
    cpu0 = resources.cpu_seconds()
    with resources.PeakRSS() as rss:
        batch_queries = list(itertools.islice(itertools.cycle(queries), max(256, len(queries))))
        n, seconds = compute_limit(retrievers, batch_queries)
    runs.append(row("compute-limit", 256, [seconds * 1000 / n] * n, seconds, resources.cpu_seconds() - cpu0,
                    rss.peak_mb) | {"p50_ms": None, "p95_ms": None, "p99_ms": None})
    bar.update(1)
    return runs


def _app_config(profile: str, artifacts: Path | None, batch: int) -> dict[str, Any]:
    # The batch window is set against each profile's service time: the seed retrievers take 150 to
    # 300 ms a batch whatever its size, so a 50 ms window to gather a full batch is cheap; the real
    # retrievers take milliseconds, so their window stays at the 10 ms default.
    # The seed retrievers only wait, so a replica overlaps several batches (max_concurrent_batches);
    # the real ones are CPU-bound, and a second batch at once would only compete for the same cores.
    wait, overlap = (0.05, 8) if profile == "seed" else (0.01, 1)
    common = {"max_ongoing_requests": 256 if profile == "seed" else 128,
              "batch": {"max_batch_size": batch, "batch_wait_timeout_s": wait, "max_concurrent_batches": overlap}}
    if profile == "seed":
        retrievers = [
            {"name": n, "kind": "synthetic", "data": str(DEMO_CORPUS), "delay_ms": ms, "timeout_ms": 10_000,
             "ray_actor_options": {"num_cpus": 0.25}, **common}
            for n, ms in SEED_PROFILE_MS.items()
        ]
    else:
        assert artifacts is not None
        retrievers = [
            {"name": n, "kind": kind, "artifacts": str(artifacts / kind), "timeout_ms": 30_000,
             "ray_actor_options": {"num_cpus": 0.5}, **common}
            for n, kind in (("dense", "dense"), ("keyword", "keyword"), ("dense2", "dense"))
        ]
    return {
        "app_name": "ragfan-bench",
        "gateway": {"ray_actor_options": {"num_cpus": 0.25}, "max_ongoing_requests": 1000},
        "retrievers": retrievers,
    }


def _served_runs(config_raw, names, queries, concurrencies, duration_s, port, bar, *, batch1_config=None):
    import httpx
    from ray import serve

    from serve_app.app import app_from_config
    from serve_app.client import RagClient
    from serve_app.config import parse_config

    runs = []
    handle = serve.run(app_from_config(parse_config(config_raw, base_dir=Path("."))), name="ragfan-bench",
                       route_prefix="/bench")
    client = RagClient.from_handle(handle)
    for c in concurrencies:
        bar.set_description(f"ragfan-handle c={c}")
        runs.append(measure("ragfan-handle", c, lambda q: client.search_async(q, top_k=10), queries, duration_s))
        bar.update(1)
    for c in concurrencies:
        bar.set_description(f"ragfan-http c={c}")

        async def call(q: str, c=c) -> Any:
            async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=c)) as http:
                r = await http.post(f"http://127.0.0.1:{port}/bench/v1/search", json={"query": q, "top_k": 10})
                r.raise_for_status()

        runs.append(measure("ragfan-http", c, call, queries, duration_s))
        bar.update(1)
    for name in names:
        bar.set_description(f"single:{name}")
        runs.append(measure(f"single:{name}", 1, lambda q, n=name: client.search_async(q, top_k=10, retrievers=[n]),
                            queries, duration_s))
        bar.update(1)
    if batch1_config is not None:
        bar.set_description("ragfan-handle batch size 1, c=32")
        handle = serve.run(app_from_config(parse_config(batch1_config, base_dir=Path("."))), name="ragfan-bench",
                           route_prefix="/bench")
        client = RagClient.from_handle(handle)
        runs.append(measure("ragfan-handle-batch1", 32, lambda q: client.search_async(q, top_k=10), queries,
                            duration_s))
        bar.update(1)
    serve.delete("ragfan-bench")
    return runs


def machine() -> dict[str, Any]:
    import psutil

    cpu_model = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu_model = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cores": os.cpu_count(), "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "cpu_model": cpu_model}


def versions() -> dict[str, str]:
    import faiss
    import ray
    import sentence_transformers
    import torch

    from serve_app import __version__

    return {"python": platform.python_version(), "ray": ray.__version__, "torch": torch.__version__,
            "faiss": faiss.__version__, "sentence_transformers": sentence_transformers.__version__,
            "ragfan": __version__}


def run_bench(*, profile: str | None, dataset: str | None, concurrencies: Sequence[int], duration_s: float,
              port: int = 8123) -> dict[str, Any]:
    import ray
    from ray import serve

    from serve_app.app import serve_env

    if (profile is None) == (dataset is None):
        raise ValueError("give exactly one of --profile seed and --dataset DIR")
    artifacts = None
    if profile == "seed":
        retrievers = seed_retrievers(DEMO_CORPUS)
        queries = SEED_QUERIES
    else:
        from actors.index import default_cache_dir
        from actors.ingest import ingest
        from serve_app.evaluate import load_beir

        path = Path(dataset)
        artifacts = default_cache_dir() / "datasets" / path.resolve().name
        queries_by_id, _ = load_beir(path, "test")
        queries = list(queries_by_id.values())
        ingest(path / "corpus.jsonl", artifacts, kinds=("dense", "keyword"))  # reuses what eval built
        ray.shutdown()  # ingest may have started Ray; the in-process systems run without it
        retrievers = dataset_retrievers(artifacts)
    names = list(retrievers)
    total = 2 * len(concurrencies) + 1 + 2 * len(concurrencies) + len(names) + (1 if dataset else 0)
    with tqdm(total=total, desc="bench", unit="run") as bar:
        runs = _in_process_runs(retrievers, queries, concurrencies, duration_s, bar)
        del retrievers
        with serve_env():
            ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        try:
            config = _app_config(profile or "dataset", artifacts, batch=32)
            batch1 = _app_config(profile or "dataset", artifacts, batch=1) if dataset else None
            runs += _served_runs(config, names, queries, concurrencies, duration_s, port, bar, batch1_config=batch1)
        finally:
            serve.shutdown()
            ray.shutdown()
    source = {"profile": profile} if profile else {"dataset": str(dataset)}
    return {"machine": machine(), "versions": versions(), **source, "duration_s": duration_s, "runs": runs}


def format_table(report: dict[str, Any]) -> str:
    lines = [f"{'system':<22}{'conc':>5}{'reqs':>7}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'QPS':>9}"
             f"{'CPU s/q':>9}{'RSS MB':>8}"]
    for r in report["runs"]:
        def fmt(v, spec):
            return format(v, spec) if v is not None else "-"
        lines.append(f"{r['system']:<22}{r['concurrency']:>5}{r['requests']:>7}{fmt(r['p50_ms'], '9.1f')}"
                     f"{fmt(r['p95_ms'], '9.1f')}{fmt(r['p99_ms'], '9.1f')}{r['qps']:>9.2f}"
                     f"{r['cpu_s_per_query']:>9.4f}{r['peak_rss_mb']:>8.0f}")
    return "\n".join(lines + ["", *targets(report)])


def _get(report, system, concurrency):
    return next((r for r in report["runs"] if r["system"] == system and r["concurrency"] == concurrency), None)


def targets(report: dict[str, Any]) -> list[str]:
    """The issue's targets, as ratios measured in this run."""
    out = ["targets:"]

    def check(label: str, ok: bool, detail: str) -> None:
        out.append(f"  [{'met' if ok else 'MISSED'}] {label}: {detail}")

    h1 = _get(report, "ragfan-handle", 1)
    if report.get("profile") == "seed":
        s1 = _get(report, "sequential", 1)
        if h1 and s1:
            check("c=1 p50 <= 315 ms", h1["p50_ms"] <= 315, f"{h1['p50_ms']} ms")
            check("c=1 speedup over sequential >= 2.7x", s1["p50_ms"] / h1["p50_ms"] >= 2.7,
                  f"{s1['p50_ms'] / h1['p50_ms']:.2f}x")
        h64, t64 = _get(report, "ragfan-handle", 64), _get(report, "threadpool", 64)
        if h64 and t64:
            check("c=64 QPS >= 10x threadpool", h64["qps"] >= 10 * t64["qps"], f"{h64['qps'] / t64['qps']:.1f}x")
        return out
    singles = [r for r in report["runs"] if r["system"].startswith("single:")]
    if h1 and singles:
        slowest = max(r["p50_ms"] for r in singles)
        check("c=1 p50 <= slowest single p50 + 10 ms", h1["p50_ms"] <= slowest + 10,
              f"{h1['p50_ms']} ms vs {slowest} ms")
    h32, t32 = _get(report, "ragfan-handle", 32), _get(report, "threadpool", 32)
    limit = next((r for r in report["runs"] if r["system"] == "compute-limit"), None)
    if h32 and t32 and limit:
        check("c=32 QPS >= 1.5x threadpool", h32["qps"] >= 1.5 * t32["qps"], f"{h32['qps'] / t32['qps']:.2f}x")
        check("c=32 QPS >= 50% of compute-limit", h32["qps"] >= 0.5 * limit["qps"],
              f"{100 * h32['qps'] / limit['qps']:.0f}%")
        check("c=32 p99 <= 3x p50", h32["p99_ms"] <= 3 * h32["p50_ms"], f"{h32['p99_ms'] / h32['p50_ms']:.2f}x")
    b1 = _get(report, "ragfan-handle-batch1", 32)
    if h32 and b1:
        out.append(f"  dynamic batching at c=32: {h32['qps'] / b1['qps']:.2f}x the QPS of batch size 1")
    return out


def main(profile: str | None, dataset: str | None, concurrency: str, duration: float, output: str | None) -> int:
    concurrencies = [int(c) for c in concurrency.split(",") if c.strip()]
    report = run_bench(profile=profile, dataset=dataset, concurrencies=concurrencies, duration_s=duration)
    print(format_table(report))
    if output:
        Path(output).write_text(json.dumps(report, indent=2))
        print(f"wrote {output}")
    return 0


__all__ = ["format_table", "main", "run_bench"]
