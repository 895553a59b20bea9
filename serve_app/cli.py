"""The `ragfan` command.

- `ragfan serve`: run the service (the embedded default config unless --config).
- `ragfan query`: search a running service.
- `ragfan apply`: apply a changed config to the running app.
- `ragfan reload`: serve the version of a retriever's index that its artifacts link points to now.
- `ragfan upsert` / `ragfan delete`: write documents to the running service, or remove them.
- `ragfan ingest`: build checked index artifacts from a collection.
- `ragfan eval`: retrieval quality (nDCG@10, R@100, MRR@10) through the served fan-out.
- `ragfan bench`: latency, QPS, CPU and memory against the in-process designs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import socket
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from actors.encoder_backend import ENCODER_BACKENDS
from actors.errors import (
    Conflict,
    InvalidRequest,
    NoRetrieverAvailable,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    RagError,
    Unauthorized,
)
from serve_app.types import FUSION_METHODS

if TYPE_CHECKING:
    from serve_app.schemas import SearchResponse

DEFAULT_URL = "http://127.0.0.1:8000"
QUERY_BATCH = 64  # searches per request of `ragfan query --file`: the gateway's default max_batch_searches
WRITE_BATCH = 100  # documents per request of `ragfan upsert`


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ragfan", description="Parallel multi-retriever search on Ray Serve.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve_p = sub.add_parser("serve", help="start the service (embedded default config unless --config)")
    serve_p.add_argument("--config", help="ragfan YAML config (default: the embedded demo)")
    serve_p.add_argument("--host", default="127.0.0.1", help="HTTP host (default 127.0.0.1)")
    serve_p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    serve_p.add_argument("--address", help="join this Ray cluster (e.g. auto) instead of starting one")
    serve_p.add_argument("--ray-dashboard", action="store_true",
                         help="start Ray's dashboard too (port 8265, on --host): its Serve pages, actors and logs; "
                              "off by default, it costs memory and CPU on a small machine (docs/BENCHMARKS.md)")
    serve_p.add_argument("--metrics-port", type=int, metavar="N",
                         help="the port where this node exports Ray's metrics for Prometheus (default: Ray picks one)")

    query_p = sub.add_parser("query", help="search a running service and print the fused results")
    query_p.add_argument("text", nargs="?", help="the query (or --file)")
    query_p.add_argument("--file", help="one query per line (blank lines skipped), sent in batches of "
                         f"{QUERY_BATCH}; prints a result block per query; '-' reads stdin")
    query_p.add_argument("--top-k", type=int, default=10)
    query_p.add_argument("--retrievers", help="comma-separated names (default: all)")
    query_p.add_argument(
        "--filter", action="append", default=[], metavar="KEY=VALUE", help="metadata filter; repeatable"
    )
    query_p.add_argument("--timeout-ms", type=int, help="lower every retriever's deadline")
    query_p.add_argument("--url", default=os.environ.get("RAGFAN_URL", DEFAULT_URL), help=f"default {DEFAULT_URL}")
    query_p.add_argument("--json", action="store_true", help="print the response as JSON")
    query_p.add_argument("--api-key", default=os.environ.get("RAGFAN_API_KEY"),
                         help="sent as 'Authorization: Bearer KEY' (default: $RAGFAN_API_KEY)")

    apply_p = sub.add_parser("apply", help="apply a changed config to the running app, with no failed search, "
                             "and say what Serve restarted")
    apply_p.add_argument("--config", required=True, help="the changed ragfan YAML config")
    apply_p.add_argument("--address", default="auto", help="the Ray cluster the app runs on (default: auto)")
    apply_p.add_argument("--route-prefix", default="/", help="where the app serves HTTP (default /, as ragfan serve)")

    reload_p = sub.add_parser("reload", help="serve the version of a retriever's index that its artifacts link "
                              "points to now, on every replica, with no failed search")
    reload_p.add_argument("name", help="the retriever (see GET /v1/retrievers)")
    reload_p.add_argument("--url", default=os.environ.get("RAGFAN_URL", DEFAULT_URL), help=f"default {DEFAULT_URL}")
    reload_p.add_argument("--api-key", default=os.environ.get("RAGFAN_API_KEY"),
                          help="sent as 'Authorization: Bearer KEY' (default: $RAGFAN_API_KEY)")
    reload_p.add_argument("--address", help="reach the app through its Serve handle on this Ray cluster (e.g. "
                          "auto) instead of over HTTP at --url")
    reload_p.add_argument("--app", default="ragfan", help="the app's name, with --address (default ragfan)")
    reload_p.add_argument("--json", action="store_true", help="print the answer as JSON")

    for name, what in (("upsert", "add or replace documents, by id, in the running service: FILE is JSONL "
                        "(`_id` or `id`, `text`, optional `title` and `metadata`), or - for stdin"),
                       ("delete", "remove documents, by id, from the running service")):
        write_p = sub.add_parser(name, help=what)
        if name == "upsert":
            write_p.add_argument("file", help="the documents, one JSON object per line")
            write_p.add_argument("--batch", type=int, default=WRITE_BATCH,
                                 help=f"documents per request (default {WRITE_BATCH}; at most writes.max_documents)")
        else:
            write_p.add_argument("ids", nargs="+", help="the documents' ids")
        write_p.add_argument("--retriever", action="append", dest="retrievers", metavar="NAME",
                             help="write to this retriever (repeatable); default: every one that takes writes")
        write_p.add_argument("--wait", action="store_true",
                             help="return once every replica searches the change (read-your-writes)")
        write_p.add_argument("--url", default=os.environ.get("RAGFAN_URL", DEFAULT_URL), help=f"default {DEFAULT_URL}")
        write_p.add_argument("--api-key", default=os.environ.get("RAGFAN_API_KEY"),
                             help="the service's API key (default $RAGFAN_API_KEY)")
        write_p.add_argument("--json", action="store_true", help="print each answer as JSON")

    ingest_p = sub.add_parser("ingest", help="build checked index artifacts from a collection")
    ingest_p.add_argument("source", help="BEIR corpus.jsonl, JSONL, a directory of .txt/.md, or (graph) triples")
    ingest_p.add_argument("--out", required=True, help="output directory: one subdirectory per kind")
    ingest_p.add_argument("--kinds", default="dense,keyword", help="comma-separated: dense,keyword,graph")
    ingest_p.add_argument("--model", default="default", help="sentence-transformers model (default: bundled MiniLM)")
    ingest_p.add_argument("--index", choices=["flat", "hnsw"], default="flat", help="FAISS index type")
    ingest_p.add_argument("--text-field", default="text", help="JSONL field holding the text")
    ingest_p.add_argument("--chunk-words", type=int, default=256, help="split longer documents (default 256)")
    ingest_p.add_argument("--chunk-overlap", type=int, default=32, help="words shared by neighbouring chunks")
    ingest_p.add_argument("--triples", help="triples file (TSV or JSONL) for the graph kind")
    ingest_p.add_argument("--aliases", help="aliases JSON for the graph kind")
    ingest_p.add_argument("--address", help="Ray cluster to embed on (default: start a local one)")
    ingest_p.add_argument("--shards", type=int, default=1,
                          help="split the dense index by document into N parts, OUT/dense/shard-i-of-N (default 1)")
    ingest_p.add_argument("--full", action="store_true",
                          help="rebuild everything, embedding every chunk again (default: a changed source "
                               "embeds only its new and changed chunks)")

    eval_p = sub.add_parser("eval", help="nDCG@10 / R@100 / MRR@10 through the served fan-out: each retriever "
                            "alone and all fused")
    eval_p.add_argument("dataset", help="a BEIR dataset directory (corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv), "
                        "or a JSONL file of judged queries, {\"_id\", \"text\", \"relevant\": [doc id, ...]} a "
                        "line (serve_app/demo/data/demo_queries.jsonl)")
    eval_p.add_argument("--config", help="serve this ragfan YAML config's retrievers (default: for a BEIR directory, "
                        "a dense and a keyword retriever over its corpus; for a queries file, the embedded default)")
    eval_p.add_argument("--degrade", action="store_true",
                        help="also the fused metrics without each retriever, as if it had timed out (its hits "
                             "left out of the fusion), and each retriever's p50 latency")
    eval_p.add_argument("--split", default="test", help="the BEIR qrels split (default test)")
    eval_p.add_argument("--ignore-identical-ids", action="store_true", help="drop a hit whose id is the query's id")
    eval_p.add_argument("--fusion", choices=FUSION_METHODS, help="fusion method (default: the config's)")
    eval_p.add_argument("--output", help="write the results as JSON here")
    eval_p.add_argument("--address", help="Ray cluster to run on (default: start a local one)")
    eval_p.add_argument("--concurrency", type=int, default=16,
                        help="queries in flight, in whole batch requests of 64 and at least one (default 16: one "
                             "batch of 64 at a time)")
    eval_p.add_argument("--encoder-backend", choices=ENCODER_BACKENDS,
                        help="what runs the query encoder (encoder.backend; default: the config's, onnx)")

    bench_p = sub.add_parser("bench", help="latency / QPS / CPU / memory against the in-process designs")
    source = bench_p.add_mutually_exclusive_group(required=True)
    source.add_argument("--profile", choices=["seed", "demo"],
                        help="seed: sleeping retrievers with the old design's latencies; "
                             "demo: the embedded default's five retrievers and its demo queries")
    source.add_argument("--dataset", help="real retrievers over a BEIR dataset directory")
    bench_p.add_argument("--concurrency", default="1,8,32,64", help="closed-loop clients, comma-separated")
    bench_p.add_argument("--duration", type=float, default=10.0, help="seconds per (system, concurrency)")
    bench_p.add_argument("--output", help="write the results as JSON here")
    bench_p.add_argument("--pyspy", type=int, metavar="SECONDS",
                         help="py-spy every served process for SECONDS (at most --duration) during the c=32 "
                              "ragfan-handle run, and summarise where each spends its time (needs root)")
    bench_p.add_argument("--pyspy-output", metavar="FILE", help="write the py-spy summary (markdown) here")
    bench_p.add_argument("--encoder", choices=["gateway", "deployment", "local"], default="gateway",
                         help="where the served app encodes queries: once, in the gateway replica (gateway, the "
                              "default, as encoder.placement: gateway); once, on an encoder deployment "
                              "(deployment); or in each dense and graph retriever, with a model of its own (local)")

    args = parser.parse_args(argv)
    commands = {"serve": serve, "query": query, "reload": reload_command, "apply": apply_command,
                "upsert": write_command, "delete": write_command,
                "ingest": ingest_command, "eval": eval_command, "bench": bench_command}
    try:
        return commands[args.command](args)
    except RagError as exc:
        print(f"ragfan: error: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C before the service was up (e.g. while indexing)
        print("\nragfan: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `ragfan query ... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the flush at exit cannot fail again
        return 141


# -- serve ---------------------------------------------------------------------------------
def serve(args: argparse.Namespace) -> int:
    from serve_app.app import app_from_config, prepare_indexes, serve_env
    from serve_app.config import check_startable, load_config
    from serve_app.http import API_KEYS_ENV, load_api_keys

    config = load_config(args.config)
    for name, problem in check_startable(config).items():
        print(f"ragfan: warning: retriever {name} will not start: {problem}", file=sys.stderr)
    api_keys = load_api_keys(config.gateway.api_keys_file)
    if own_port_taken(args.host, args.port) and args.address is None:
        raise RagError(f"port {args.port} on {args.host} is in use; pick another with --port (make serve PORT=N)")
    if not config.enabled:
        print("ragfan: disabled (RAGFAN_DISABLED or enabled: false): every search answers empty, no model loads")

    import ray
    from ray import serve as ray_serve

    own_cluster = args.address is None
    if own_cluster:
        # Enough logical CPUs for every replica at its maximum, and the custom resources the config
        # asks for (a cluster config's `dense: 1`, say): on one machine, this node offers them all.
        deployments = [(config.gateway_actor_options(), config.gateway.most_replicas),
                       *[(d.ray_actor_options, d.most_replicas) for d in config.retrievers],
                       *[(config.encoder.ray_actor_options, config.encoder.most_replicas)]
                       * len(config.encoder_deployments)]
        needed = sum(options.num_cpus * replicas for options, replicas in deployments)
        custom: dict[str, float] = {}
        for options, replicas in deployments:
            for key, amount in (options.resources or {}).items():
                custom[key] = custom.get(key, 0.0) + amount * replicas
        metrics = {"_metrics_export_port": args.metrics_port} if args.metrics_port else {}
        with serve_env():
            ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(needed)), resources=custom or None,
                     include_dashboard=args.ray_dashboard, dashboard_host=args.host, **metrics)
    else:
        if args.ray_dashboard or args.metrics_port:
            raise RagError("--ray-dashboard and --metrics-port set up a cluster ragfan starts; with --address, "
                           "set them where that cluster is started (`ray start --include-dashboard true "
                           "--metrics-export-port N`)")
        ray.init(address=args.address)
    # What the index cache lacks is embedded now, on the cluster, with progress bars: replicas
    # then start from the cache, and the ones with a shared encoder never load a model.
    prepare_indexes(config)

    def _terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    # A shell starts background jobs with SIGINT ignored; Ctrl-C / kill -INT must still stop us.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    started = time.perf_counter()
    try:
        ray_serve.start(http_options={"host": args.host, "port": args.port})
        try:
            handle = ray_serve.run(app_from_config(config, api_keys), name=config.app_name, route_prefix="/")
        except RuntimeError as exc:  # a replica failed to start: Serve says which and why
            print(f"ragfan: error: the app did not start: {exc}", file=sys.stderr)
            return 1
        url = f"http://{args.host}:{args.port}"
        print(textwrap.dedent(f"""
            ragfan is ready at {url} ({len(config.retrievers)} retrievers, up in {time.perf_counter() - started:.1f} s)
              API docs:  {url}/docs
              dashboard: {url}/dashboard{"" if config.gateway.metrics else " (off: gateway.metrics is false)"}
              try:       ragfan query "vitamin D and multiple sclerosis" --url {url}
                         curl -s {url}/v1/search -H 'content-type: application/json' \\
                              -d '{{"query": "vitamin D and multiple sclerosis", "top_k": 5}}'
              Python:    from serve_app import RagClient; RagClient().search("...")
            Ctrl-C stops the app{" and the Ray cluster it started" if own_cluster else ""}.
            """), flush=True)
        if args.ray_dashboard:
            print(f"ragfan: Ray's dashboard at http://{args.host}:8265 (Serve, actors, logs)")
        if args.metrics_port:
            print(f"ragfan: Ray's metrics for Prometheus at http://{args.host}:{args.metrics_port}/metrics")
        if api_keys:
            print(f"ragfan: API keys on ({len(api_keys)} key(s)): send 'Authorization: Bearer <key>'; "
                  "/healthz is open, and /dashboard asks for a key")
        else:
            print(f"ragfan: warning: no API keys configured: anyone who can reach {url} can search "
                  f"(set {API_KEYS_ENV} or gateway.api_keys_file)", file=sys.stderr)
        _warn_unhealthy(handle)
        sys.stdout.flush()
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("\nragfan: stopping ...", flush=True)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        _stop(config.app_name, own_cluster)
        print("ragfan: stopped", flush=True)
    return 0


def _stop(app_name: str, own_cluster: bool) -> None:
    """Delete the app (its replicas stop gracefully), and end the Ray cluster if we started it.

    Not `serve.shutdown()`: it kills Serve's controller while its own call to the controller is still
    open, and Ray prints that call's failure on every stop ("Task ServeController.graceful_shutdown
    failed ... killed by `ray.kill`"). `ray.shutdown()` stops this driver listening first, and then
    ends the controller and the proxies with the cluster, so a clean stop prints no error.
    """
    import ray
    from ray import serve as ray_serve
    from ray.serve.exceptions import RayServeException

    try:
        ray_serve.delete(app_name)
    except RayServeException:  # stopped before Serve started: no app to delete
        pass
    if own_cluster:
        ray.shutdown()


def _warn_unhealthy(handle: Any) -> None:
    """Say at start which retrievers failed to load, and why: the app runs degraded without them."""
    try:
        info = handle.retrievers.remote().result(timeout_s=30)
    except Exception as exc:  # reporting must not take the service down
        print(f"ragfan: warning: could not read retriever health: {exc}", file=sys.stderr)
        return
    for r in info.retrievers:
        if info.enabled and not r.healthy:
            print(f"ragfan: warning: retriever {r.name} is unhealthy and answers are degraded without it: {r.error}",
                  file=sys.stderr)


def own_port_taken(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


# -- ingest / eval ---------------------------------------------------------------------------
def ingest_command(args: argparse.Namespace) -> int:
    from pathlib import Path

    import ray

    from actors.ingest import ingest

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    source = Path(args.source)
    triples = Path(args.triples) if args.triples else None
    if "graph" in kinds and triples is None and (kinds == ["graph"] or source.suffix.lower() == ".tsv"):
        triples = source
    if "graph" in kinds and triples is None:
        raise RagError("the graph kind needs triples: pass --triples FILE (TSV or JSONL)")
    joined = not ray.is_initialized()  # a Ray this command starts or joins is its own to shut down, not a caller's
    if args.address:
        ray.init(address=args.address, log_to_driver=False)
    try:
        reports = ingest(
            source,
            Path(args.out),
            kinds=kinds,
            model=args.model,
            index_type=args.index,
            text_field=args.text_field,
            max_words=args.chunk_words,
            overlap=args.chunk_overlap,
            triples=triples,
            aliases=Path(args.aliases) if args.aliases else None,
            shards=args.shards,
            full=args.full,
        )
    except ValueError as exc:
        raise RagError(str(exc)) from None
    finally:
        if joined and ray.is_initialized():
            ray.shutdown()
    # docs: the chunks in the index; added .. reused: chunks against the version before; embedded: by this run
    print(f"{'kind':<8} {'status':<11} {'docs':>8} {'added':>7} {'changed':>7} {'removed':>7} {'reused':>8} "
          f"{'embedded':>8} {'seconds':>8} {'docs/s':>8}  path")
    for r in reports:
        rate = f"{r.docs_per_s:.1f}" if r.docs_per_s else "-"
        c = r.chunks
        print(f"{r.kind:<8} {r.mode:<11} {r.num_docs:>8} {c.added:>7} {c.changed:>7} {c.removed:>7} {c.reused:>8} "
              f"{r.embedded:>8} {r.seconds:>8.1f} {rate:>8}  {r.path}")
    for r in reports:
        if r.note:
            print(f"{r.kind} at {r.path}: full rebuild: {r.note}")
    return 0


def eval_command(args: argparse.Namespace) -> int:
    from serve_app.evaluate import evaluate, format_table

    report = evaluate(
        args.dataset,
        split=args.split,
        config=args.config,
        degrade=args.degrade,
        ignore_identical_ids=args.ignore_identical_ids,
        fusion=args.fusion,
        address=args.address,
        concurrency=args.concurrency,
        encoder_backend=args.encoder_backend,
    )
    print(format_table(report))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=2)
        print(f"wrote {args.output}")
    return 0


def bench_command(args: argparse.Namespace) -> int:
    from benchmarks.bench import main as bench_main

    return bench_main(args.profile, args.dataset, args.concurrency, args.duration, args.output,
                      pyspy=args.pyspy, pyspy_output=args.pyspy_output, encoder=args.encoder)


# -- query ---------------------------------------------------------------------------------
def query(args: argparse.Namespace) -> int:
    import httpx

    from serve_app.client import RagClient

    filters: dict[str, Any] = {}
    for item in args.filter:
        key, sep, value = item.partition("=")
        if not sep or not key:
            print(f"ragfan: error: --filter expects KEY=VALUE, got {item!r}", file=sys.stderr)
            return 2
        filters[key] = value
    retrievers = [r.strip() for r in args.retrievers.split(",") if r.strip()] if args.retrievers else None
    if (args.text is None) == (args.file is None):
        print("ragfan: error: give a query, or --file with one query per line (not both)", file=sys.stderr)
        return 2
    options = {"top_k": args.top_k, "retrievers": retrievers, "filters": filters or None, "timeout_ms": args.timeout_ms}
    try:
        with RagClient(url=args.url, api_key=args.api_key) as client:
            if args.file is not None:
                return _query_file(client, _read_queries(args.file), options, args)
            response = client.search(args.text, **options)
    except Unauthorized:
        return _needs_key()
    except httpx.TransportError as exc:
        return _unreachable(args.url, exc)
    except RagError as exc:
        return _report(exc, args.url)
    print(response.model_dump_json(indent=2) if args.json else format_response(response))
    return 0


def apply_command(args: argparse.Namespace) -> int:
    from serve_app.apply import apply
    from serve_app.config import check_startable, load_config
    from serve_app.http import load_api_keys

    config = load_config(args.config)
    for name, problem in check_startable(config).items():
        print(f"ragfan: warning: retriever {name} will not start: {problem}", file=sys.stderr)
    api_keys = load_api_keys(config.gateway.api_keys_file)
    import ray

    try:
        ray.init(address=args.address, log_to_driver=False)
    except ConnectionError as exc:
        raise RagError(f"no Ray cluster at {args.address} ({exc}); start the app first with `ragfan serve`") from None
    try:
        applied = apply(config, api_keys=api_keys, route_prefix=args.route_prefix)
    except RuntimeError as exc:  # a replica failed to start: Serve says which and why
        print(f"ragfan: error: the changed config did not start: {exc}", file=sys.stderr)
        return 1
    print(f"ragfan: applied {args.config} to app {config.app_name} in {applied.seconds:.1f} s:")
    print("\n".join(applied.lines()))
    return 0


def _needs_key() -> int:
    print("ragfan: error: the service needs an API key: pass --api-key or set RAGFAN_API_KEY", file=sys.stderr)
    return 2


def _unreachable(url: str, exc: Exception) -> int:
    print(f"ragfan: error: cannot reach ragfan at {url} ({exc}). Is `make serve` running?", file=sys.stderr)
    return 1


def reload_command(args: argparse.Namespace) -> int:
    import httpx

    from serve_app.client import RagClient

    where = f"Ray cluster {args.address}, app {args.app}" if args.address else args.url
    try:
        client = RagClient(args.app, address=args.address) if args.address else RagClient(url=args.url,
                                                                                           api_key=args.api_key)
        with client:
            answer = client.reload(args.name)
    except Unauthorized:
        return _needs_key()
    except httpx.TransportError as exc:
        return _unreachable(args.url, exc)
    except RagError as exc:
        print(f"ragfan: error: {exc.message}", file=sys.stderr)
        return 2 if isinstance(exc, Conflict | NotFound) else 1
    except Exception as exc:  # the Ray cluster or the app is not there (--address)
        print(f"ragfan: error: cannot reach ragfan through {where}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(answer.model_dump_json(indent=2))
        return 0
    same = " (unchanged)" if answer.version == answer.version_before else f" (was {answer.version_before})"
    print(f"{answer.name}: version {answer.version}{same}, served by {len(answer.replicas)} "
          f"replica{'s' if len(answer.replicas) != 1 else ''}, in {answer.seconds:.2f} s")
    return 0


def write_command(args: argparse.Namespace) -> int:
    """`ragfan upsert FILE` and `ragfan delete ID...` over HTTP, in batches, with a progress bar."""
    import httpx
    from tqdm.auto import tqdm

    from actors.data import read_documents
    from serve_app.client import RagClient

    if args.command == "upsert":
        if args.batch < 1:
            raise RagError(f"--batch must be at least 1, got {args.batch}")
        path = "/dev/stdin" if args.file == "-" else args.file
        if not Path(path).exists():
            raise RagError(f"{args.file}: no such file")
        items: list[Any] = [{"id": d.doc_id, "text": d.text, "metadata": dict(d.metadata)}
                            for d in read_documents(path)]
        size = args.batch
    else:
        items, size = list(args.ids), WRITE_BATCH
    done, last = 0, None
    try:
        with RagClient(url=args.url, api_key=args.api_key) as client, \
                tqdm(total=len(items), unit="doc", desc=args.command, disable=len(items) <= size or args.json) as bar:
            for start in range(0, len(items), size):
                part = items[start:start + size]
                last = (client.upsert(part, retrievers=args.retrievers, wait=args.wait) if args.command == "upsert"
                        else client.delete(part, retrievers=args.retrievers, wait=args.wait))
                done += last.accepted
                bar.update(len(part))
                if args.json:
                    print(last.model_dump_json())
    except Unauthorized:
        return _needs_key()
    except httpx.TransportError as exc:
        return _unreachable(args.url, exc)
    except RagError as exc:
        applied = f" ({done} already written)" if done else ""
        print(f"ragfan: error: {exc.message}{applied}", file=sys.stderr)
        return 2 if isinstance(exc, InvalidRequest | Conflict | PayloadTooLarge) else 1
    if not args.json and last is not None:
        seen = "visible on every replica" if last.visible else "visible within seconds"
        verb = "upserted" if args.command == "upsert" else "deleted"
        print(f"{verb} {done} document{'s' if done != 1 else ''} in {', '.join(last.retrievers)}: durable up to "
              f"sequence {last.sequence}, {seen}")
    return 0


def _read_queries(path: str) -> list[str]:
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise RagError(f"--file {path}: cannot read it: {exc.strerror}") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def _query_file(client: Any, queries: list[str], options: dict[str, Any], args: argparse.Namespace) -> int:
    """One result block per query, asked QUERY_BATCH at a time; non-zero when any one failed."""
    code = 0
    for start in range(0, len(queries), QUERY_BATCH):
        chunk = queries[start:start + QUERY_BATCH]
        for n, (text, result) in enumerate(zip(chunk, client.search_batch(chunk, **options), strict=True), start + 1):
            print(f"== {n}. {text}")
            if isinstance(result, RagError):
                code = max(code, _report(result, args.url, to=sys.stdout))
            else:
                print(result.model_dump_json(indent=2) if args.json else format_response(result))
            print()
    return code


def _report(exc: RagError, url: str, to: Any = None) -> int:
    """Say what went wrong with a search; the exit code: 2 for the caller's mistake, else 1."""
    out = to or sys.stderr
    if isinstance(exc, InvalidRequest):
        for err in exc.errors:
            field = ".".join(str(p) for p in err.get("loc", [])[1:]) or "body"
            print(f"ragfan: invalid request: {field}: {err.get('msg')}", file=out)
        return 2
    if isinstance(exc, NoRetrieverAvailable):
        print(f"ragfan: unavailable: {exc.message}", file=out)
        for name, reason in exc.reasons.items():
            print(f"  {name}: {reason.get('status')}: {reason.get('error')}", file=out)
        return 1
    if isinstance(exc, Overloaded):
        print(f"ragfan: error: ragfan at {url} is overloaded: retry after {exc.retry_after_s} s", file=out)
        return 1
    print(f"ragfan: error: {exc.message}", file=out)  # the service failed (a 5xx that persisted)
    return 1


def format_response(r: SearchResponse, width: int | None = None) -> str:
    width = width or shutil.get_terminal_size((100, 24)).columns
    lines = [f"{'#':>2}  {'score':>7}  {'id':<22} {'found by (retriever#rank)':<34} text"]
    for i, res in enumerate(r.results, start=1):
        found = " ".join(f"{s.retriever}#{s.rank}" for s in res.sources)
        text = " ".join((res.text or "").split())
        room = max(20, width - 70)
        lines.append(f"{i:>2}  {res.score:7.4f}  {res.id[:22]:<22} {found[:34]:<34} {text[:room]}")
    if not r.results:
        lines.append("    (no results)")
    lines.append("")
    lines.append(f"{'retriever':<12} {'status':<8} {'latency':>10} {'hits':>5}  {'cache':<7} error")
    for name, s in r.retrievers.items():
        latency = f"{s.latency_ms:.1f} ms" if s.latency_ms is not None else "-"
        lines.append(f"{name:<12} {s.status:<8} {latency:>10} {s.num_hits:>5}  {s.cache or '-':<7} {s.error or ''}")
    lines.append(f"\ndegraded: {'yes' if r.degraded else 'no'}   total: {r.latency_ms:.1f} ms")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
