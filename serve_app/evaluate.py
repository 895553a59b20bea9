"""`ragfan eval`: retrieval quality on a BEIR dataset, measured through the served fan-out.

The dataset's corpus is ingested (or the cached artifacts reused) into a `dense` and a `keyword`
retriever. A local app with the real gateway starts (or one on `--address`), and every query of
the split goes through the same DeploymentHandle path a client uses: once to each retriever alone
and once to both, fused. The queries go as batch searches (`search_batch`), BATCH at a time per
system, so that each retriever gets one call per batch instead of one per query.
The metrics come from ir-measures: nDCG@10, R@100 and RR@10 (MRR@10).

Hits of chunked documents are grouped back to their document (best rank wins). A query that the
service rejects or fails is scored as a miss (an empty ranking) and counted in `failed_queries`.
"""

from __future__ import annotations

import asyncio
import csv
import json
import os
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from actors.errors import RagError
from actors.index import default_cache_dir
from actors.sources import PARENT
from serve_app.schemas import FusionOptions, SearchResponse

MEASURES = ("nDCG@10", "R@100", "RR@10")
DEPTH = 100
APP = "ragfan-eval"
BATCH = 64  # searches per batch request: the gateway's default max_batch_searches


def load_beir(dataset: Path, split: str) -> tuple[dict[str, str], dict[str, dict[str, int]]]:
    """Queries that have judgments in the split, and the judgments: {query id: {doc id: relevance}}."""
    qrels_path = dataset / "qrels" / f"{split}.tsv"
    for path in (dataset / "corpus.jsonl", dataset / "queries.jsonl", qrels_path):
        if not path.is_file():
            raise RagError(f"{path}: not found; a BEIR dataset has corpus.jsonl, queries.jsonl and qrels/{split}.tsv")
    qrels: dict[str, dict[str, int]] = {}
    with qrels_path.open(encoding="utf-8") as fh:
        for row in csv.DictReader(fh, delimiter="\t"):
            qrels.setdefault(row["query-id"], {})[row["corpus-id"]] = int(row["score"])
    queries = {}
    with (dataset / "queries.jsonl").open(encoding="utf-8") as fh:
        for line in fh:
            q = json.loads(line)
            if q["_id"] in qrels:
                queries[q["_id"]] = q["text"]
    missing = sorted(set(qrels) - set(queries))
    if missing:
        raise RagError(f"{qrels_path}: {len(missing)} judged queries are not in queries.jsonl, e.g. {missing[0]}")
    return queries, qrels


def to_run(response: SearchResponse, qid: str, ignore_identical_ids: bool) -> dict[str, float]:
    """One ranking by document: chunk hits grouped to their parent, best rank first, as descending scores."""
    ranking: dict[str, float] = {}
    for result in response.results:
        doc_id = (result.metadata or {}).get(PARENT, result.id)
        if doc_id in ranking or (ignore_identical_ids and doc_id == qid):
            continue
        ranking[doc_id] = float(DEPTH - len(ranking))  # ranks as scores: ir-measures sorts by score
    return ranking


def measure(run: dict[str, dict[str, float]], qrels: dict[str, dict[str, int]]) -> dict[str, float]:
    import ir_measures

    measures = [ir_measures.parse_measure(m) for m in MEASURES]
    totals = dict.fromkeys(measures, 0.0)
    # Per query, then averaged over every judged query: a query with no hits scores 0 on each
    # measure (aggregates over only the queries present in the run would leave misses out).
    for value in ir_measures.iter_calc(measures, qrels, {q: d for q, d in run.items() if d}):
        if value.query_id in qrels:
            totals[value.measure] += float(value.value)
    return {str(m): round(total / len(qrels), 4) for m, total in totals.items()}


