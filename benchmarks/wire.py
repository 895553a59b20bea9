"""Bytes on the wire and latency of one answer, compressed and not, and trimmed with `include: []`.

    .venv/bin/ragfan serve --port 8021 &                  # the embedded default; wait for "ready"
    .venv/bin/python -m benchmarks.wire --url http://127.0.0.1:8021 --output docs/data/wire-demo.json

For `top_k` 10 and 100, each variant (an Accept-Encoding, and whether the results carry text and
metadata) is asked the same demo queries, one request at a time, the variants interleaved so that
drift in the service touches each alike. Every query is asked once before it is measured, so each
variant meets the same state: with the result cache on (the default), every measured answer comes
from it, and the latency is the gateway's own work and the transfer. Bytes are the body as sent,
read raw from the stream before any decoding; latency is from sending the request to the answer
decoded into JSON, as a client sees it. Each figure is the median over `--requests` requests.
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import brotli
import httpx
import zstandard
from tqdm import tqdm

from benchmarks.bench import demo_queries, machine, versions

TOP_KS = (10, 100)
# (label, Accept-Encoding, include); `include: None` leaves it out: text and metadata.
VARIANTS: list[tuple[str, str, list[str] | None]] = [
    ("identity", "identity", None),
    ("gzip", "gzip", None),
    ("br", "br", None),
    ("zstd", "zstd", None),
    ("include [], identity", "identity", []),
    ("include [], zstd", "zstd", []),
]
DECODE: dict[str, Callable[[bytes], bytes]] = {
    "": lambda body: body,
    "gzip": gzip.decompress,
    "br": brotli.decompress,
    "zstd": lambda body: zstandard.ZstdDecompressor().decompressobj().decompress(body),
}


def ask(client: httpx.Client, query: str, top_k: int, accept: str, include: list[str] | None) -> dict[str, Any]:
    """One search: the bytes as sent, its encoding, its latency (to decoded JSON) and its result count."""
    body: dict[str, Any] = {"query": query, "top_k": top_k} | ({"include": include} if include is not None else {})
    started = time.perf_counter()
    with client.stream("POST", "/v1/search", json=body, headers={"accept-encoding": accept}) as response:
        raw = b"".join(response.iter_raw())
    response.raise_for_status()
    encoding = response.headers.get("content-encoding", "")
    answer = json.loads(DECODE[encoding](raw))
    latency_ms = (time.perf_counter() - started) * 1000
    return {"bytes": len(raw), "encoding": encoding or "identity", "latency_ms": latency_ms,
            "results": len(answer["results"])}


def measure(url: str, requests: int) -> list[dict[str, Any]]:
    queries = demo_queries()[:requests]
    rows = []
    with httpx.Client(base_url=url, timeout=60) as client:
        for top_k in TOP_KS:
            # Warm-up, once per query: every variant then meets the same state (the result cache
            # answering, where it is on), so the rows differ only in what is sent back.
            for query in queries:
                ask(client, query, top_k, "identity", None)
            samples: dict[str, list[dict[str, Any]]] = {label: [] for label, _, _ in VARIANTS}
            for query in tqdm(queries, desc=f"top_k {top_k}", unit="query"):
                for label, accept, include in VARIANTS:
                    samples[label].append(ask(client, query, top_k, accept, include))
            plain = statistics.median(s["bytes"] for s in samples["identity"])
            for label, accept, include in VARIANTS:
                got = samples[label]
                size = statistics.median(s["bytes"] for s in got)
                rows.append({
                    "top_k": top_k, "variant": label, "accept_encoding": accept, "include": include,
                    "content_encoding": sorted({s["encoding"] for s in got}),
                    "results_p50": statistics.median(s["results"] for s in got),
                    "bytes_p50": size, "vs_identity": round(size / plain, 3),
                    "latency_ms_p50": round(statistics.median(s["latency_ms"] for s in got), 2),
                    "requests": len(got),
                })
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| top_k | variant | Content-Encoding | results | bytes (p50) | vs identity | latency p50 (ms) |",
             "|---:|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['top_k']} | {r['variant']} | {', '.join(r['content_encoding'])} | {r['results_p50']:g} "
                     f"| {r['bytes_p50']:,.0f} | {r['vs_identity']:.2f}x | {r['latency_ms_p50']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8021", help="a running ragfan (the embedded default)")
    parser.add_argument("--requests", type=int, default=50, help="requests per variant and top_k")
    parser.add_argument("--output", type=Path, default=Path("docs/data/wire-demo.json"))
    args = parser.parse_args()
    rows = measure(args.url, args.requests)
    print(table(rows))
    gzip100 = next(r for r in rows if r["top_k"] == 100 and r["variant"] == "gzip")
    print(f"\nbytes on the wire, top_k 100 with gzip vs without: {gzip100['vs_identity']:.2f}x (aim <= 0.3x)")
    packages = {"httpx": httpx.__version__, "zstandard": zstandard.__version__, "brotli": brotli.__version__}
    args.output.write_text(json.dumps({
        "url": args.url, "requests": args.requests, "machine": machine(), "versions": versions() | packages,
        "rows": rows,
    }, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
