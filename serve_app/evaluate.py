"""`ragfan eval`: retrieval quality measured through the served fan-out.

What is judged (DATASET):
- a BEIR directory (corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv): the split's judged queries; or
- a JSONL file of judged queries, `{"_id", "text", "relevant": [doc id, ...]}` per line (the format
  of the demo's `demo_queries.jsonl`); `relevant` may also map doc ids to grades.

What answers them: without `--config`, a BEIR corpus is ingested (or the cached artifacts reused)
into a `dense` and a `keyword` retriever; with `--config`, that config's retrievers, as given, but
under the app name `ragfan-eval`, with writes off and deadlines of at least 120 s (quality is
measured here, not whether a retriever makes its deadline under a 64-query batch). A judged-queries
file is judged against a config's retrievers: `--config`, or the embedded default, as `ragfan serve`.

`encoder_backend` (`--encoder-backend torch|onnx`) sets `encoder.backend` of the served app, to
compare what runs the query encoder; the documents' vectors are the ingested ones, embedded by
torch, either way.

A local app with the real gateway starts (or one on `--address`), and every query goes through the
same DeploymentHandle path a client uses: once to each retriever alone and once to all of them,
fused. The queries go as batch searches (`search_batch`), 64 to a request per system, so that each
retriever gets one call per batch instead of one per query.
The metrics come from ir-measures: nDCG@10 (grades as gains), R@100 and RR@10 (MRR@10), where a
judgment of 1 or more is relevant and 0 is not.

`degrade=True` (`--degrade`) adds, for each retriever R, `fused-without-R`: the fused metrics as if R
had timed out on every query. Those rankings are not asked of the app again: each retriever's own
hits (from its run alone, with its raw scores) are fused again without R's, by `serve_app.fusion.fuse`
with the app's method, weights and k, as the gateway fuses the retrievers that answered. It also
adds each retriever's p50 latency, as the responses report it, over the searches it ran (answers
from the result cache left out).

Hits of chunked documents are grouped back to their document (best rank wins), and a graph fact
to the document it quotes (`source_id`). A query that the service rejects or fails is scored as a
miss (an empty ranking) and counted in `failed_queries`.
"""

from __future__ import annotations

import asyncio
import csv
import json
import os
import statistics
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from actors.encoder_backend import ENCODER_BACKENDS
from actors.errors import RagError
from actors.index import default_cache_dir
from actors.sources import PARENT
from actors.types import Hit
from serve_app.schemas import FusionOptions, SearchResponse

if TYPE_CHECKING:
    from serve_app.config import AppConfig

MEASURES = ("nDCG@10", "R@100", "RR@10")
DEPTH = 100
APP = "ragfan-eval"
BATCH = 64  # searches per batch request: the gateway's default max_batch_searches
FUSED = "fused"
WITHOUT = "fused-without-"  # + a retriever's name: the fused metrics as if it had timed out
TIMEOUT_MS = 120_000  # the least deadline a retriever gets in an eval
# Where a hit names the document it belongs to: a chunk its parent, a graph fact the abstract it quotes.
DOC_KEYS = (PARENT, "source_id")

Qrels = dict[str, dict[str, int]]  # {query id: {doc id: grade}}
Run = dict[str, dict[str, float]]  # {query id: {doc id: score}}, a higher score ranks first


def load_beir(dataset: Path, split: str) -> tuple[dict[str, str], Qrels]:
    """Queries that have judgments in the split, and the judgments: {query id: {doc id: relevance}}."""
    qrels_path = dataset / "qrels" / f"{split}.tsv"
    for path in (dataset / "corpus.jsonl", dataset / "queries.jsonl", qrels_path):
        if not path.is_file():
            raise RagError(f"{path}: not found; a BEIR dataset has corpus.jsonl, queries.jsonl and qrels/{split}.tsv")
    qrels: Qrels = {}
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
    return _judged(queries, qrels)


def load_judged_queries(path: Path) -> tuple[dict[str, str], Qrels]:
    """Queries and judgments from JSONL lines `{"_id" (or "id"), "text", "relevant"}`, where `relevant`
    is a list of doc ids (grade 1 each) or a mapping of doc ids to grades; lines without it are skipped."""
    queries: dict[str, str] = {}
    qrels: Qrels = {}
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            q = json.loads(line)
            qid, relevant = str(q.get("_id", q.get("id", ""))), q.get("relevant")
            if not qid or not isinstance(q.get("text"), str) or not isinstance(relevant, list | dict):
                if relevant is None and qid:
                    continue  # not judged
                raise RagError(f"{path}:{n}: a judged query is {{\"_id\", \"text\", \"relevant\": [doc id, ...]}}")
            qrels[qid] = {str(d): 1 for d in relevant} if isinstance(relevant, list) else \
                {str(d): int(g) for d, g in relevant.items()}
            queries[qid] = q["text"]
    return _judged(queries, qrels)


