"""Rollout under load: reloads, a replica kill and a config change while 16 clients search without pause.

    .venv/bin/python -m benchmarks.rollout                              # the embedded default
    .venv/bin/python -m benchmarks.rollout --sharded                    # a 2-shard dense retriever + BM25
    .venv/bin/python -m benchmarks.rollout --output docs/data/rollout-demo.json

The app is the embedded default's five retrievers, each served from artifacts that `ragfan ingest`
builds from the same data file, or with `--sharded` its corpus as a 2-shard dense retriever beside
BM25. It starts a local cluster with it, and 16 closed-loop HTTP clients that search without pause
(`cache: false`, so every search reaches the retrievers). After a steady stretch it reloads every
retriever three times over (POST /v1/retrievers/{name}/reload), each time onto a version of its own
(a copy of the served one, swapped in as `ragfan ingest` swaps a rebuild), kills one replica of the
first dense retriever with `ray.kill` between the first and the second round, then applies one
changed config (a deadline and a weight, with `ragfan apply`'s function), and ends
with another steady stretch, for `--duration` (75 s) at the least. It samples every process's RSS
every 0.25 s.

It reports: failed searches (any answer but 200), the degraded share and p99 latency of searches that
started while a switch was in progress against the rest, how long each switch took, and the peak RSS
of each replica process (two versions are open for a moment during a reload).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from actors.shards import shard_dir
from benchmarks.bench import machine, percentile, versions
from benchmarks.soak import QUERIES, _free_port, _label

CLIENTS = 16


def new_version(link: Path) -> Path:
    """A new version of the artifacts at `link`, the same files as the current one, swapped in as
    `ragfan ingest` swaps a rebuild: each reload then opens, verifies and swaps a version of its own."""
    from actors.index import MANIFEST, swap_in

    current = link.resolve()
    manifest = json.loads((current / MANIFEST).read_text())

    def build(directory: Path) -> dict[str, Any]:
        for path in current.iterdir():
            if path.name != MANIFEST and path.is_file():
                shutil.copy2(path, directory / path.name)
        return {k: v for k, v in manifest.items() if k not in ("files", "build_seconds", "built_at")}

    return swap_in(link, build=build)


class Sampler(threading.Thread):
    """Every process's RSS every `every_s`, kept as the peak per (label, pid)."""

    def __init__(self, every_s: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.every_s, self.peaks, self.stop = every_s, {}, threading.Event()

    def run(self) -> None:
        me = psutil.Process()
        while not self.stop.wait(self.every_s):
            for proc in me.children(recursive=True):
                try:
                    key = (_label(proc), proc.pid)
                    self.peaks[key] = max(self.peaks.get(key, 0.0), proc.memory_info().rss / 2**20)
                except psutil.Error:
                    continue


def configs(sharded: bool, work: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the config served, the changed one applied during the run) as raw mappings.

    The embedded default's five retrievers, each served from artifacts that `ragfan ingest` builds
    from its data file, so that each reload has a new version to roll in (`new_version`)."""
    import yaml

    from actors.ingest import ingest
    from serve_app.config import DEFAULT_CONFIG

    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    data = DEFAULT_CONFIG.parent / "data"
    for r in [] if sharded else raw["retrievers"]:
        source = data / Path(r.pop("data")).name
        kind = r["kind"]
        out = work / "out" / r["name"]
        if kind == "graph":
            ingest(source, out, kinds=("graph",), aliases=data / Path(r.pop("aliases")).name, progress=True)
        else:
            ingest(source, out, kinds=(kind,), progress=True)
        r["artifacts"] = str(out / kind)
    if sharded:
        ingest(data / "corpus.jsonl", work / "out", kinds=("dense", "keyword"), progress=True, shards=2)
        base = {"top_k": 20, "timeout_ms": 2000, "ray_actor_options": {"num_cpus": 0.3, "memory": "512MiB"},
                "max_ongoing_requests": 32}
        raw["retrievers"] = [
            {"name": "corpus", "kind": "dense", "artifacts": str(work / "out" / "dense"), "shards": 2, **base},
            {"name": "keyword", "kind": "keyword", "artifacts": str(work / "out" / "keyword"), **base},
        ]
    changed = json.loads(json.dumps(raw))
    changed["retrievers"][1]["timeout_ms"] += 500  # a deadline ...
    changed["retrievers"][0]["weight"] = 0.8  # ... and a weight
    return raw, changed


async def run(args: argparse.Namespace) -> dict[str, Any]:
    import ray
    from ray import serve

    from serve_app.app import app_from_config, prepare_indexes, serve_env
    from serve_app.config import parse_config

    work = Path(tempfile.mkdtemp(prefix="ragfan-rollout-"))
    port = _free_port()
    with serve_env():
        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    raw, changed = configs(args.sharded, work)
    config = parse_config(raw, base_dir=work)
    prepare_indexes(config, progress=True)
    started = time.perf_counter()
    serve.run(app_from_config(config, api_keys=[]), name="ragfan", route_prefix="/")
    print(f"app up in {time.perf_counter() - started:.1f} s")
    url = f"http://127.0.0.1:{port}"
    reloadable = [r.name for r in config.retrievers if r.kind != "synthetic"]
    dense = next(r for r in config.retrievers if r.kind == "dense")
    searches: list[dict[str, Any]] = []
    switches: list[dict[str, Any]] = []
    stop = asyncio.Event()
    sampler = Sampler()
    sampler.start()

    async def client(i: int, http: httpx.AsyncClient) -> None:
        n = i
        while not stop.is_set():
            n += CLIENTS
            t0 = time.perf_counter()
            try:
                r = await http.post(f"{url}/v1/search", json={"query": QUERIES[n % len(QUERIES)], "cache": False})
                body = r.json() if r.status_code == 200 else {}
                status, degraded = r.status_code, body.get("degraded")
                versions_seen = {k: v.get("version") for k, v in body.get("retrievers", {}).items()}
            except httpx.HTTPError as exc:
                status, degraded, versions_seen = type(exc).__name__, None, {}
            searches.append({"t": t0 - t_start, "ms": (time.perf_counter() - t0) * 1000, "status": status,
                             "degraded": degraded, "versions": versions_seen})

    async def switch(kind: str, what: str, action) -> None:
        t0 = time.perf_counter()
        detail = await action()
        switches.append({"kind": kind, "what": what, "start": t0 - t_start, "end": time.perf_counter() - t_start,
                         "seconds": round(time.perf_counter() - t0, 3), "detail": detail})
        print(f"{t0 - t_start:6.1f} s  {kind} {what}: {time.perf_counter() - t0:.2f} s {detail or ''}")
        await asyncio.sleep(args.gap)

    async def reload(name: str) -> Any:
        for spec in config.retriever(name).specs(config.cache_dir):
            await asyncio.to_thread(new_version, spec.artifacts_dir if spec.shard is None
                                    else shard_dir(spec.artifacts_dir, *spec.shard))
        r = await control.post(f"{url}/v1/retrievers/{name}/reload", timeout=600)
        return {"status": r.status_code, **({"version": r.json()["version"]} if r.status_code == 200 else
                                            {"error": r.text[:300]})}

    async def kill() -> Any:
        prefix = f"SERVE_REPLICA::ragfan#{dense.deployment_names()[0]}#"
        named = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]
        ray.kill(ray.get_actor(named[0]["name"], namespace=named[0]["namespace"]), no_restart=True)
        return {"killed": named[0]["name"]}

    async def apply() -> Any:
        from serve_app.apply import apply as apply_config

        applied = await asyncio.to_thread(apply_config, parse_config(changed, base_dir=work), api_keys=[])
        return {"changed": "retrievers.1.timeout_ms +500 ms, retrievers.0.weight 0.8", "serve": applied.lines()}

    limits = httpx.Limits(max_connections=CLIENTS + 4)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http, httpx.AsyncClient(timeout=600) as control:
        t_start = time.perf_counter()
        clients = [asyncio.ensure_future(client(i, http)) for i in range(CLIENTS)]
        await asyncio.sleep(args.steady)
        for round_ in range(3):
            for name in reloadable:
                await switch("reload", name, lambda name=name: reload(name))
            if round_ == 0:
                await switch("kill", dense.deployment_names()[0], kill)
        await switch("apply", "config", apply)
        # a steady stretch after the switches, and at least --duration seconds of load in all
        await asyncio.sleep(max(args.steady, args.duration - (time.perf_counter() - t_start)))
        stop.set()
        await asyncio.gather(*clients)
    sampler.stop.set()
    serve.shutdown()
    ray.shutdown()
    return summarize(args, searches, switches, sampler.peaks)


def summarize(args, searches, switches, peaks) -> dict[str, Any]:
    def during(s: dict[str, Any]) -> bool:
        return any(w["start"] <= s["t"] <= w["end"] + 0.5 for w in switches)

    def stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
        ms = [r["ms"] for r in rows]
        return {"searches": len(rows), "failed": sum(r["status"] != 200 for r in rows),
                "degraded_share": round(sum(bool(r["degraded"]) for r in rows) / max(1, len(rows)), 4),
                "p50_ms": round(percentile(ms, 50), 1) if ms else None,
                "p99_ms": round(percentile(ms, 99), 1) if ms else None}

    replicas = {f"{label} (pid {pid})": round(mb, 1) for (label, pid), mb in sorted(peaks.items())
                if label.startswith("replica:")}
    by_kind: dict[str, list[float]] = {}
    for w in switches:
        by_kind.setdefault(f"{w['kind']} {w['what']}", []).append(w["seconds"])
    def within(windows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [s for s in searches if any(w["start"] <= s["t"] <= w["end"] + 0.5 for w in windows)]

    for w in switches:  # each switch's own searches: those that started while it was in progress
        w["searches"] = stats(within([w]))
    # The reload right after the kill waits for Serve's replacement replica: it belongs to the kill.
    after_kill = {i + 1 for i, w in enumerate(switches) if w["kind"] == "kill"}
    groups = {"reloads": [w for i, w in enumerate(switches) if w["kind"] == "reload" and i not in after_kill],
              "kill, until the replacement serves": [w for i, w in enumerate(switches)
                                                     if w["kind"] == "kill" or i in after_kill],
              "apply": [w for w in switches if w["kind"] == "apply"]}
    result = {
        "config": "2-shard dense + BM25 from artifacts" if args.sharded else "embedded default",
        "clients": CLIENTS,
        "duration_s": round(max(s["t"] for s in searches), 1),
        "all": stats(searches),
        "during_switches": stats([s for s in searches if during(s)]),
        "steady": stats([s for s in searches if not during(s)]),
        "by_switch": {name: stats(within(windows)) for name, windows in groups.items()},
        "failed_statuses": sorted({str(s["status"]) for s in searches if s["status"] != 200}),
        "switch_seconds_median": {k: round(statistics.median(v), 3) for k, v in by_kind.items()},
        "switches": switches,
        "replica_peak_rss_mb": replicas,
        "machine": machine(),
        "versions": versions(),
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sharded", action="store_true", help="a 2-shard dense retriever and BM25, from artifacts")
    parser.add_argument("--steady", type=float, default=10.0, help="seconds of steady load before and after")
    parser.add_argument("--gap", type=float, default=2.0, help="seconds between two switches")
    parser.add_argument("--duration", type=float, default=75.0, help="seconds of load at the least (default 75)")
    parser.add_argument("--output", help="write the results as JSON here")
    args = parser.parse_args()
    os.environ.setdefault("RAGFAN_CACHE_DIR", str(Path.home() / ".cache" / "ragfan"))
    result = asyncio.run(run(args))
    print(json.dumps({k: result[k] for k in ("config", "duration_s", "all", "during_switches", "steady", "by_switch",
                                             "failed_statuses", "switch_seconds_median", "replica_peak_rss_mb")},
                     indent=2))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
