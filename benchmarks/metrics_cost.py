"""What recording ragfan's metrics costs: the same app with `gateway.metrics` on and off, in one run.

    .venv/bin/python -m benchmarks.metrics_cost                          # the embedded default, 3 rounds
    .venv/bin/python -m benchmarks.metrics_cost --dataset ../shared/datasets/scifact \
        --output docs/data/bench-metrics-cost-scifact.json

Each round deploys the app twice, metrics on and metrics off (the order alternates from round to
round, so a drift of the machine's speed falls on both sides), and measures each at c=32 through
the handle and over HTTP. Both sides search the same queries with the same retrievers; the only
difference is the recording (Prometheus instruments, the /v1/stats window and its pushes, and the
stats deployment). The report gives each side's median QPS and gateway CPU per query, and the
ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path
from typing import Any

from tqdm import tqdm

from benchmarks.bench import TOP_K, ServedProbe, http_run, machine, measure, versions, workload

CONCURRENCY = 32


def _runs(config: Any, queries: list[str], duration_s: float, port: int) -> list[dict[str, Any]]:
    """One deployment of `config`: a c=32 run through the handle, then one over HTTP."""
    from ray import serve

    from serve_app.app import app_from_config
    from serve_app.client import RagClient

    handle = serve.run(app_from_config(config), name="ragfan-bench", route_prefix="/bench")
    client = RagClient.from_handle(handle)
    probe = ServedProbe(handle)
    runs = [measure("handle", CONCURRENCY, lambda q: client.search_async(q, top_k=TOP_K), queries, duration_s,
                    probe=probe),
            http_run("http", CONCURRENCY, f"http://127.0.0.1:{port}/bench/v1/search", queries, duration_s, probe)]
    serve.delete("ragfan-bench")
    return runs


def run(*, profile: str | None, dataset: str | None, rounds: int, duration_s: float, port: int) -> dict[str, Any]:
    import ray
    from ray import serve

    from serve_app.app import serve_env

    work = workload(profile, dataset)
    work.retrievers.clear()  # the in-process systems are not measured here
    configs = {on: work.config.model_copy(update={"gateway": work.config.gateway.model_copy(update={"metrics": on})})
               for on in (True, False)}
    with serve_env():
        ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    runs: list[dict[str, Any]] = []
    try:
        with tqdm(total=2 * rounds, desc="metrics on/off", unit="app") as bar:
            for i in range(rounds):
                for on in (True, False) if i % 2 == 0 else (False, True):
                    bar.set_description(f"round {i + 1}, metrics {'on' if on else 'off'}")
                    runs += [r | {"round": i + 1, "metrics": on} for r in _runs(configs[on], work.queries,
                                                                                 duration_s, port)]
                    bar.update(1)
    finally:
        serve.shutdown()
        ray.shutdown()
    source = {"profile": profile} if profile else {"dataset": str(dataset)}
    return {"machine": machine(), "versions": versions(), **source, "duration_s": duration_s, "rounds": rounds,
            "runs": runs, "summary": summarize(runs)}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per path: each side's median QPS and gateway CPU ms per query over the rounds, and on/off ratios."""
    out: dict[str, Any] = {}
    for path in ("handle", "http"):
        side: dict[bool, dict[str, float]] = {}
        for on in (True, False):
            mine = [r for r in runs if r["system"] == path and r["metrics"] is on]
            side[on] = {
                "qps": statistics.median(r["qps"] for r in mine),
                "p50_ms": statistics.median(r["p50_ms"] for r in mine),
                "gateway_cpu_ms_per_query": statistics.median(
                    r["cpu_ms_per_query_by_role"].get("gateway", 0.0) for r in mine),
                "stats_cpu_ms_per_query": statistics.median(
                    r["cpu_ms_per_query_by_role"].get("stats", 0.0) for r in mine),
                # every process of the cluster: the retrievers, the encoder, the proxy, Ray's own
                "cluster_cpu_ms_per_query": round(statistics.median(
                    sum(r["cpu_ms_per_query_by_role"].values()) for r in mine), 2),
            }
        out[path] = {"on": side[True], "off": side[False],
                     "qps_on_over_off": round(side[True]["qps"] / side[False]["qps"], 3),
                     "gateway_cpu_on_over_off": round(side[True]["gateway_cpu_ms_per_query"]
                                                      / max(side[False]["gateway_cpu_ms_per_query"], 1e-9), 3),
                     "cluster_cpu_on_over_off": round(side[True]["cluster_cpu_ms_per_query"]
                                                      / max(side[False]["cluster_cpu_ms_per_query"], 1e-9), 3)}
    return out


def format_report(report: dict[str, Any]) -> str:
    lines = [f"{'round':>5} {'metrics':>7} {'path':>6} {'QPS':>8} {'p50 ms':>8} {'gateway CPU ms/q':>17}"]
    for r in report["runs"]:
        lines.append(f"{r['round']:>5} {'on' if r['metrics'] else 'off':>7} {r['system']:>6} {r['qps']:>8.2f} "
                     f"{r['p50_ms']:>8.1f} {r['cpu_ms_per_query_by_role'].get('gateway', 0.0):>17.2f}")
    for path, s in report["summary"].items():
        lines.append(f"{path}: median QPS on {s['on']['qps']:.2f} / off {s['off']['qps']:.2f} = "
                     f"{s['qps_on_over_off']:.3f}x; gateway CPU ms/query on {s['on']['gateway_cpu_ms_per_query']:.2f}"
                     f" / off {s['off']['gateway_cpu_ms_per_query']:.2f} = {s['gateway_cpu_on_over_off']:.3f}x; "
                     f"cluster CPU ms/query {s['cluster_cpu_on_over_off']:.3f}x (stats deployment "
                     f"{s['on']['stats_cpu_ms_per_query']:.2f} ms/query)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--profile", choices=["demo", "seed"], help="the embedded default (demo), the default")
    source.add_argument("--dataset", help="a BEIR directory, e.g. ../shared/datasets/scifact")
    parser.add_argument("--rounds", type=int, default=3, help="on/off pairs (default 3)")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per run (default 8)")
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--output", type=Path, help="write the JSON report here")
    args = parser.parse_args()
    if args.rounds < 1 or args.duration <= 0:
        parser.error("--rounds must be >= 1 and --duration > 0")
    profile = args.profile or (None if args.dataset else "demo")
    report = run(profile=profile, dataset=args.dataset, rounds=args.rounds, duration_s=args.duration, port=args.port)
    print(format_report(report))
    if args.output:
        args.output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
