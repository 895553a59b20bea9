"""Incremental ingest: a 1% change to a BEIR corpus, re-ingested incrementally and rebuilt in full.

    python -m benchmarks.incremental_ingest --dataset DIR [--change 0.01] [--repeat 3] [--output FILE.json]

1. A full ingest (dense + keyword, flat) of the corpus into a temporary directory.
2. The corpus changes: `--change` of its documents, half edited (a sentence of another document
   appended to its text), a quarter deleted, and a quarter added (new ids, each made of the
   title of one document and the text of another). The choice is seeded, so every run makes the
   same change.
3. The changed corpus is re-ingested over (1): incremental. This runs `--repeat` times, each on a
   fresh copy of (1), and the median wall time is the figure.
4. The changed corpus is ingested with `full=True` (`ragfan ingest --full`) into another directory.

Both indexes of the changed corpus are then searched in this process with the real model (each
query encoded once, the same vector sent to both dense indexes), chunk hits grouped to their
document as `ragfan eval` does, and scored with its code (serve_app/evaluate.py, ir-measures):
nDCG@10 of each, and whether the rankings and the stored vectors are the same.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from actors.dense import DenseRetriever
from actors.embedder import SentenceTransformerEmbedder
from actors.index import verify
from actors.ingest import KindReport, ingest
from actors.keyword import KeywordRetriever
from actors.sources import PARENT
from actors.types import Query
from serve_app.evaluate import DEPTH, load_beir, measure

KINDS = ("dense", "keyword")


def change_corpus(lines: list[dict], fraction: float, seed: int = 0) -> tuple[list[dict], dict[str, int]]:
    """The corpus with `fraction` of its documents edited (1/2), deleted (1/4) and added (1/4)."""
    rng = random.Random(seed)
    n = max(4, round(len(lines) * fraction))
    deleted_n = added_n = n // 4
    edited_n = n - deleted_n - added_n
    picked = rng.sample(range(len(lines)), edited_n + deleted_n)
    edited, deleted = set(picked[:edited_n]), set(picked[edited_n:])
    out = []
    for i, doc in enumerate(lines):
        if i in deleted:
            continue
        if i in edited:
            other = lines[rng.randrange(len(lines))]["text"]
            doc = {**doc, "text": f"{doc['text']} {other.split('. ')[0].rstrip('.')}."}
        out.append(doc)
    for k in range(added_n):
        a, b = rng.sample(range(len(lines)), 2)
        out.append({"_id": f"new-{k}", "title": lines[a].get("title", ""), "text": lines[b]["text"]})
    return out, {"edited": edited_n, "deleted": deleted_n, "added": added_n}


def write_jsonl(path: Path, lines: list[dict]) -> None:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")


def timed_ingest(source: Path, out: Path, **kwargs: Any) -> tuple[float, dict[str, KindReport]]:
    started = time.perf_counter()
    reports = ingest(source, out, kinds=KINDS, **kwargs)
    return time.perf_counter() - started, {r.kind: r for r in reports}


def summary(seconds: float, reports: dict[str, KindReport]) -> dict[str, Any]:
    return {
        "wall_s": round(seconds, 1),
        "load_1min_after": round(os.getloadavg()[0], 2),  # other work on the machine slows the embedding
        **{kind: {"mode": r.mode, "chunks": r.num_docs, "embedded": r.embedded, "seconds": round(r.seconds, 1),
                  "added": r.chunks.added, "changed": r.chunks.changed, "removed": r.chunks.removed,
                  "reused": r.chunks.reused}
           for kind, r in reports.items()},
    }


def rankings(retriever, queries: dict[str, str], vectors: np.ndarray | None) -> dict[str, dict[str, float]]:
    """Each query's documents, best first, as `ragfan eval` scores them: chunks grouped to their parent."""
    asked = [Query(text, top_k=DEPTH, vector=None if vectors is None else vectors[i])
             for i, text in enumerate(queries.values())]
    runs = {}
    for qid, hits in zip(queries, retriever.search(asked), strict=True):
        ranking: dict[str, float] = {}
        for hit in hits:
            doc_id = hit.metadata.get(PARENT, hit.doc_id)
            if doc_id not in ranking:
                ranking[doc_id] = float(DEPTH - len(ranking))
        runs[qid] = ranking
    return runs


