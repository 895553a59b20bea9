"""`ragfan bench`: latency, throughput, CPU and memory of ragfan against the in-process designs.

    ragfan bench --profile seed              # sleeping retrievers with the old design's latencies
    ragfan bench --profile demo              # the embedded default's five retrievers, its demo queries
    ragfan bench --dataset DIR               # real retrievers over a BEIR corpus
    ragfan bench --dataset DIR --pyspy 10    # ... plus a py-spy profile of each served process at c=32

Every system runs in this one process tree and one run, over the same retrievers and queries, and
every retriever contributes its top 10 on both sides. Clients are closed-loop: each of
`concurrency` clients sends its next query when the previous one answers. In-process systems run
first, before Ray starts, so their memory is this process alone; the served systems' memory is
summed over every process of the tree, Ray's included. CPU and memory are counted over the closed
loop, after a few warm-up queries.

Each served run also records who pays for a query (CPU ms per query by process role: driver,
proxy, controller, each deployment, the rest of Ray; see resources.py) and the batch sizes that
formed on each lane (from the gateway's `stats()`). Each served app records its RSS at rest: a
moment after start and a few warm-up queries.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import os
import platform
import random
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, NamedTuple

import yaml
from tqdm.auto import tqdm

from actors.errors import RetrieverFailed
from benchmarks import resources
from benchmarks.profile import Recorder, busiest_pids, py_spy, to_markdown
from benchmarks.systems import (
    SEED_PROFILE_MS,
    TOP_K,
    Sequential,
    ThreadPoolManager,
    compute_limit,
    dataset_retrievers,
    demo_retrievers,
    onnx_encoders,
    seed_retrievers,
)
from serve_app.config import DEFAULT_CONFIG, AppConfig, load_config, parse_config

logger = logging.getLogger("ragfan")

DEMO_CORPUS = DEFAULT_CONFIG.parent / "data" / "corpus.jsonl"
DEMO_QUERIES = DEFAULT_CONFIG.parent / "data" / "demo_queries.jsonl"
SEED_QUERIES = [
    "vitamin D and multiple sclerosis", "metformin in type 2 diabetes", "p53 mutations in cancer",
    "statins and cardiovascular risk", "gut microbiota and obesity", "malaria vaccine efficacy",
]
PROFILED_CONCURRENCY = 32  # the ragfan-handle run that `--pyspy` records (else the highest)
BATCH_REPORT_CONCURRENCIES = (8, 32)
BATCH_SIZE, BATCH_CLIENTS = 32, 4  # ragfan-batch: four clients, each sending 32 queries a request

Call = Callable[[str], Awaitable[Any]]


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def demo_queries() -> list[str]:
    """The query text of each line of the demo's question set (SciFact claims)."""
    with DEMO_QUERIES.open(encoding="utf-8") as fh:
        return [json.loads(line)["text"] for line in fh if line.strip()]


async def closed_loop(call: Call, queries: Sequence[str], concurrency: int,
                      duration_s: float, *, once: bool = False) -> tuple[list[float], float]:
    """`concurrency` clients calling back to back for `duration_s`, cycling through `queries`; with
    `once`, until each query was asked once, however long that takes."""
    latencies: list[float] = []
    stream = iter(queries) if once else itertools.cycle(queries)
    end = math.inf if once else time.perf_counter() + duration_s

    async def client() -> None:
        while time.perf_counter() < end and (q := next(stream, None)) is not None:
            started = time.perf_counter()
            await call(q)
            latencies.append((time.perf_counter() - started) * 1000)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return latencies, time.perf_counter() - started


# -- what a served run records besides latency ------------------------------------------------
def batch_sizes_between(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, dict[int, int]]:
    """The batches that formed between two answers of the gateway's `stats()`: lane -> {size: count}.

    `stats()` counts since its replica started, so the run's batches are the difference; a lane
    whose counts went down (its replica restarted) keeps only the sizes that went up.
    """
    formed: dict[str, dict[int, int]] = {}
    for lane, counts in after.get("batches", {}).items():
        prior = before.get("batches", {}).get(lane, {})
        grew = {int(size): n - prior.get(size, 0) for size, n in counts.items()}
        grew = {size: n for size, n in sorted(grew.items()) if n > 0}
        if grew:
            formed[lane] = grew
    return dict(sorted(formed.items()))


def mean_batch_size(histogram: Mapping[int | str, int]) -> float:
    return round(sum(int(size) * n for size, n in histogram.items()) / sum(histogram.values()), 2)