def _judged(queries: dict[str, str], qrels: Qrels) -> tuple[dict[str, str], Qrels]:
    """Only the queries with a relevant document (grade >= 1): one with none has nothing to find, and
    would count as a miss for every system alike."""
    qrels = {q: docs for q, docs in qrels.items() if any(g >= 1 for g in docs.values())}
    if not qrels:
        raise RagError("no query has a relevant document (a judgment of 1 or more): nothing to measure")
    return {q: t for q, t in queries.items() if q in qrels}, qrels


def document_of(doc_id: str, metadata: Mapping[str, str] | None) -> str:
    """The document a hit belongs to: a chunk's parent, a graph fact's source, or the hit itself."""
    metadata = metadata or {}
    return next((metadata[k] for k in DOC_KEYS if metadata.get(k)), doc_id)


def ranking(hits: Iterable[tuple[str, Mapping[str, str] | None]], qid: str,
            ignore_identical_ids: bool) -> dict[str, float]:
    """One ranking by document from (hit id, metadata) best first: hits grouped to their document, best
    rank first, as descending scores (ir-measures sorts by score)."""
    ranked: dict[str, float] = {}
    for hit_id, metadata in hits:
        doc_id = document_of(hit_id, metadata)
        if doc_id in ranked or (ignore_identical_ids and doc_id == qid):
            continue
        ranked[doc_id] = float(-len(ranked))
    return ranked


def to_run(response: SearchResponse, qid: str, ignore_identical_ids: bool) -> dict[str, float]:
    """One response's ranking by document."""
    return ranking(((r.id, r.metadata) for r in response.results), qid, ignore_identical_ids)


def measure(run: Run, qrels: Qrels) -> dict[str, float]:
    """Mean nDCG@10, R@100 and RR@10 over every judged query. The grades are nDCG's gains (as BEIR's
    pytrec_eval); R@100 and RR@10 count a grade of 1 or more as relevant."""
    import ir_measures

    measures = [ir_measures.parse_measure(m) for m in MEASURES]
    totals = dict.fromkeys(measures, 0.0)
    # Per query, then averaged over every judged query: a query with no hits scores 0 on each
    # measure (aggregates over only the queries present in the run would leave misses out).
    for value in ir_measures.iter_calc(measures, qrels, {q: d for q, d in run.items() if d}):
        if value.query_id in qrels:
            totals[value.measure] += float(value.value)
    return {str(m): round(total / len(qrels), 4) for m, total in totals.items()}


@dataclass(slots=True)
class Collected:
    """What one eval's searches gave, per system (a name and the retrievers it asks)."""

    runs: dict[str, Run]
    failed: dict[str, dict[str, str]]  # system -> query id -> why it was a miss or degraded
    requests: int  # batch searches sent
    # retriever -> query id -> its own hits, best first, with its raw scores (from its run alone)
    hits: dict[str, dict[str, list[Hit]]] = field(default_factory=dict)
    # retriever -> the latency it reported for each search it ran (result-cache hits left out)
    latency_ms: dict[str, list[float]] = field(default_factory=dict)


def _own_hits(response: SearchResponse, name: str) -> list[Hit]:
    """A lone retriever's hits as it returned them: each result's score and rank from that retriever."""
    mine = [(s.rank, Hit(r.id, s.score, "", r.metadata or {})) for r in response.results
            for s in r.sources if s.retriever == name]
    return [hit for _, hit in sorted(mine, key=lambda pair: pair[0])]


