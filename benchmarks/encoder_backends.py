"""What each encoder backend costs: CPU per text for queries and documents, and the memory of a process holding it.

    .venv/bin/python -m benchmarks.encoder_backends --dataset ../shared/datasets/scifact \
        --output docs/data/encoder-backends.json

Backends: `torch` (sentence-transformers), `onnx` (the model exported to ONNX, on onnxruntime) and
`onnx-int8` (the same export with dynamic int8 weights; measured, not offered: docs/QUALITY.md).

Each backend runs in a process of its own, with one thread (torch's and onnxruntime's pools sized
by `limit_threads(1)`, as a replica with `num_cpus` 1 or less runs), so its memory is its own and no
backend's threads or caches touch another's. A round starts one process per backend, in an order
that rotates from round to round so that a drift of the machine's speed falls on each. A process
loads its backend, encodes a warm-up, notes its RSS, then measures, `--repeats` times each:

- `queries-b1`: the dataset's first `--texts` queries, one call per query (a lone search);
- `queries-b8`: the same queries in calls of 8 (what the encoder deployment batches on a CPU);
- `docs-b1`, `docs-b8`: the first `--texts` corpus chunks, as `ragfan ingest` cuts them;
- `docs-b64`: the same chunks in calls of 64, sub-batches of 64 (what ingest's embedding actors do).

The figure is process CPU time (`time.process_time`) per text: the median over the repeats, then
over the rounds. Ratios are each backend against torch in the same run. The vectors of the last
pass are compared with torch's: the lowest and the mean cosine per workload.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

BACKENDS = ("torch", "onnx", "onnx-int8")
# workload -> (texts, texts per call, sub-batch the embedder runs them in)
WORKLOADS = {"queries-b1": ("queries", 1, 1), "queries-b8": ("queries", 8, 8), "docs-b1": ("docs", 1, 1),
             "docs-b8": ("docs", 8, 8), "docs-b64": ("docs", 64, 64)}


def load_texts(dataset: Path, n: int) -> dict[str, list[str]]:
    """The first `n` queries, and the first `n` chunks of the corpus as ingest embeds them."""
    from actors.sources import chunk, read_source

    with (dataset / "queries.jsonl").open(encoding="utf-8") as fh:
        queries = [json.loads(line)["text"] for line in islice(fh, n)]
    docs = [d.text for d in islice(chunk(read_source(dataset / "corpus.jsonl")), n)]
    return {"queries": queries, "docs": docs}


def rss_mb() -> float:
    import psutil

    return round(psutil.Process().memory_info().rss / 2**20, 1)


# -- one backend, in a process of its own -------------------------------------------------------
def worker(backend: str, dataset: Path, n: int, repeats: int, vectors_dir: Path) -> dict[str, Any]:
    from actors.embedder import limit_threads, make_embedder

    texts = load_texts(dataset, n)
    before = rss_mb()
    started = time.perf_counter()
    threads = limit_threads(1, torch=backend == "torch")
    embedder = make_embedder(backend=backend, threads=threads, device="cpu")
    embedder.encode(["warm-up query"])
    loaded = {"rss_before_load_mb": before, "rss_loaded_mb": rss_mb(),
              "load_s": round(time.perf_counter() - started, 2), "torch_imported": "torch" in sys.modules}
    results: dict[str, Any] = {}
    for workload, (kind, per_call, sub_batch) in WORKLOADS.items():
        items = texts[kind]
        embedder.encode(items[:per_call], batch_size=sub_batch)  # this shape's first call out of the timing
        per_text = []
        for _ in range(repeats):
            out = []
            cpu = time.process_time()
            for start in range(0, len(items), per_call):
                out.append(embedder.encode(items[start : start + per_call], batch_size=sub_batch))
            per_text.append((time.process_time() - cpu) / len(items) * 1000)
        np.save(vectors_dir / f"{backend}-{workload}.npy", np.concatenate(out))
        results[workload] = {"cpu_ms_per_text": round(statistics.median(per_text), 3),
                             "repeats_ms": [round(x, 3) for x in per_text], "texts": len(items)}
    # ru_maxrss is in KiB on Linux: the most this process held, the passes of 64 long chunks included.
    peak = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return {**loaded, "rss_peak_mb": peak, "workloads": results}


def _run_worker(backend: str, args: argparse.Namespace, vectors_dir: Path) -> dict[str, Any]:
    command = [sys.executable, "-m", "benchmarks.encoder_backends", "--worker", backend, "--dataset",
               str(args.dataset), "--texts", str(args.texts), "--repeats", str(args.repeats),
               "--vectors-dir", str(vectors_dir)]
    # One thread everywhere, torch's intra-op pool included, before anything is imported.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"the {backend} worker failed: {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.bench import machine, versions

    rounds: dict[str, list[dict[str, Any]]] = {b: [] for b in args.backends}
    with tempfile.TemporaryDirectory() as tmp:
        vectors_dir = Path(tmp)
        for r in range(args.rounds):
            order = args.backends[r % len(args.backends):] + args.backends[: r % len(args.backends)]
            for backend in order:
                print(f"round {r + 1}/{args.rounds}: {backend}", flush=True)
                rounds[backend].append(_run_worker(backend, args, vectors_dir))
        agreement = _agreement(vectors_dir, args.backends)
    summary: dict[str, Any] = {}
    for backend, runs in rounds.items():
        summary[backend] = {
            "rss_loaded_mb": statistics.median(x["rss_loaded_mb"] for x in runs),
            "rss_peak_mb": statistics.median(x["rss_peak_mb"] for x in runs),
            "load_s": statistics.median(x["load_s"] for x in runs),
            "torch_imported": runs[0]["torch_imported"],
            "cpu_ms_per_text": {w: round(statistics.median(x["workloads"][w]["cpu_ms_per_text"] for x in runs), 3)
                                for w in WORKLOADS},
        }
    if "torch" in summary:
        base = summary["torch"]["cpu_ms_per_text"]
        for backend in summary:
            summary[backend]["cpu_vs_torch"] = {w: round(summary[backend]["cpu_ms_per_text"][w] / base[w], 3)
                                                for w in WORKLOADS}
            summary[backend]["cosine_to_torch"] = agreement.get(backend)
    import onnxruntime

    return {
        "benchmark": "encoder_backends",
        "date": time.strftime("%Y-%m-%d"),
        "dataset": str(args.dataset),
        "texts": args.texts, "repeats": args.repeats, "rounds": args.rounds, "threads": 1,
        "measure": "process CPU ms per text (time.process_time), median over repeats, then over rounds",
        "machine": machine(),
        "versions": {**versions(), "onnxruntime": onnxruntime.__version__},
        "summary": summary,
        "rounds_raw": rounds,
    }


def _agreement(vectors_dir: Path, backends: list[str]) -> dict[str, dict[str, dict[str, float]]]:
    """Per backend and workload: the lowest and the mean cosine of its vectors to torch's."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for backend in backends:
        out[backend] = {}
        for workload in WORKLOADS:
            ours, torch = (np.load(vectors_dir / f"{b}-{workload}.npy") for b in (backend, "torch"))
            cosine = (ours * torch).sum(axis=1)
            out[backend][workload] = {"min": round(float(cosine.min()), 7), "mean": round(float(cosine.mean()), 7)}
    return out