def quality(dataset: Path, incremental: Path, full: Path) -> dict[str, Any]:
    queries, qrels = load_beir(dataset, "test")
    embedder = SentenceTransformerEmbedder("default", device="cpu")
    vectors = embedder.encode(list(queries.values()))
    out: dict[str, Any] = {"queries": len(queries)}
    for kind in KINDS:
        opened = {}
        for name, root in (("incremental", incremental), ("full", full)):
            directory = (root / kind).resolve()
            manifest = verify(directory)
            if kind == "dense":
                opened[name] = DenseRetriever.load(directory, manifest, name=kind, embedder=embedder)
            else:
                opened[name] = KeywordRetriever.load(directory, manifest, name=kind)
        runs = {name: rankings(r, queries, vectors if kind == "dense" else None) for name, r in opened.items()}
        row: dict[str, Any] = {name: measure(run, qrels)["nDCG@10"] for name, run in runs.items()}
        row["same_top10"] = sum(
            list(runs["incremental"][q])[:10] == list(runs["full"][q])[:10] for q in queries
        )
        if kind == "dense":
            a, b = (faiss.read_index(str(root / kind / "index.faiss")) for root in (incremental, full))
            diff = np.abs(a.reconstruct_n(0, a.ntotal) - b.reconstruct_n(0, b.ntotal))
            row["max_abs_vector_difference"] = float(diff.max())
        out[kind] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="BEIR directory: corpus.jsonl, queries.jsonl, qrels/test.tsv")
    parser.add_argument("--change", type=float, default=0.01, help="share of documents changed (default 0.01)")
    parser.add_argument("--repeat", type=int, default=3, help="incremental runs, each on a fresh copy (median)")
    parser.add_argument("--output", help="write the figures as JSON here")
    args = parser.parse_args()

    import ray

    dataset = Path(args.dataset)
    with (dataset / "corpus.jsonl").open(encoding="utf-8") as fh:
        original = [json.loads(line) for line in fh if line.strip()]
    changed, change = change_corpus(original, args.change)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    work = Path(tempfile.mkdtemp(prefix="ragfan-incremental-"))
    try:
        source = work / "corpus.jsonl"
        write_jsonl(source, original)
        first_s, first = timed_ingest(source, work / "base")
        print(f"first ingest: {first_s:.1f} s")
        write_jsonl(source, changed)
        runs, seconds_each = [], []
        for i in range(args.repeat):
            target = work / f"incremental-{i}"
            shutil.copytree(work / "base", target, symlinks=True)  # the links are relative: the copy stands alone
            seconds, reports = timed_ingest(source, target)
            runs.append(summary(seconds, reports))
            seconds_each.append(seconds)
            print(f"incremental {i + 1}/{args.repeat}: {seconds:.1f} s")
        full_s, full = timed_ingest(source, work / "full", full=True)
        print(f"full rebuild: {full_s:.1f} s")
        ray.shutdown()
        incremental_s = statistics.median(seconds_each)
        result = {
            "dataset": str(dataset),
            "documents": len(original),
            "change": change,
            "kinds": list(KINDS),
            "index_type": "flat",
            "first_ingest": summary(first_s, first),
            "incremental_runs": runs,
            "incremental_median_s": round(incremental_s, 1),
            "full_rebuild": summary(full_s, full),
            "ratio_incremental_to_full": round(incremental_s / full_s, 4),
            "quality": quality(dataset, work / "incremental-0", work / "full"),
        }
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