class ServedProbe:
    """Snapshots around one served run: CPU per process role, and the gateway's batch counts.

    A gateway without a `stats()` method is asked once; from then on batch sizes are left out.
    """

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.has_stats = True
        self._stats: Mapping[str, Any] = {}
        self._cpu: resources.CpuSnapshot = {}

    async def _ask_stats(self) -> Mapping[str, Any]:
        if not self.has_stats:
            return {}
        try:
            return await self.handle.stats.remote()
        except Exception as exc:  # a missing method reaches us wrapped in Serve's or Ray's error types
            self.has_stats = False
            logger.warning("the gateway has no stats() (%s): batch sizes are not recorded", type(exc).__name__)
            return {}

    async def start(self) -> None:
        self._stats = await self._ask_stats()
        self._cpu = resources.cpu_snapshot()  # after the call above, so that it is not counted

    async def stop(self, requests: int) -> dict[str, Any]:
        used = resources.cpu_seconds_by_role(self._cpu, resources.cpu_snapshot())
        out: dict[str, Any] = {"cpu_ms_per_query_by_role": {
            role: round(1000 * seconds / max(requests, 1), 2) for role, seconds in used.items()}}
        after = await self._ask_stats()
        if self.has_stats:
            sizes = batch_sizes_between(self._stats, after)
            out |= {"batch_sizes": sizes, "batch_size_mean": {lane: mean_batch_size(h) for lane, h in sizes.items()}}
        return out


# -- measuring ----------------------------------------------------------------------------------
async def measure_async(system: str, concurrency: int, call: Call, queries: Sequence[str], duration_s: float,
                        *, warmup: int = 3, probe: ServedProbe | None = None, once: bool = False) -> dict[str, Any]:
    for q in queries[:warmup]:
        await call(q)
    if probe is not None:
        await probe.start()
    cpu0 = resources.cpu_seconds()
    with resources.PeakRSS() as rss:
        latencies, elapsed = await closed_loop(call, queries, concurrency, duration_s, once=once)
    cpu = resources.cpu_seconds() - cpu0
    extra = await probe.stop(len(latencies)) if probe is not None else {}
    return row(system, concurrency, latencies, elapsed, cpu, rss.peak_mb) | extra


def measure(system: str, concurrency: int, call: Call, queries: Sequence[str], duration_s: float,
            warmup: int = 3, probe: ServedProbe | None = None, once: bool = False) -> dict[str, Any]:
    return asyncio.run(measure_async(system, concurrency, call, queries, duration_s, warmup=warmup, probe=probe,
                                     once=once))


def per_query(run: dict[str, Any]) -> dict[str, Any]:
    """A run of batch requests counted in queries: its QPS compares with compute-limit's."""
    return run | {"requests": run["requests"] * BATCH_SIZE, "qps": round(run["qps"] * BATCH_SIZE, 2),
                  "cpu_s_per_query": round(run["cpu_s_per_query"] / BATCH_SIZE, 4), "queries_per_request": BATCH_SIZE}


def zipf_stream(queries: Sequence[str], *, repeat: float, length: int, seed: int = 0) -> list[str]:
    """A stream in which a share `repeat` of queries were asked before, popular ones most (Zipf, s = 1),
    and the rest are new: how a RAG backend sees retries, popular questions and rephrasings. Once the
    queries run out, new ones are the same texts with a round number added ("... (2)"), still new
    to a cache."""
    rng = random.Random(seed)
    fresh = (q if n == 1 else f"{q} ({n})" for n in itertools.count(1) for q in queries)
    seen: list[str] = []
    weights: list[float] = []
    stream = []
    for _ in range(length):
        if seen and rng.random() < repeat:
            new = rng.choices(seen, weights)[0]
        else:
            new = next(fresh)
            seen.append(new)
            weights.append(1 / len(seen))
        stream.append(new)
    return stream


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
    runs.append(compute_limit_run(retrievers, queries, bar))
    bar.update(1)
    return runs


