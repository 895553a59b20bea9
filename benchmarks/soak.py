"""Soak: minutes of steady load at about half of measured capacity, with one replica kill midway.

    .venv/bin/python -m benchmarks.soak                       # 10 minutes, the embedded default
    .venv/bin/python -m benchmarks.soak --minutes 2 --output /tmp/soak.json --plot /tmp/soak.png

It starts a local cluster with the default app, measures capacity (closed loop, 8 clients, HTTP),
then sends requests open-loop at half that rate. Halfway through it kills every replica of one
retriever with `ray.kill`. It records every request's status and latency, and samples the RSS of
every process of the cluster (replicas, proxy, controller, raylet, GCS) every few seconds.

The verdict: errors (any answer but 200) must be 0, and the summed RSS in the last minute must
be within 5% of the RSS one minute in, after warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
import psutil

from benchmarks.bench import machine, percentile, versions

QUERIES = [
    "vitamin D and multiple sclerosis", "metformin in type 2 diabetes", "p53 mutations in cancer",
    "statins and cardiovascular risk", "gut microbiota and obesity", "malaria vaccine efficacy",
    "how safe are vaccines for children", "insulin resistance and obesity", "aspirin and colon cancer",
]
WINDOW_S = 30
SAMPLE_S = 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _label(proc: psutil.Process) -> str:
    """ray::ServeReplica:ragfan:corpus -> replica:corpus; raylet, gcs_server, ... by name."""
    try:
        cmd = " ".join(proc.cmdline())
        name = proc.name()
    except psutil.Error:
        return "?"
    if "ServeReplica:" in cmd:
        return "replica:" + cmd.split("ServeReplica:", 1)[1].split()[0].split(":")[-1].split(".")[0]
    for key in ("ProxyActor", "ServeController", "raylet", "gcs_server", "dashboard", "log_monitor"):
        if key in cmd:
            return key
    return "driver" if proc.pid == os.getpid() else name


def rss_by_process() -> dict[str, float]:
    me = psutil.Process()
    out: dict[str, float] = defaultdict(float)
    for proc in [me, *me.children(recursive=True)]:
        try:
            out[_label(proc)] += proc.memory_info().rss / 2**20
        except psutil.Error:
            continue
    return dict(out)


async def capacity(url: str, seconds: float = 20, clients: int = 8) -> float:
    done = 0
    end = time.perf_counter() + seconds

    async def client(i: int, http: httpx.AsyncClient) -> None:
        nonlocal done
        n = i
        while time.perf_counter() < end:
            r = await http.post(url, json={"query": QUERIES[n % len(QUERIES)], "top_k": 10})
            r.raise_for_status()
            done += 1
            n += clients

    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=60) as http:
        await asyncio.gather(*(client(i, http) for i in range(clients)))
    return done / (time.perf_counter() - started)


async def soak(url: str, rate: float, seconds: float, kill_at_s: float, kill) -> tuple[list, list]:
    records: list[tuple[float, int, float]] = []  # (sent at, status, latency ms); status 0 = no answer
    samples: list[tuple[float, dict[str, float]]] = []
    started = time.perf_counter()

    async def one(i: int, http: httpx.AsyncClient) -> None:
        t0 = time.perf_counter()
        try:
            r = await http.post(url, json={"query": QUERIES[i % len(QUERIES)], "top_k": 10})
            status = r.status_code
        except httpx.HTTPError:
            status = 0
        records.append((t0 - started, status, (time.perf_counter() - t0) * 1000))

    async def sampler() -> None:
        while time.perf_counter() - started < seconds:
            samples.append((time.perf_counter() - started, await asyncio.to_thread(rss_by_process)))
            await asyncio.sleep(SAMPLE_S)

    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=256)) as http:
        sampling = asyncio.create_task(sampler())
        tasks, i, killed = [], 0, False
        while (now := time.perf_counter() - started) < seconds:
            if not killed and now >= kill_at_s:
                killed = True
                await asyncio.to_thread(kill)
            tasks.append(asyncio.create_task(one(i, http)))
            i += 1
            await asyncio.sleep(max(0.0, i / rate - (time.perf_counter() - started)))
        await asyncio.gather(*tasks)
        await sampling
    return records, samples


def summarize(records, samples, seconds: float, kill_at_s: float) -> dict[str, Any]:
    windows = []
    for start in range(0, int(seconds), WINDOW_S):
        lat = [ms for t, s, ms in records if start <= t < start + WINDOW_S and s == 200]
        if lat:
            windows.append({"t_s": start, "requests": len(lat), "p50_ms": round(percentile(lat, 50), 1),
                            "p99_ms": round(percentile(lat, 99), 1)})
    errors = [s for _, s, _ in records if s != 200]

    def total_rss(lo: float, hi: float) -> float:
        values = [sum(rss.values()) for t, rss in samples if lo <= t < hi]
        return statistics.median(values) if values else float("nan")

    warm = total_rss(60, 120)
    last = total_rss(seconds - 60, seconds + 1)
    per_process = {
        label: [round(rss.get(label, 0.0), 1) for _, rss in samples]
        for label in sorted({k for _, rss in samples for k in rss})
    }
    return {
        "requests": len(records),
        "errors": len(errors),
        "error_statuses": {str(s): errors.count(s) for s in sorted(set(errors))},
        "kill_at_s": kill_at_s,
        "windows": windows,
        "rss_total_after_warmup_mb": round(warm, 1),
        "rss_total_last_minute_mb": round(last, 1),
        "rss_growth_pct": round(100 * (last - warm) / warm, 2),
        "rss_samples_t_s": [round(t, 1) for t, _ in samples],
        "rss_by_process_mb": per_process,
    }


def plot(report: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = report["summary"]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    t = [w["t_s"] + WINDOW_S / 2 for w in s["windows"]]
    ax1.plot(t, [w["p50_ms"] for w in s["windows"]], "o-", label="p50")
    ax1.plot(t, [w["p99_ms"] for w in s["windows"]], "s-", label="p99")
    ax1.axvline(s["kill_at_s"], color="red", linestyle="--", label=f"ray.kill {report['killed']} replicas")
    ax1.set_ylabel(f"latency, ms ({WINDOW_S} s windows)")
    ax1.set_title(f"soak: {report['rate_qps']:.1f} req/s for {report['seconds'] / 60:.0f} min, "
                  f"{s['requests']} requests, {s['errors']} errors")
    ax1.legend()
    ts = s["rss_samples_t_s"]
    totals = [sum(v[i] for v in s["rss_by_process_mb"].values()) for i in range(len(ts))]
    ax2.plot(ts, totals, "k-", linewidth=2, label="all processes")
    for label, values in s["rss_by_process_mb"].items():
        if max(values) > 150:
            ax2.plot(ts, values, linewidth=1, label=label)
    ax2.axvline(s["kill_at_s"], color="red", linestyle="--")
    ax2.set_xlabel("seconds")
    ax2.set_ylabel("RSS, MiB")
    ax2.set_title(f"RSS growth after warm-up: {s['rss_growth_pct']:+.1f}%")
    ax2.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--kill", default="keyword", help="the retriever whose replicas are killed midway")
    parser.add_argument("--load", type=float, default=0.5, help="fraction of measured capacity to send")
    parser.add_argument("--output", default="docs/data/soak.json")
    parser.add_argument("--plot", default="docs/data/soak.png")
    args = parser.parse_args(argv)

    import ray
    from ray import serve

    from serve_app.app import app_from_config, prepare_indexes, serve_env
    from serve_app.config import load_config

    config = load_config()
    prepare_indexes(config, progress=False)
    with serve_env():
        ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}/v1/search"
    try:
        serve.run(app_from_config(config, api_keys=[]), name="ragfan", route_prefix="/")
        cap = asyncio.run(capacity(url))
        rate = args.load * cap
        seconds = args.minutes * 60
        print(f"capacity {cap:.1f} req/s (8 closed-loop clients); soaking at {rate:.1f} req/s for {seconds:.0f} s",
              flush=True)

        def kill() -> None:
            prefix = f"SERVE_REPLICA::ragfan#{args.kill}#"
            for a in ray.util.list_named_actors(all_namespaces=True):
                if a["name"].startswith(prefix):
                    ray.kill(ray.get_actor(a["name"], namespace=a["namespace"]), no_restart=True)
            print(f"killed the {args.kill} replicas at {seconds / 2:.0f} s", flush=True)

        records, samples = asyncio.run(soak(url, rate, seconds, seconds / 2, kill))
    finally:
        serve.shutdown()
        ray.shutdown()
    report = {
        "machine": machine(), "versions": versions(), "capacity_qps": round(cap, 2), "rate_qps": round(rate, 2),
        "seconds": seconds, "killed": args.kill, "summary": summarize(records, samples, seconds, seconds / 2),
    }
    s = report["summary"]
    Path(args.output).write_text(json.dumps(report, indent=2))
    plot(report, args.plot)
    print(json.dumps({k: v for k, v in s.items() if k not in {"rss_by_process_mb", "rss_samples_t_s"}}, indent=2))
    ok = s["errors"] == 0 and s["rss_growth_pct"] <= 5
    print(f"{'PASS' if ok else 'FAIL'}: {s['errors']} errors, RSS growth after warm-up {s['rss_growth_pct']:+.2f}%"
          f" (limit +5%); wrote {args.output} and {args.plot}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