async def _run_queries(client, queries, systems, *, fusion, ignore_identical_ids, concurrency,
                       top_k: int = DEPTH, batch: int = BATCH) -> Collected:
    """Each system's ranking per query, and its failures. The queries go `batch` to a request, and
    `concurrency // batch` requests are in flight at once, at least one: 16 (the default) sends
    one batch at a time. A system of one retriever also keeps that retriever's own hits."""
    got = Collected({name: {} for name in systems}, {name: {} for name in systems}, 0)
    gate = asyncio.Semaphore(max(1, concurrency // batch))
    ids = list(queries)
    batches = [ids[i:i + batch] for i in range(0, len(ids), batch)]

    async def one(system: str, retrievers: list[str], qids: list[str], bar) -> None:
        async with gate:
            try:
                answers = await client.search_batch_async([queries[q] for q in qids], top_k=top_k,
                                                          retrievers=retrievers, fusion=fusion)
            except Exception as exc:  # the whole batch was refused: each of its queries is a miss
                answers = [exc] * len(qids)
        for qid, answer in zip(qids, answers, strict=True):
            if isinstance(answer, Exception):  # a rejected query is a miss, and reported
                got.runs[system][qid] = {}
                got.failed[system][qid] = f"{type(answer).__name__}: {answer}"[:200]
                continue
            got.runs[system][qid] = to_run(answer, qid, ignore_identical_ids)
            if answer.degraded:
                got.failed[system][qid] = "degraded: " + ", ".join(
                    f"{n}={s.status}" for n, s in answer.retrievers.items() if s.status not in ("ok", "skipped")
                )
            for name, status in answer.retrievers.items():
                if status.status == "ok" and status.cache != "hit" and status.latency_ms is not None:
                    got.latency_ms.setdefault(name, []).append(status.latency_ms)
            if len(retrievers) == 1 and answer.retrievers.get(retrievers[0]) is not None \
                    and answer.retrievers[retrievers[0]].status == "ok":
                got.hits.setdefault(retrievers[0], {})[qid] = _own_hits(answer, retrievers[0])
        bar.update(len(qids))

    with tqdm(total=len(queries) * len(systems), desc="queries", unit="q") as bar:
        await asyncio.gather(*(
            one(system, retrievers, qids, bar) for qids in batches for system, retrievers in systems.items()
        ))
    got.requests = len(batches) * len(systems)
    return got


def refuse(hits: Mapping[str, Sequence[Hit]], qid: str, *, method: Any, weights: Mapping[str, float], k: int,
           top_k: int, ignore_identical_ids: bool) -> dict[str, float]:
    """The ranking the gateway would answer with only these retrievers' hits: fused as it fuses the
    retrievers that answered, then grouped by document. None at all: the gateway's 503, a miss."""
    from serve_app.fusion import fuse

    if not hits:
        return {}
    fused = fuse(hits, method=method, weights=weights, k=k, top_k=top_k)
    return ranking(((h.doc_id, h.metadata) for h in fused), qid, ignore_identical_ids)


def without_each(collected: Collected, names: Sequence[str], queries: Iterable[str], qrels: Qrels, *,
                 method: Any, weights: Mapping[str, float], k: int, top_k: int = DEPTH,
                 ignore_identical_ids: bool = False) -> tuple[dict[str, dict[str, float]], int]:
    """`fused-without-R` for each retriever R: its metrics, from each query's hits of the other
    retrievers (those that answered it) fused again. Also how many queries' rankings re-fused from
    every retriever differ from the served fused ones: 0 unless this re-fusion drifts from the gateway's."""
    queries = list(queries)

    def without(left_out: str | None) -> Run:
        return {qid: refuse({n: collected.hits[n][qid] for n in names
                             if n != left_out and qid in collected.hits.get(n, {})}, qid, method=method,
                            weights=weights, k=k, top_k=top_k, ignore_identical_ids=ignore_identical_ids)
                for qid in queries}

    metrics = {f"{WITHOUT}{name}": measure(without(name), qrels) for name in names}
    served = collected.runs.get(FUSED, {})
    differ = sum(list(ranked) != list(served.get(qid, {})) for qid, ranked in without(None).items())
    return metrics, differ


def p50(latencies: Mapping[str, Sequence[float]], names: Sequence[str]) -> dict[str, float | None]:
    """Each retriever's median latency in ms; None for one that ran no search."""
    return {n: round(statistics.median(latencies[n]), 1) if latencies.get(n) else None for n in names}


def eval_config(path: str | Path | None) -> AppConfig:
    """A ragfan config as eval serves it (None: the embedded default): as given, but as an app of its
    own (`ragfan-eval`), with no writes (an eval only reads) and deadlines of at least TIMEOUT_MS."""
    from serve_app.config import WritesConfig, check_files, load_config

    config = load_config(path)
    check_files(config)
    if FUSED in config.names:
        raise RagError(f"a retriever named {FUSED!r} would hide the fused system in the report; rename it")
    config.app_name = APP
    config.writes = WritesConfig()
    config.retrievers = [r.model_copy(update={"timeout_ms": max(r.timeout_ms, TIMEOUT_MS)}) for r in config.retrievers]
    return config


def dataset_config(artifacts: Path) -> AppConfig:
    """The app for a BEIR corpus alone: a `dense` and a `keyword` retriever over its artifacts."""
    from serve_app.config import parse_config

    return parse_config(
        {
            "app_name": APP,
            "gateway": {"ray_actor_options": {"num_cpus": 0.25}, "max_ongoing_requests": 1000},
            "retrievers": [
                {
                    "name": kind,
                    "kind": kind,
                    "artifacts": str(artifacts / kind),
                    "top_k": DEPTH,
                    "timeout_ms": TIMEOUT_MS,
                    "max_ongoing_requests": 64,
                    "batch": {"max_batch_size": 32, "batch_wait_timeout_s": 0.005},
                    "ray_actor_options": {"num_cpus": 0.5},
                }
                for kind in ("dense", "keyword")
            ],
        },
        base_dir=Path("."),
    )


def evaluate(
    dataset: str | Path,
    *,
    split: str = "test",
    config: str | Path | None = None,
    degrade: bool = False,
    ignore_identical_ids: bool = False,
    fusion: str | None = None,
    address: str | None = None,
    concurrency: int = 16,
    encoder_backend: str | None = None,
) -> dict[str, Any]:
    """Measure `dataset` (a BEIR directory, or a JSONL file of judged queries) through the served app:
    `config`'s retrievers, or without one a `dense` and a `keyword` retriever over a BEIR corpus (a
    judged-queries file: the embedded default). See the module docstring."""
    import ray
    from ray import serve

    from actors.ingest import ingest
    from serve_app.app import app_from_config
    from serve_app.client import RagClient

    started = time.perf_counter()
    dataset = Path(dataset)
    artifacts: Path | None = None
    if dataset.is_file():
        queries, qrels = load_judged_queries(dataset)
        served = eval_config(config)
    elif dataset.is_dir():
        queries, qrels = load_beir(dataset, split)
        if config is None:
            artifacts = default_cache_dir() / "datasets" / dataset.resolve().name
            served = dataset_config(artifacts)
        else:
            served = eval_config(config)
    else:
        raise RagError(f"{dataset}: not found; give a BEIR dataset directory (corpus.jsonl, queries.jsonl, "
                       "qrels/SPLIT.tsv) or a JSONL file of judged queries ({\"_id\", \"text\", \"relevant\"})")
    if encoder_backend is not None:
        # Validated as the config is: the gateway validates it again in its replica.
        if encoder_backend not in ENCODER_BACKENDS:
            raise RagError(f"unknown encoder backend {encoder_backend!r}; valid: {', '.join(ENCODER_BACKENDS)}")
        served.encoder = served.encoder.model_copy(update={"backend": encoder_backend})
    names = served.names
    systems = {**{n: [n] for n in names}, FUSED: names}
    # Every retriever's whole list reaches fusion (a lane asks for the larger of its top_k and the
    # request's), and its run alone keeps all of it, so that re-fusing those lists is exact.
    top_k = max(DEPTH, *(r.top_k for r in served.retrievers))
    connected = not ray.is_initialized()  # a Ray this run starts or joins; not a caller's
    own_cluster = connected and not address  # started here, so its CPUs are all ours
    if connected:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            from serve_app.app import serve_env

            with serve_env():
                ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    try:
        if not own_cluster:
            _check_free_cpus(served, address or "this Ray cluster", ray.available_resources())
        if artifacts is not None:
            for built in ingest(dataset / "corpus.jsonl", artifacts, kinds=("dense", "keyword")):
                print(f"{built.kind}: {'reused' if built.reused else 'built'} {built.num_docs} docs at {built.path}")
        serve.start(proxy_location="Disabled")
        try:
            handle = serve.run(app_from_config(served), name=APP, route_prefix=None)
            options = FusionOptions.model_validate({"method": fusion}) if fusion else None
            collected = asyncio.run(_run_queries(
                RagClient.from_handle(handle), queries, systems, fusion=options,
                ignore_identical_ids=ignore_identical_ids, concurrency=concurrency, top_k=top_k,
                batch=min(BATCH, served.gateway.max_batch_searches),
            ))
        finally:
            serve.delete(APP)  # only its own app: a joined cluster's others stay
    finally:
        if connected:
            # Ends a cluster this run started, Serve with it; on a joined cluster, only this driver
            # disconnects. Not serve.shutdown(): see serve_app/cli.py's _stop.
            ray.shutdown()
    method, k = fusion or served.fusion.method, served.fusion.k
    weights = {r.name: r.weight for r in served.retrievers}
    metrics = {system: measure(collected.runs[system], qrels) for system in systems}
    failed = {system: len(f) for system, f in collected.failed.items()}
    report: dict[str, Any] = {
        "dataset": str(dataset),
        "split": split if dataset.is_dir() else None,
        "config": None if artifacts is not None else str(config or "the embedded default"),
        "num_queries": len(queries),
        "encoder_backend": served.encoder.backend,
        "metrics": metrics,
        "fusion": {"method": method, "k": k, "weights": weights},
    }
    if degrade:
        lost, differ = without_each(collected, names, queries, qrels, method=method, weights=weights, k=k,
                                    top_k=top_k, ignore_identical_ids=ignore_identical_ids)
        metrics.update(lost)
        for name in names:  # a query that another retriever failed is degraded without this one too
            failed[f"{WITHOUT}{name}"] = len(set().union(*(collected.failed[n] for n in names if n != name)))
        report["adds"] = {name: {m: round(metrics[FUSED][m] - lost[f"{WITHOUT}{name}"][m], 4) for m in MEASURES}
                          for name in names}
        report["latency_p50_ms"] = p50(collected.latency_ms, names)
        report["latency_searches"] = {n: len(collected.latency_ms.get(n, [])) for n in names}
        report["refused_unlike_served"] = differ  # queries; 0: the re-fusion is the gateway's
    return report | {
        "failed_queries": failed,
        "requests": collected.requests,  # batch searches sent, BATCH queries at most each
        "failures": {system: dict(list(f.items())[:10]) for system, f in collected.failed.items() if f},
        "ignore_identical_ids": ignore_identical_ids,
        "seconds": round(time.perf_counter() - started, 1),
    }


# The app's own small deployment, besides the gateway, the encoders and the retrievers: its hub of
# versions and stats (serve_app/app.py).
HUBS_CPUS = 0.05


def _check_free_cpus(config: AppConfig, where: str, free: dict[str, float]) -> None:
    """Raise RagError at once when a joined cluster lacks the CPUs the eval app's replicas ask for:
    Serve would wait for them forever, with no word."""
    needed = config.gateway_actor_options().num_cpus * config.gateway.most_replicas
    needed += len(config.encoder_deployments) * config.encoder.ray_actor_options.num_cpus * config.encoder.most_replicas
    needed += sum(r.ray_actor_options.num_cpus * r.most_replicas * r.shards for r in config.retrievers)
    needed = round(needed + HUBS_CPUS, 2)
    available = round(free.get("CPU", 0.0), 2)
    if available < needed:
        encoders = f", {len(config.encoder_deployments)} encoder" if config.encoder_deployments else \
            " with its encoder" if config.shared_models else ""
        raise RagError(f"{where} has {available:g} CPUs free, and ragfan eval's app needs {needed:g} (its gateway"
                       f"{encoders} and the replicas of {', '.join(config.names)}); running apps hold the rest. "
                       "Stop one (`make serve`, `ragfan serve`), add a node, or run `ragfan eval` without "
                       "--address to start a cluster of its own")


def format_table(report: dict[str, Any]) -> str:
    """The metrics per system; with --degrade, then what each retriever adds to the fused metrics and
    its p50 latency."""
    where = f"{report['split']}, " if report.get("split") else ""
    config = f", config {report['config']}" if report.get("config") else ""
    width = max(10, *(len(s) + 2 for s in report["metrics"]))
    lines = [f"{report['dataset']} ({where}{report['num_queries']} queries{config}, "
             f"fusion {report['fusion']['method']}, {report['seconds']} s)",
             f"{'system':<{width}}" + "".join(f"{m:>10}" for m in MEASURES) + f"{'failed':>8}"]
    for system, values in report["metrics"].items():
        lines.append(f"{system:<{width}}" + "".join(f"{values[m]:>10.4f}" for m in MEASURES)
                     + f"{report['failed_queries'][system]:>8}")
    if "adds" in report:
        lines += ["", "what each retriever adds to fused (fused minus fused-without-it), and its p50 latency",
                  f"{'retriever':<{width}}" + "".join(f"{m:>10}" for m in MEASURES) + f"{'p50 ms':>10}"]
        for name, adds in report["adds"].items():
            ms = report["latency_p50_ms"][name]
            lines.append(f"{name:<{width}}" + "".join(f"{adds[m]:>+10.4f}" for m in MEASURES)
                         + (f"{ms:>10.1f}" if ms is not None else f"{'-':>10}"))
        if report["refused_unlike_served"]:
            lines.append(f"warning: re-fused from every retriever, {report['refused_unlike_served']} queries rank "
                         "unlike the served fused answer; the fused-without figures may be off")
    return "\n".join(lines)