def compute_limit_run(retrievers, queries, bar) -> dict[str, Any]:
    """compute-limit with each encoder backend ragfan ships, the faster kept: the retrievers' own torch
    model (the one sequential and threadpool share), then an ONNX export of it on as many threads.

    The same queries, retrieval work and batches of 256 in both; only the object that encodes differs.
    The row says which backend it kept (`encoder_backend`, None when no retriever encodes) and what
    each measured (`encoder_backends`).
    """
    batch_queries = list(itertools.islice(itertools.cycle(queries), max(256, len(queries))))
    candidates: dict[str, dict[int, Any]] = {"torch": {}}
    if any(getattr(r, "embedder", None) is not None for r in retrievers.values()):
        try:
            candidates["onnx"] = onnx_encoders(retrievers)
        except RetrieverFailed as exc:  # an export that fails leaves the ceiling on torch, said aloud
            logger.warning("compute-limit runs on torch only: no ONNX encoder (%s)", exc)
    else:
        candidates = {"none": {}}  # nothing to encode (the seed profile): one run
    rows = {}
    for backend, encoders in candidates.items():
        bar.set_description(f"compute-limit ({backend})")
        for encoder in encoders.values():
            encoder.encode(batch_queries[:32])  # warm, as the earlier runs warmed the torch model
        cpu0 = resources.cpu_seconds()
        with resources.PeakRSS() as rss:
            n, seconds, encoding = compute_limit(retrievers, batch_queries, encoders=encoders)
        rows[backend] = row("compute-limit", 256, [seconds * 1000 / n] * n, seconds, resources.cpu_seconds() - cpu0,
                            rss.peak_mb) | {"p50_ms": None, "p95_ms": None, "p99_ms": None,
                                            "encode_ms_per_query": round(1000 * encoding / n, 2)}
    fastest = max(rows, key=lambda backend: rows[backend]["qps"])
    if fastest == "none":
        return rows[fastest] | {"encoder_backend": None}
    measured = {b: {"qps": r["qps"], "encode_ms_per_query": r["encode_ms_per_query"]} for b, r in rows.items()}
    return rows[fastest] | {"encoder_backend": fastest, "encoder_backends": measured}