def format_report(report: dict[str, Any]) -> str:
    s = report["summary"]
    lines = [f"{report['texts']} texts per workload, {report['repeats']} repeats x {report['rounds']} rounds, "
             "1 thread; CPU ms per text (ratio to torch)"]
    lines.append(f"{'backend':<10}" + "".join(f"{w:>18}" for w in WORKLOADS) + f"{'RSS MB':>9}{'peak':>8}")
    for backend, row in s.items():
        cells = "".join(f"{row['cpu_ms_per_text'][w]:>10.2f} ({row.get('cpu_vs_torch', {}).get(w, 1):.2f})"
                        for w in WORKLOADS)
        lines.append(f"{backend:<10}{cells}{row['rss_loaded_mb']:>9.0f}{row['rss_peak_mb']:>8.0f}")
    for backend, row in s.items():
        if backend != "torch" and row.get("cosine_to_torch"):
            low = min(c["min"] for c in row["cosine_to_torch"].values())
            mean = statistics.mean(c["mean"] for c in row["cosine_to_torch"].values())
            lines.append(f"{backend}: cosine to torch, lowest {low:.7f}, mean {mean:.7f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", type=Path, default=Path("../shared/datasets/scifact"),
                        help="a BEIR directory (queries.jsonl, corpus.jsonl)")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--texts", type=int, default=200, help="queries and document chunks per workload (default 200)")
    parser.add_argument("--repeats", type=int, default=3, help="passes per workload in a process (default 3)")
    parser.add_argument("--rounds", type=int, default=2, help="processes per backend (default 2)")
    parser.add_argument("--output", type=Path, help="write the JSON report here")
    parser.add_argument("--worker", choices=BACKENDS, help=argparse.SUPPRESS)
    parser.add_argument("--vectors-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.texts < 64 or args.repeats < 1 or args.rounds < 1:
        parser.error("--texts must be >= 64, --repeats and --rounds >= 1")
    if args.worker:
        print(json.dumps(worker(args.worker, args.dataset, args.texts, args.repeats, args.vectors_dir)))
        return
    if "torch" not in args.backends:
        parser.error("the ratios are to torch: keep torch in --backends")
    report = run(args)
    print(format_report(report))
    if args.output:
        args.output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
