"""The scaling figure: how one dense replica's index behaves as the corpus grows, and how QPS
follows the number of replicas.

    python -m benchmarks.scaling index [--sizes 10000,100000,1000000] [--kinds flat,hnsw] [--output FILE.json]
    python -m benchmarks.scaling replicas --dataset DIR [--replicas 1,2,4] [--output FILE.json]
    python -m benchmarks.scaling shards [--vectors 1000000] [--counts 1,2,4,8] [--output FILE.json]
    python -m benchmarks.scaling plot INDEX.json REPLICAS.json --png docs/data/scaling.png

Index scaling uses synthetic 384-d unit vectors (the all-MiniLM-L6-v2 dimension) and the same
`make_index` the retrievers use, on one thread as a replica with `num_cpus: 1` would: build time,
single-query latency (p50 / p99 over 200 queries, k = 10) and the index's memory (its serialised
size, which is what the replica holds).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import faiss
import numpy as np

from benchmarks.bench import percentile

DIM = 384


def unit_vectors(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((n, DIM), dtype=np.float32)
    for start in range(0, n, 100_000):  # in blocks, to keep the float64 temporaries small
        block = rng.standard_normal((min(100_000, n - start), DIM)).astype(np.float32)
        out[start : start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def index_scaling(sizes: list[int], kinds: tuple[str, ...] = ("flat", "hnsw"), queries: int = 200) -> list[dict]:
    from actors.dense import make_index

    faiss.omp_set_num_threads(1)
    rows = []
    probe = unit_vectors(queries, seed=1)
    for n in sizes:
        vectors = unit_vectors(n, seed=0)
        for kind in kinds:
            started = time.perf_counter()
            index = make_index(vectors, kind)
            build_s = time.perf_counter() - started
            params = faiss.SearchParametersHNSW(efSearch=128) if kind == "hnsw" else None
            latencies = []
            for q in probe:
                t = time.perf_counter()
                index.search(q[None, :], 10, params=params)
                latencies.append((time.perf_counter() - t) * 1000)
            rows.append({
                "index": kind, "vectors": n, "build_s": round(build_s, 2),
                "p50_ms": round(percentile(latencies, 50), 3), "p99_ms": round(percentile(latencies, 99), 3),
                "memory_mb": round(faiss.serialize_index(index).nbytes / 2**20, 1),
            })
            print(rows[-1], flush=True)
            del index
    return rows


def shard_scaling(n: int, counts: list[int], queries: int = 100, k: int = 10) -> list[dict]:
    """A flat index of n synthetic vectors split by document into N shards, as ragfan shards it.

    Per shard: documents, index memory and query latency (one thread). And the check that the
    merged top-k of the shards equals the unsharded top-k, for every probe query.
    """
    from actors.dense import make_index
    from actors.shards import merge, shard_of
    from actors.types import Hit

    faiss.omp_set_num_threads(1)
    vectors = unit_vectors(n, seed=0)
    probe = unit_vectors(queries, seed=1)
    ids = [f"doc{i}" for i in range(n)]
    whole = make_index(vectors, "flat")
    expected_scores, expected_rows = whole.search(probe, k)
    del whole
    rows = []
    for count in counts:
        owner = np.array([shard_of(doc_id, count) for doc_id in ids])
        answers: list[list[list[Hit]]] = [[] for _ in range(queries)]
        per_shard = []
        for s in range(count):
            members = np.flatnonzero(owner == s)
            index = make_index(vectors[members], "flat")
            latencies = []
            for q in probe:
                t = time.perf_counter()
                index.search(q[None, :], k)
                latencies.append((time.perf_counter() - t) * 1000)
            scores, rows_ = index.search(probe, k)
            for qi in range(queries):
                found = zip(scores[qi], rows_[qi], strict=True)
                answers[qi].append([Hit(ids[members[r]], float(sc), "") for sc, r in found])
            per_shard.append((len(members), faiss.serialize_index(index).nbytes / 2**20, percentile(latencies, 50)))
            del index
        exact = all(
            [h.doc_id for h in merge(answers[qi], k)] == [ids[r] for r in expected_rows[qi]]
            for qi in range(queries)
        )
        rows.append({
            "vectors": n, "shards": count,
            "docs_per_shard_max": max(p[0] for p in per_shard),
            "memory_mb_per_shard_max": round(max(p[1] for p in per_shard), 1),
            "p50_ms_per_shard_max": round(max(p[2] for p in per_shard), 3),
            "merged_equals_unsharded": exact,
        })
        print(rows[-1], flush=True)
    return rows


def replica_scaling(dataset: str, replicas: list[int], concurrency: int = 32, duration_s: float = 10) -> list[dict]:
    import os

    import ray
    from ray import serve

    from actors.index import default_cache_dir
    from benchmarks.bench import _app_config, measure
    from serve_app.app import app_from_config, serve_env
    from serve_app.client import RagClient
    from serve_app.config import parse_config
    from serve_app.evaluate import load_beir

    path = Path(dataset)
    artifacts = default_cache_dir() / "datasets" / path.resolve().name
    queries = list(load_beir(path, "test")[0].values())
    # Enough logical CPUs for the largest replica count (3 retrievers x 0.5 CPU each, plus the
    # gateway): on a small machine the replicas then share the real cores, which is the point.
    needed = 0.25 + 3 * 0.5 * max(replicas)
    with serve_env():
        ray.init(num_cpus=max(4, os.cpu_count() or 1, int(needed) + 1), include_dashboard=False,
                 log_to_driver=False)
    serve.start(proxy_location="Disabled")
    rows = []
    try:
        for r in replicas:
            raw = _app_config("dataset", artifacts, batch=32)
            for retriever in raw["retrievers"]:
                retriever["num_replicas"] = r
            handle = serve.run(app_from_config(parse_config(raw, base_dir=Path("."))), name="scaling",
                               route_prefix=None)
            client = RagClient.from_handle(handle)
            row = measure("ragfan-handle", concurrency, lambda q, c=client: c.search_async(q, top_k=10), queries,
                          duration_s)
            rows.append({"replicas": r, **row})
            print(rows[-1], flush=True)
            serve.delete("scaling")
    finally:
        serve.shutdown()
        ray.shutdown()
    return rows


def plot(index_rows: list[dict], replica_rows: list[dict], png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for kind, marker in (("flat", "o"), ("hnsw", "s")):
        rows = [r for r in index_rows if r["index"] == kind]
        n = [r["vectors"] for r in rows]
        axes[0].plot(n, [r["p50_ms"] for r in rows], marker=marker, label=f"{kind} p50")
        axes[1].plot(n, [r["memory_mb"] for r in rows], marker=marker, label=f"{kind} memory")
        axes[1].plot(n, [r["build_s"] for r in rows], marker=marker, linestyle="--", label=f"{kind} build (s)")
    for ax, title in ((axes[0], "query latency, 1 thread (ms)"), (axes[1], "index memory (MB) and build time (s)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("vectors (384-d)")
        ax.set_title(title)
        ax.legend()
        ax.grid(True, which="both", alpha=0.3)
    axes[2].plot([r["replicas"] for r in replica_rows], [r["qps"] for r in replica_rows], marker="o")
    axes[2].set_xlabel("replicas per retriever")
    axes[2].set_title("QPS at concurrency 32 (SciFact, 2 cores)")
    axes[2].set_ylim(bottom=0)
    axes[2].grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    idx = sub.add_parser("index")
    idx.add_argument("--sizes", default="10000,100000,1000000")
    idx.add_argument("--kinds", default="flat,hnsw")
    idx.add_argument("--output")
    rep = sub.add_parser("replicas")
    rep.add_argument("--dataset", required=True)
    rep.add_argument("--replicas", default="1,2,4")
    rep.add_argument("--output")
    sh = sub.add_parser("shards")
    sh.add_argument("--vectors", type=int, default=1_000_000)
    sh.add_argument("--counts", default="1,2,4,8")
    sh.add_argument("--output")
    plt_p = sub.add_parser("plot")
    plt_p.add_argument("index_json")
    plt_p.add_argument("replicas_json")
    plt_p.add_argument("--png", default="docs/data/scaling.png")
    args = parser.parse_args(argv)
    if args.what == "plot":
        plot(json.loads(Path(args.index_json).read_text()), json.loads(Path(args.replicas_json).read_text()), args.png)
        print(f"wrote {args.png}")
        return 0
    if args.what == "index":
        rows = index_scaling([int(s) for s in args.sizes.split(",")], tuple(args.kinds.split(",")))
    elif args.what == "shards":
        rows = shard_scaling(args.vectors, [int(c) for c in args.counts.split(",")])
    else:
        rows = replica_scaling(args.dataset, [int(r) for r in args.replicas.split(",")])
    if args.output:
        Path(args.output).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