# -- the served app -------------------------------------------------------------------------------
def _app_config(profile: str, artifacts: Path | None, batch: int) -> dict[str, Any]:
    """The served app's config as raw YAML data; every retriever contributes TOP_K hits, as in-process."""
    if profile == "demo":
        # The embedded default as shipped, but with the in-process systems' top_k and deadlines
        # that measure latency instead of cutting it off.
        raw = yaml.safe_load(DEFAULT_CONFIG.read_text(encoding="utf-8"))
        for r in raw["retrievers"]:
            r.update(top_k=TOP_K, timeout_ms=30_000)
        return raw | {"app_name": "ragfan-bench"}
    # The batch window is set against each profile's service time: the seed retrievers take 150 to
    # 300 ms a batch whatever its size, so a 50 ms window to gather a full batch is cheap; the real
    # retrievers take milliseconds, so their window stays at the 10 ms default.
    # The seed retrievers only wait, so a replica overlaps several batches (max_concurrent_batches);
    # the real ones are CPU-bound, and a second batch at once would only compete for the same cores.
    wait, overlap = (0.05, 8) if profile == "seed" else (0.01, 1)
    common = {"top_k": TOP_K, "max_ongoing_requests": 256 if profile == "seed" else 128,
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


def served_config(profile: str, artifacts: Path | None, batch: int, encoder: str = "gateway", *,
                  cache: bool = False) -> AppConfig:
    """`encoder`: where the served dense and graph retrievers' queries are encoded: `gateway` (once, in
    the gateway replica: `encoder.placement: gateway`, the default), `deployment` (once, on the
    encoder deployment) or `local` (each retriever with a model of its own).

    Without `cache` the result cache is off, so every served query is searched, as the in-process
    systems search it; only the `ragfan-cached` runs turn it on (the embedded default's memory cache).
    """
    raw = _app_config(profile, artifacts, batch) | ({} if cache else {"cache": None})
    for r in raw["retrievers"]:
        if r["kind"] in ("dense", "graph"):
            r["encoder"] = "local" if encoder == "local" else "shared"
    if encoder != "local":
        raw["encoder"] = raw.get("encoder", {}) | {"placement": encoder}
    # The demo's data paths are relative to its config file, as `load_config` resolves them.
    base_dir = DEFAULT_CONFIG.parent if profile == "demo" else Path(".")
    return parse_config(raw, base_dir=base_dir)


class ServedRuns:
    """The served systems' runs on one app at a time: through its handle, over HTTP, one retriever alone."""

    def __init__(self, queries: Sequence[str], duration_s: float, port: int, bar: tqdm, *,
                 pyspy_s: float | None = None) -> None:
        self.queries, self.duration_s, self.port, self.bar = queries, duration_s, port, bar
        self.pyspy_s = pyspy_s
        self.runs: list[dict[str, Any]] = []
        self.extra: dict[str, Any] = {}  # report fields besides the runs: RSS at rest, the py-spy profile

    def run(self, config: AppConfig, names: Sequence[str], concurrencies: Sequence[int], *,
            batch1_config: AppConfig | None = None, cached_config: AppConfig | None = None) -> None:
        from ray import serve

        handle, client = self._start(config)
        self._at_rest(client)
        probe = ServedProbe(handle)
        self._handle_runs(client, probe, concurrencies)
        for c in concurrencies:
            self._http_run(c, probe)
        for name in names:
            self._measure(f"single:{name}", 1, lambda q, n=name: client.search_async(q, top_k=TOP_K, retrievers=[n]),
                          probe)
        self._batch_runs(client, probe)
        if cached_config is not None:
            self._cache_runs(cached_config, client)
        if batch1_config is not None:
            handle, client = self._start(batch1_config)
            self._measure("ragfan-handle-batch1", 32, lambda q: client.search_async(q, top_k=TOP_K),
                          ServedProbe(handle))
        serve.delete("ragfan-bench")

    def _start(self, config: AppConfig) -> tuple[Any, Any]:
        from ray import serve

        from serve_app.app import app_from_config
        from serve_app.client import RagClient

        handle = serve.run(app_from_config(config), name="ragfan-bench", route_prefix="/bench")
        return handle, RagClient.from_handle(handle)

    def _at_rest(self, client: Any) -> None:
        """The tree's RSS a moment after start and a few queries: the app's footprint, idle."""
        async def warm() -> None:
            for q in self.queries[:3]:
                await client.search_async(q, top_k=TOP_K)

        asyncio.run(warm())
        time.sleep(2)
        by_role = resources.rss_mb_by_role()
        self.extra |= {"rss_at_rest_mb": round(sum(by_role.values())),
                       "rss_at_rest_mb_by_role": {role: round(mb) for role, mb in by_role.items()}}

    def _measure(self, system: str, c: int, call: Call, probe: ServedProbe) -> None:
        self.bar.set_description(f"{system} c={c}")
        self.runs.append(measure(system, c, call, self.queries, self.duration_s, probe=probe))
        self.bar.update(1)

    def _batch_runs(self, client: Any, probe: ServedProbe) -> None:
        """`ragfan-batch`: BATCH_CLIENTS closed-loop clients, each sending BATCH_SIZE queries a request,
        through the handle and over HTTP. Its QPS counts queries, so it compares with compute-limit."""
        import httpx

        url = f"http://127.0.0.1:{self.port}/bench/v1/search/batch"
        stream = itertools.cycle(self.queries)

        def take() -> list[str]:
            return [next(stream) for _ in range(BATCH_SIZE)]

        async def by_handle(_: str) -> None:
            await client.search_batch_async(take(), top_k=TOP_K)

        async def over_http() -> dict[str, Any]:
            limits = httpx.Limits(max_connections=BATCH_CLIENTS, max_keepalive_connections=BATCH_CLIENTS)
            async with httpx.AsyncClient(timeout=120, limits=limits) as http:
                async def call(_: str) -> None:
                    r = await http.post(url, json={"searches": [{"query": q, "top_k": TOP_K} for q in take()]})
                    r.raise_for_status()

                return await measure_async("ragfan-batch-http", BATCH_CLIENTS, call, self.queries, self.duration_s,
                                           probe=probe)

        self.bar.set_description("ragfan-batch")
        self.runs.append(per_query(measure("ragfan-batch", BATCH_CLIENTS, by_handle, self.queries, self.duration_s,
                                           probe=probe)))
        self.runs.append(per_query(asyncio.run(over_http())))
        self.bar.update(1)

    def _cache_runs(self, config: AppConfig, uncached: Any) -> None:
        """A Zipf-like workload in which 80% of queries repeat, on the app without and with the result
        cache (`ragfan-zipf-uncached`, `ragfan-cached`, c=32); and at c=1, each query of a fresh set
        asked twice on the cached app: a miss, then a hit (`ragfan-cache-miss`, `ragfan-cache-hit`)."""
        from ray import serve

        stream = zipf_stream(self.queries, repeat=0.8, length=20_000)
        self.bar.set_description("ragfan-zipf-uncached")
        self.runs.append(measure("ragfan-zipf-uncached", 32, lambda q: uncached.search_async(q, top_k=TOP_K),
                                 stream, self.duration_s))
        serve.delete("ragfan-bench")
        _, cached = self._start(config)
        self.bar.set_description("ragfan-cached")
        self.runs.append(measure("ragfan-cached", 32, lambda q: cached.search_async(q, top_k=TOP_K), stream,
                                 self.duration_s))
        fresh = [f"{q} (c=1 cache run)" for q in self.queries[:100]]  # asked by no run before
        for system in ("ragfan-cache-miss", "ragfan-cache-hit"):
            self.bar.set_description(system)
            self.runs.append(measure(system, 1, lambda q: cached.search_async(q, top_k=TOP_K), fresh,
                                     self.duration_s, warmup=0, once=True))
        self.bar.update(1)

    def _handle_runs(self, client: Any, probe: ServedProbe, concurrencies: Sequence[int]) -> None:
        profiled = PROFILED_CONCURRENCY if PROFILED_CONCURRENCY in concurrencies else max(concurrencies)
        for c in concurrencies:
            recorder = Recorder(busiest_pids(), self.pyspy_s) if self.pyspy_s and c == profiled else None
            with recorder or nullcontext():
                self._measure("ragfan-handle", c, lambda q: client.search_async(q, top_k=TOP_K), probe)
            if recorder is not None:
                self.runs[-1]["pyspy_s"] = self.pyspy_s  # its CPU figures include py-spy's own
                self.extra["pyspy"] = recorder.report(f"ragfan-handle c={c}")

    def _http_run(self, c: int, probe: ServedProbe) -> None:
        self.bar.set_description(f"ragfan-http c={c}")
        self.runs.append(http_run("ragfan-http", c, f"http://127.0.0.1:{self.port}/bench/v1/search", self.queries,
                                  self.duration_s, probe))
        self.bar.update(1)


def http_run(system: str, c: int, url: str, queries: Sequence[str], duration_s: float,
             probe: ServedProbe | None = None) -> dict[str, Any]:
    """Searches POSTed to `url` by c clients that share one AsyncClient, whose pool keeps c
    connections open: no set-up per request."""
    import httpx

    async def run() -> dict[str, Any]:
        limits = httpx.Limits(max_connections=c, max_keepalive_connections=c)
        async with httpx.AsyncClient(timeout=60, limits=limits) as http:
            async def call(q: str) -> None:
                r = await http.post(url, json={"query": q, "top_k": TOP_K})
                r.raise_for_status()

            return await measure_async(system, c, call, queries, duration_s, probe=probe)

    return asyncio.run(run())


@contextmanager
def dataset_cluster(dataset: Path) -> Iterator[tuple[Path, list[str]]]:
    """A local cluster started as `ragfan serve` starts it, with `dataset`'s dense and keyword indexes
    built (or reused from `ragfan eval`'s cache); yields their directory and the test queries, and
    shuts the cluster down after."""
    import ray

    from actors.index import default_cache_dir
    from actors.ingest import ingest
    from serve_app.app import serve_env
    from serve_app.evaluate import load_beir

    artifacts = default_cache_dir() / "datasets" / dataset.resolve().name
    queries = list(load_beir(dataset, "test")[0].values())
    with serve_env():
        ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    try:
        ingest(dataset / "corpus.jsonl", artifacts, kinds=("dense", "keyword"), progress=False)
        yield artifacts, queries
    finally:
        ray.shutdown()


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


class Workload(NamedTuple):
    retrievers: dict[str, Any]  # the in-process systems' retrievers
    queries: list[str]
    config: AppConfig  # the served app
    batch1_config: AppConfig | None  # the same app with batch size 1, where the bench compares the two
    cached_config: AppConfig | None = None  # the same app with the result cache on (ragfan-cached)


def workload(profile: str | None, dataset: str | None, encoder: str = "gateway") -> Workload:
    """The retrievers, queries and served app of a profile or dataset, built before Ray starts."""
    if (profile is None) == (dataset is None):
        raise ValueError("give exactly one of --profile seed|demo and --dataset DIR")
    if profile == "seed":
        return Workload(seed_retrievers(DEMO_CORPUS), SEED_QUERIES, served_config("seed", None, 32, encoder), None)
    if profile == "demo":
        return Workload(demo_retrievers(load_config()), demo_queries(), served_config("demo", None, 32, encoder), None,
                        served_config("demo", None, 32, encoder, cache=True))
    import ray

    from actors.index import default_cache_dir
    from actors.ingest import ingest
    from serve_app.evaluate import load_beir

    path = Path(dataset)
    artifacts = default_cache_dir() / "datasets" / path.resolve().name
    queries_by_id, _ = load_beir(path, "test")
    ingest(path / "corpus.jsonl", artifacts, kinds=("dense", "keyword"))  # reuses what eval built
    ray.shutdown()  # ingest may have started Ray; the in-process systems run without it
    return Workload(dataset_retrievers(artifacts), list(queries_by_id.values()),
                    served_config("dataset", artifacts, 32, encoder), served_config("dataset", artifacts, 1, encoder),
                    served_config("dataset", artifacts, 32, encoder, cache=True))


def run_bench(*, profile: str | None, dataset: str | None, concurrencies: Sequence[int], duration_s: float,
              port: int = 8123, pyspy_s: float | None = None, encoder: str = "gateway") -> dict[str, Any]:
    import ray
    from ray import serve

    from serve_app.app import serve_env

    if pyspy_s:
        py_spy()  # before minutes of work, not after
    work = workload(profile, dataset, encoder)
    names = list(work.retrievers)
    extra_apps = (work.batch1_config is not None) + (work.cached_config is not None)
    total = 4 * len(concurrencies) + 2 + len(names) + extra_apps
    with tqdm(total=total, desc="bench", unit="run") as bar:
        runs = _in_process_runs(work.retrievers, work.queries, concurrencies, duration_s, bar)
        work.retrievers.clear()  # let the in-process indexes go before the served app loads its own
        with serve_env():
            ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        served = ServedRuns(work.queries, duration_s, port, bar, pyspy_s=pyspy_s)
        try:
            served.run(work.config, names, concurrencies, batch1_config=work.batch1_config,
                       cached_config=work.cached_config)
        finally:
            serve.shutdown()
            ray.shutdown()
    source = {"profile": profile} if profile else {"dataset": str(dataset)}
    return {"machine": machine(), "versions": versions(), **source, "encoder": encoder, "duration_s": duration_s,
            "runs": runs + served.runs, **served.extra}


# -- the report -------------------------------------------------------------------------------------
def format_table(report: dict[str, Any]) -> str:
    lines = [f"{'system':<22}{'conc':>5}{'reqs':>7}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'QPS':>9}"
             f"{'CPU s/q':>9}{'RSS MB':>8}"]
    for r in report["runs"]:
        def fmt(v, spec):
            return format(v, spec) if v is not None else f"{'-':>9}"
        lines.append(f"{r['system']:<22}{r['concurrency']:>5}{r['requests']:>7}{fmt(r['p50_ms'], '9.1f')}"
                     f"{fmt(r['p95_ms'], '9.1f')}{fmt(r['p99_ms'], '9.1f')}{r['qps']:>9.2f}"
                     f"{r['cpu_s_per_query']:>9.4f}{r['peak_rss_mb']:>8.0f}")
    lines += compute_limit_lines(report)
    sections = [role_cpu_table(report), batch_size_lines(report), rss_at_rest_lines(report), targets(report)]
    return "\n\n".join("\n".join(section) for section in [lines, *sections] if section)


def compute_limit_lines(report: dict[str, Any]) -> list[str]:
    """Under the table: the encoder backend compute-limit kept, and what each backend measured."""
    limit = _limit(report)
    if limit is None or not limit.get("encoder_backend"):
        return []
    backends = limit.get("encoder_backends", {})
    measured = ", ".join(f"{backend} {m['qps']:.2f} QPS (encoding {m['encode_ms_per_query']:.2f} ms a query)"
                         for backend, m in backends.items())
    how = "the faster" if len(backends) > 1 else "the only backend measured"
    return [f"compute-limit encodes with {limit['encoder_backend']}, {how}: {measured}"]


def _served(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in report["runs"] if "cpu_ms_per_query_by_role" in r]


def role_cpu_table(report: dict[str, Any]) -> list[str]:
    """CPU ms per query by process role (rows), for each served run at the highest concurrency (columns)."""
    served = _served(report)
    if not served:
        return []
    # the highest the handle and HTTP runs reached: the batch-size-1 run is always at 32
    top = max((r["concurrency"] for r in served if r["system"] in ("ragfan-handle", "ragfan-http")),
              default=max(r["concurrency"] for r in served))
    columns = [r for r in served if r["concurrency"] == top]
    roles = sorted({role for r in columns for role in r["cpu_ms_per_query_by_role"]})
    lines = [f"{f'CPU ms/query, c={top}':<22}" + "".join(f"{r['system']:>22}" for r in columns)]
    for role in roles:
        lines.append(f"{role:<22}" + "".join(f"{r['cpu_ms_per_query_by_role'].get(role, 0):>22.2f}" for r in columns))
    return lines + [f"{'sum':<22}" + "".join(f"{sum(r['cpu_ms_per_query_by_role'].values()):>22.2f}" for r in columns)]


def compact_histogram(histogram: Mapping[int | str, int]) -> str:
    """Batch counts in power-of-two buckets of size: `1:12 2-3:40 4-7:9` (the report keeps every size)."""
    buckets: dict[int, int] = defaultdict(int)
    for size, n in histogram.items():
        buckets[1 << (int(size).bit_length() - 1)] += n
    return " ".join(f"{low if low == 1 else f'{low}-{2 * low - 1}'}:{n}" for low, n in sorted(buckets.items()))


def batch_size_lines(report: dict[str, Any]) -> list[str]:
    served = _served(report)
    if served and not any("batch_sizes" in r for r in served):
        return ["batch sizes: not recorded (the gateway has no stats())"]
    lines = []
    for r in served:
        if r["concurrency"] in BATCH_REPORT_CONCURRENCIES and r.get("batch_sizes"):
            lines.append(f"batch sizes, {r['system']} c={r['concurrency']}: lane, mean, batches by size")
            lines += [f"  {lane:<30}{r['batch_size_mean'][lane]:>7.2f}   {compact_histogram(h)}"
                      for lane, h in r["batch_sizes"].items()]
    return lines


def rss_at_rest_lines(report: dict[str, Any]) -> list[str]:
    if "rss_at_rest_mb" not in report:
        return []
    roles = ", ".join(f"{role} {mb:,}" for role, mb in report["rss_at_rest_mb_by_role"].items())
    return [f"RSS at rest after start: {report['rss_at_rest_mb']:,} MB ({roles})"]


def _get(report, system, concurrency):
    return next((r for r in report["runs"] if r["system"] == system and r["concurrency"] == concurrency), None)


def _line(label: str, detail: str, ok: bool | None, aim: bool | None = None) -> str:
    """One target: [met] / [MISSED] (or [reported] when it has no bound), and whether the aim was met."""
    status = "reported" if ok is None else "met" if ok else "MISSED"
    aim_text = "" if aim is None else " (aim met)" if aim else " (aim missed)"
    return f"  [{status}] {label}: {detail}{aim_text}"


def _limit(report: dict[str, Any]) -> dict[str, Any] | None:
    return next((r for r in report["runs"] if r["system"] == "compute-limit"), None)


# Issue 21's targets. Each is a ratio or a difference between rows of this one report, so it holds
# on any machine; a target whose rows this run lacks is left out. The seed profile's compute-limit
# sleeps once per batch of 256, so it is no ceiling there, and its ratios are left out too.
def targets(report: dict[str, Any]) -> list[str]:
    """Issue 21's targets ([met] / [MISSED]), then the lines reported without a bound."""
    kind = report.get("profile", "dataset")
    lines = _cache_hit_target(report) + _throughput_targets(report, ceiling=kind != "seed") + _http_targets(report)
    if kind == "seed":
        lines += _seed_target(report)
    if kind == "demo":
        lines += _rss_target(report)
    lines += _reported_lines(report, ceiling=kind != "seed")
    return ["targets:", *lines] if lines else ["targets: none measured at these concurrencies"]


def _cache_hit_target(report) -> list[str]:
    hit, miss = _get(report, "ragfan-cache-hit", 1), _get(report, "ragfan-cache-miss", 1)
    if not hit:
        return []
    ms = 1000 * hit["cpu_s_per_query"]
    detail = f"{ms:.2f} ms" + (f" (a miss {1000 * miss['cpu_s_per_query']:.2f} ms)" if miss else "")
    return [_line("c=1 CPU per cache hit through the handle <= 2.0 ms (aim 1.0)", detail, ms <= 2.0, ms <= 1.0)]


def _throughput_targets(report, *, ceiling: bool) -> list[str]:
    """QPS against compute-limit (when it is a ceiling), against threadpool, and of the result cache."""
    lines = []
    h32, t32, limit = _get(report, "ragfan-handle", 32), _get(report, "threadpool", 32), _limit(report)
    if h32 and limit and ceiling:
        share = h32["qps"] / limit["qps"]
        lines.append(_line("c=32 ragfan-handle QPS >= 50% of compute-limit (aim 70%)",
                           f"{share:.0%} ({h32['qps']} vs {limit['qps']} QPS)", share >= 0.5, share >= 0.7))
    if h32 and t32:
        ratio = h32["qps"] / t32["qps"]
        lines.append(_line("c=32 ragfan-handle QPS >= 2x threadpool (aim 3x)",
                           f"{ratio:.2f}x ({h32['qps']} vs {t32['qps']} QPS)", ratio >= 2, ratio >= 3))
    batch = _get(report, "ragfan-batch", BATCH_CLIENTS)
    if batch and limit and ceiling:
        share = batch["qps"] / limit["qps"]
        lines.append(_line(f"ragfan-batch (handle, c={BATCH_CLIENTS}) QPS >= 70% of compute-limit (aim 85%)",
                           f"{share:.0%} ({batch['qps']} vs {limit['qps']} QPS)", share >= 0.7, share >= 0.85))
    cached, uncached = _get(report, "ragfan-cached", 32), _get(report, "ragfan-zipf-uncached", 32)
    if cached and uncached:
        ratio = cached["qps"] / uncached["qps"]
        lines.append(_line("c=32 ragfan-cached QPS >= 3x ragfan-zipf-uncached (aim 4x)",
                           f"{ratio:.2f}x ({cached['qps']} vs {uncached['qps']} QPS)", ratio >= 3, ratio >= 4))
    return lines


def _http_targets(report) -> list[str]:
    """What HTTP costs over the handle: latency alone, throughput at c=32."""
    lines = []
    h1, http1 = _get(report, "ragfan-handle", 1), _get(report, "ragfan-http", 1)
    if h1 and http1:
        over = http1["p50_ms"] - h1["p50_ms"]
        lines.append(_line("c=1 ragfan-http p50 <= ragfan-handle p50 + 3 ms (aim +1)",
                           f"{http1['p50_ms']} ms vs {h1['p50_ms']} ms, {over:+.1f} ms", over <= 3, over <= 1))
    h32, http32 = _get(report, "ragfan-handle", 32), _get(report, "ragfan-http", 32)
    if h32 and http32:
        ratio = http32["qps"] / h32["qps"]
        lines.append(_line("c=32 ragfan-http QPS >= 0.9x ragfan-handle (aim 1.0x)",
                           f"{ratio:.2f}x ({http32['qps']} vs {h32['qps']} QPS)", ratio >= 0.9, ratio >= 1.0))
    return lines


def _seed_target(report) -> list[str]:
    h1 = _get(report, "ragfan-handle", 1)
    if not h1:
        return []
    return [_line("c=1 ragfan-handle p50 <= 310 ms (aim 305)", f"{h1['p50_ms']} ms",
                  h1["p50_ms"] <= 310, h1["p50_ms"] <= 305)]


def _rss_target(report) -> list[str]:
    """The embedded default's footprint: the tree less this process, which held the in-process systems."""
    if "rss_at_rest_mb" not in report:
        return []
    driver = report["rss_at_rest_mb_by_role"].get("driver", 0)
    app = report["rss_at_rest_mb"] - driver
    return [_line("RSS at rest of the served app (tree less the bench driver) <= 2400 MB (aim 2000)",
                  f"{app:,} MB (driver {driver:,} MB more)", app <= 2400, app <= 2000)]


def _reported_lines(report, *, ceiling: bool) -> list[str]:
    """Figures worth a line that no target bounds: the fan-out's cost, the tail, batches over HTTP,
    dynamic batching."""
    lines = []
    h32, b1 = _get(report, "ragfan-handle", 32), _get(report, "ragfan-handle-batch1", 32)
    h1, singles = _get(report, "ragfan-handle", 1), [r for r in report["runs"] if r["system"].startswith("single:")]
    if h1 and singles:
        slowest = max(singles, key=lambda r: r["p50_ms"])
        lines.append(_line("c=1 ragfan-handle p50 vs the slowest retriever alone",
                           f"{h1['p50_ms']} ms vs {slowest['p50_ms']} ms ({slowest['system']}), "
                           f"{h1['p50_ms'] - slowest['p50_ms']:+.1f} ms", None))
    if h32:
        lines.append(_line("c=32 ragfan-handle p99 vs p50", f"{h32['p99_ms'] / h32['p50_ms']:.2f}x", None))
    batch_http, limit = _get(report, "ragfan-batch-http", BATCH_CLIENTS), _limit(report)
    if batch_http and limit and ceiling:
        lines.append(_line(f"ragfan-batch over HTTP (c={BATCH_CLIENTS}) QPS vs compute-limit",
                           f"{batch_http['qps'] / limit['qps']:.0%} ({batch_http['qps']} vs {limit['qps']} QPS)", None))
    if h32 and b1:
        lines.append(f"  dynamic batching at c=32: {h32['qps'] / b1['qps']:.2f}x the QPS of batch size 1")
    return lines


def main(profile: str | None, dataset: str | None, concurrency: str, duration: float, output: str | None, *,
         pyspy: float | None = None, pyspy_output: str | None = None, encoder: str = "gateway") -> int:
    concurrencies = [int(c) for c in concurrency.split(",") if c.strip()]
    report = run_bench(profile=profile, dataset=dataset, concurrencies=concurrencies, duration_s=duration,
                       pyspy_s=pyspy, encoder=encoder)
    print(format_table(report))
    if "pyspy" in report:
        summary = to_markdown(report["pyspy"])
        print(f"\n{summary}")
        if pyspy_output:
            Path(pyspy_output).write_text(summary + "\n", encoding="utf-8")
            print(f"wrote {pyspy_output}")
    if output:
        Path(output).write_text(json.dumps(report, indent=2))
        print(f"wrote {output}")
    return 0


__all__ = ["format_table", "main", "run_bench"]