async def _run_queries(client, queries, systems, *, fusion, ignore_identical_ids, concurrency):
    """Each system's ranking per query, and its failures; the queries go BATCH to a request, and
    `concurrency` queries (at least one batch) are in flight at once. Also the requests sent."""
    runs: dict[str, dict[str, dict[str, float]]] = {name: {} for name in systems}
    failed: dict[str, dict[str, str]] = {name: {} for name in systems}
    gate = asyncio.Semaphore(max(1, concurrency // BATCH))
    ids = list(queries)
    batches = [ids[i:i + BATCH] for i in range(0, len(ids), BATCH)]

    async def one(system: str, retrievers: list[str], qids: list[str], bar) -> None:
        async with gate:
            try:
                answers = await client.search_batch_async([queries[q] for q in qids], top_k=DEPTH,
                                                          retrievers=retrievers, fusion=fusion)
            except Exception as exc:  # the whole batch was refused: each of its queries is a miss
                answers = [exc] * len(qids)
        for qid, answer in zip(qids, answers, strict=True):
            if isinstance(answer, Exception):  # a rejected query is a miss, and reported
                runs[system][qid] = {}
                failed[system][qid] = f"{type(answer).__name__}: {answer}"[:200]
                continue
            runs[system][qid] = to_run(answer, qid, ignore_identical_ids)
            if answer.degraded:
                failed[system][qid] = "degraded: " + ", ".join(
                    f"{n}={s.status}" for n, s in answer.retrievers.items() if s.status not in ("ok", "skipped")
                )
        bar.update(len(qids))

    with tqdm(total=len(queries) * len(systems), desc="queries", unit="q") as bar:
        await asyncio.gather(*(
            one(system, retrievers, qids, bar) for qids in batches for system, retrievers in systems.items()
        ))
    return runs, failed, len(batches) * len(systems)


def evaluate(
    dataset: str | Path,
    *,
    split: str = "test",
    ignore_identical_ids: bool = False,
    fusion: str | None = None,
    address: str | None = None,
    concurrency: int = 16,
) -> dict[str, Any]:
    import ray
    from ray import serve

    from actors.ingest import ingest
    from serve_app.app import app_from_config
    from serve_app.client import RagClient
    from serve_app.config import parse_config

    started = time.perf_counter()
    dataset = Path(dataset)
    queries, qrels = load_beir(dataset, split)
    artifacts = default_cache_dir() / "datasets" / dataset.resolve().name
    connected = not ray.is_initialized()  # a Ray this run starts or joins; not a caller's
    own_cluster = connected and not address  # started here: this run may shut it down, Serve and all
    if connected:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            from serve_app.app import serve_env

            with serve_env():
                ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    try:
        config = parse_config(
            {
                "app_name": APP,
                "gateway": {"ray_actor_options": {"num_cpus": 0.25}, "max_ongoing_requests": 1000},
                "retrievers": [
                    {
                        "name": kind,
                        "kind": kind,
                        "artifacts": str(artifacts / kind),
                        "top_k": DEPTH,
                        "timeout_ms": 120_000,
                        "max_ongoing_requests": 64,
                        "batch": {"max_batch_size": 32, "batch_wait_timeout_s": 0.005},
                        "ray_actor_options": {"num_cpus": 0.5},
                    }
                    for kind in ("dense", "keyword")
                ],
            },
            base_dir=Path("."),
        )
        if not own_cluster:
            _check_free_cpus(config, address or "this Ray cluster", ray.available_resources())
        for report in ingest(dataset / "corpus.jsonl", artifacts, kinds=("dense", "keyword")):
            print(f"{report.kind}: {'reused' if report.reused else 'built'} {report.num_docs} docs at {report.path}")
        serve.start(proxy_location="Disabled")
        try:
            handle = serve.run(app_from_config(config), name=APP, route_prefix=None)
            options = FusionOptions.model_validate({"method": fusion}) if fusion else None
            systems = {"dense": ["dense"], "keyword": ["keyword"], "fused": ["dense", "keyword"]}
            runs, failed, requests = asyncio.run(_run_queries(
                RagClient.from_handle(handle), queries, systems,
                fusion=options, ignore_identical_ids=ignore_identical_ids, concurrency=concurrency,
            ))
        finally:
            if not own_cluster:  # as `ragfan serve --address`: only its own app; the cluster's others stay
                serve.delete(APP)
    finally:
        if own_cluster:
            serve.shutdown()
        if connected:
            ray.shutdown()  # on a joined cluster: only this driver disconnects
    return {
        "dataset": str(dataset),
        "split": split,
        "num_queries": len(queries),
        "metrics": {system: measure(runs[system], qrels) for system in systems},
        "fusion": {"method": fusion or config.fusion.method, "k": config.fusion.k,
                   "weights": {r.name: r.weight for r in config.retrievers}},
        "failed_queries": {system: len(f) for system, f in failed.items()},
        "requests": requests,  # batch searches sent, BATCH queries at most each
        "failures": {system: dict(list(f.items())[:10]) for system, f in failed.items() if f},
        "ignore_identical_ids": ignore_identical_ids,
        "seconds": round(time.perf_counter() - started, 1),
    }


# The app's own small deployments, besides the gateway and the retrievers: the version hub and the
# stats hub (serve_app/app.py), 0.05 CPU each.
HUBS_CPUS = 0.1


def _check_free_cpus(config: Any, where: str, free: dict[str, float]) -> None:
    """Raise RagError at once when a joined cluster lacks the CPUs the eval app's replicas ask for:
    Serve would wait for them forever, with no word."""
    deployments = [config.gateway, *config.retrievers]
    needed = round(sum(d.ray_actor_options.num_cpus * d.most_replicas for d in deployments) + HUBS_CPUS, 2)
    available = round(free.get("CPU", 0.0), 2)
    if available < needed:
        raise RagError(f"{where} has {available:g} CPUs free, and ragfan eval's app needs {needed:g} (its gateway "
                       "and one dense and one keyword replica); running apps hold the rest. Stop one (`make serve`, "
                       "`ragfan serve`), add a node, or run `ragfan eval` without --address to start a cluster "
                       "of its own")


def format_table(report: dict[str, Any]) -> str:
    lines = [f"{report['dataset']} ({report['split']}, {report['num_queries']} queries, "
             f"fusion {report['fusion']['method']}, {report['seconds']} s)",
             f"{'system':<10}" + "".join(f"{m:>10}" for m in MEASURES) + f"{'failed':>8}"]
    for system, values in report["metrics"].items():
        lines.append(f"{system:<10}" + "".join(f"{values[m]:>10.4f}" for m in MEASURES)
                     + f"{report['failed_queries'][system]:>8}")
    return "\n".join(lines)
