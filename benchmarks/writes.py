"""Live writes under search load: throughput, visibility, what search pays, and that nothing is lost.

    .venv/bin/python -m benchmarks.writes --output docs/data/writes-load.json          # the load run
    .venv/bin/python -m benchmarks.writes --quality --output docs/data/writes-quality.json

The load run serves the embedded default (five retrievers; writes go to corpus, keyword, persona and
domain) with its writes directory in a temporary directory, on a local cluster, and:

1. searches with 8 closed-loop HTTP clients (`cache: false`: every search reaches the retrievers)
   for `--baseline` seconds, with no writes;
2. goes on searching while a writer sends 20 writes a second, open-loop, for `--duration` seconds:
   short documents (a made-up word and a sentence), of which 80% new ids, 10% a new text for an
   earlier id, 10% a delete of an earlier id; every tenth with `wait: true`. Every 20 ms a poller
   reads from the hub the last record each live replica of each writer has applied: a write is
   visible everywhere at the first poll where all of them have it, and its visibility latency runs
   from its acknowledgement to then;
3. then sends SciFact abstracts as fast as the app takes them (8 per request, 2 requests in flight)
   for `--abstracts` seconds, still under search load, and measures the encoder's own rate on the
   same abstracts beforehand;
4. stops the load and checks every acknowledged id (present with its last text, or absent if
   deleted: a search for its text must find it first, or not at all), then after each of: a killed
   corpus replica, a killed gateway replica, a killed hub (the write-ordering component), and a
   full stop and restart of the app.

The quality run (`--quality`) serves SciFact with dense and BM25, from artifacts: once built from
the whole corpus, and once from 90% of it with the other 10% upserted after start. Fused nDCG@10
over the test queries, for both, and again after the upserted app merged its writes. Both builds
share the same vectors: the 90% build is an incremental ingest of a copy of the whole one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from benchmarks.bench import machine, percentile, versions
from benchmarks.soak import QUERIES, _free_port

SEARCH_CLIENTS = 8
SCIFACT = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "scifact"
WRITERS = ["corpus", "keyword", "persona", "domain"]
SENTENCES = [
    "It binds a receptor on T cells and lowers inflammation in mice.",
    "Its expression rises in tumours that resist chemotherapy.",
    "A trial of 300 adults found no effect on blood pressure.",
    "Knocking it out shortens the lifespan of yeast cells.",
    "It is cleaved by a protease in the liver after meals.",
    "Levels in plasma predict heart failure within five years.",
]


def summary(values: list[float]) -> dict[str, Any]:
    return {"n": len(values), "p50_ms": round(percentile(values, 50), 1) if values else None,
            "p99_ms": round(percentile(values, 99), 1) if values else None}


class Load:
    """The search clients: each search's start, latency and status."""

    def __init__(self, url: str) -> None:
        self.url, self.rows, self.stop = url, [], asyncio.Event()

    async def client(self, i: int, http: httpx.AsyncClient, t0: float) -> None:
        n = i
        while not self.stop.is_set():
            n += SEARCH_CLIENTS
            started = time.perf_counter()
            try:
                r = await http.post(f"{self.url}/v1/search", json={"query": QUERIES[n % len(QUERIES)], "cache": False})
                status = r.status_code
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            self.rows.append({"t": started - t0, "ms": (time.perf_counter() - started) * 1000, "status": status})

    def window(self, start: float, end: float) -> dict[str, Any]:
        rows = [r for r in self.rows if start <= r["t"] < end]
        seconds = max(1e-9, end - start)
        return {"searches": len(rows), "qps": round(len(rows) / seconds, 1),
                "failed": sum(r["status"] != 200 for r in rows), **summary([r["ms"] for r in rows])}


class Writes:
    """What was acknowledged: each id's last text (None: deleted), by the sequence number the hub gave it,
    and each write's latencies. Writes are sent open-loop: one every 1/rate seconds, however long the
    ones before take, up to MAX_IN_FLIGHT at once."""

    MAX_IN_FLIGHT = 64

    def __init__(self, url: str) -> None:
        self.url = url
        self.state: dict[str, tuple[int, str | None]] = {}  # id -> (seq of its last acknowledged write, text)
        self.texts: dict[str, str] = {}  # each id's last text, deleted or not: what a check searches for
        self.rows: list[dict[str, Any]] = []
        self.failed: list[str] = []
        self.tasks: set[asyncio.Task] = set()

    def present(self) -> dict[str, str | None]:
        return {doc_id: text for doc_id, (_, text) in self.state.items()}

    def _acked(self, doc_id: str, seq: int, text: str | None) -> None:
        if doc_id not in self.state or self.state[doc_id][0] < seq:  # the hub's order, not the answers'
            self.state[doc_id] = (seq, text)

    async def send(self, http: httpx.AsyncClient, path: str, body: dict[str, Any], kind: str, t0: float) -> None:
        started = time.perf_counter()
        try:
            r = await http.post(f"{self.url}{path}", json=body)
        except httpx.HTTPError as exc:
            self.failed.append(f"{kind}: {type(exc).__name__}")
            return
        if r.status_code != 200:
            self.failed.append(f"{kind}: {r.status_code} {r.text[:200]}")
            return
        seq = r.json()["sequence"]
        docs = body.get("documents") or [{"id": i, "text": None} for i in body["ids"]]
        for i, d in enumerate(docs):  # a write's documents have consecutive sequence numbers, in order
            self._acked(d["id"], seq - len(docs) + 1 + i, d["text"])
            if d["text"] is not None:
                self.texts[d["id"]] = d["text"]
        self.rows.append({"t": started - t0, "kind": kind, "docs": len(docs), "wait": body.get("wait", False),
                          "ack_ms": (time.perf_counter() - started) * 1000, "seq": seq,
                          "acked_at": time.perf_counter()})

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def steady(self, http: httpx.AsyncClient, rate: float, seconds: float, t0: float) -> None:
        """`rate` writes a second of short documents: new ids, new texts for old ids, and deletes."""
        rng = random.Random(0)
        next_at, end, n = time.perf_counter(), time.perf_counter() + seconds, 0
        while time.perf_counter() < end:
            n += 1
            live = [i for i, (_, text) in self.state.items() if text is not None]
            roll, word = rng.random(), "zq" + uuid.uuid4().hex[:12]
            if len(self.tasks) >= self.MAX_IN_FLIGHT:
                self.failed.append("writer: too many writes in flight, one skipped")
            elif roll < 0.1 and live:
                self._spawn(self.send(http, "/v1/documents/delete", {"ids": [rng.choice(live)]}, "delete", t0))
            else:
                doc_id = rng.choice(live) if roll < 0.2 and live else word
                body = {"documents": [{"id": doc_id, "text": f"{word} {rng.choice(SENTENCES)}"}], "wait": n % 10 == 0}
                self._spawn(self.send(http, "/v1/documents", body, "upsert" if doc_id == word else "update", t0))
            next_at += 1 / rate
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        while self.tasks:
            await asyncio.gather(*list(self.tasks))

    async def abstracts(self, http: httpx.AsyncClient, docs: list[dict[str, str]], seconds: float, t0: float) -> float:
        """As many abstracts as the app takes in `seconds`: 8 per request, 2 requests in flight."""
        queue, end, sent = list(docs), time.perf_counter() + seconds, [0]

        async def one() -> None:
            while queue and time.perf_counter() < end:
                batch = [queue.pop() for _ in range(min(8, len(queue)))]
                before = len(self.rows)
                await self.send(http, "/v1/documents", {"documents": batch}, "abstracts", t0)
                sent[0] += len(batch) if len(self.rows) > before else 0

        started = time.perf_counter()
        await asyncio.gather(one(), one())
        return round(sent[0] / (time.perf_counter() - started), 1)


class Visibility:
    """When each write became visible everywhere: polls the hub every `every_s` for the last record each
    live replica of each writer has applied (the replicas are listed from the cluster's named actors)."""

    def __init__(self, hub: Any, every_s: float = 0.02) -> None:
        self.hub, self.every_s, self.stop = hub, every_s, asyncio.Event()
        self.visible_at: list[tuple[float, int]] = []  # (when, the last seq every live replica had applied)

    async def run(self) -> None:
        import ray

        live: set[str] = set()
        listed = 0.0
        while not self.stop.is_set():
            if time.perf_counter() - listed > 0.5:
                named = await asyncio.to_thread(ray.util.list_named_actors, all_namespaces=True)
                live = {a["name"].rsplit("#", 1)[1] for a in named if a["name"].startswith("SERVE_REPLICA::ragfan#")}
                listed = time.perf_counter()
            state = await self.hub.writes_state.remote()
            applied = [seq for d in WRITERS for member, seq in state["deployments"][d]["applied"].items()
                       if member in live]
            if applied:
                self.visible_at.append((time.perf_counter(), min(applied)))
            await asyncio.sleep(self.every_s)

    def latency_ms(self, row: dict[str, Any]) -> float | None:
        """From the write's acknowledgement to the first poll that found it applied everywhere."""
        for when, seq in self.visible_at:
            if seq >= row["seq"] and when >= row["acked_at"] - 1.0:
                return max(0.0, (when - row["acked_at"]) * 1000)
        return None


async def check(url: str, writes: Writes) -> dict[str, Any]:
    """Every acknowledged id in corpus and keyword: found first by a search for its last text, with that
    text, if present; not found by it if deleted. Returns the counts and the ids that were wrong."""
    wrong: list[str] = []
    state = writes.present()
    unanswered = 0
    async with httpx.AsyncClient(timeout=120) as http:
        for name in ("corpus", "keyword"):
            todo, tries = list(state), 0
            while todo and tries < 5:  # a search whose retriever timed out (a replica still starting) is asked again
                tries, again = tries + 1, []
                for start in range(0, len(todo), 16):  # 16 abstracts as queries stay under the 64 KiB body limit
                    part = todo[start:start + 16]
                    body = {"searches": [{"query": writes.texts[i], "retrievers": [name], "cache": False,
                                          "top_k": 10} for i in part]}
                    r = await http.post(f"{url}/v1/search/batch", json=body)
                    r.raise_for_status()
                    for doc_id, item in zip(part, r.json()["responses"], strict=True):
                        if item.get("retrievers", {}).get(name, {}).get("status") != "ok":
                            again.append(doc_id)
                            continue
                        found = {x["id"]: x.get("text") for x in item["results"]}
                        if state[doc_id] is None and doc_id in found:
                            wrong.append(f"{name}: {doc_id} deleted but found")
                        elif state[doc_id] is not None and found.get(doc_id) != state[doc_id]:
                            wrong.append(f"{name}: {doc_id} missing or stale")
                todo = again
                if todo:
                    await asyncio.sleep(2.0)
            unanswered += len(todo)
    present = sum(v is not None for v in state.values())
    return {"ids": len(state), "present": present, "deleted": len(state) - present, "lost_or_wrong": len(wrong),
            "never_answered": unanswered, "examples": wrong[:5]}


def kill_one(app: str, deployment: str) -> str:
    import ray

    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    named = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]
    ray.kill(ray.get_actor(named[0]["name"], namespace=named[0]["namespace"]), no_restart=True)
    return named[0]["name"]


async def until_ok(url: str, timeout_s: float = 180) -> float:
    """Seconds until a search and a write both answer 200 again."""
    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=30) as http:
        while time.perf_counter() - started < timeout_s:
            try:
                s = await http.post(f"{url}/v1/search", json={"query": "vitamin D", "cache": False})
                w = await http.post(f"{url}/v1/documents/delete", json={"ids": ["never-written"], "wait": True})
                if s.status_code == 200 and w.status_code == 200 and w.json()["visible"]:
                    return round(time.perf_counter() - started, 1)
            except httpx.HTTPError:
                pass
            await asyncio.sleep(1.0)
    raise TimeoutError(f"{url} did not answer within {timeout_s} s")


async def encoder_rate(encoder: Any, texts: list[str]) -> float:
    """The encoder deployment's own docs/s on these texts, in batches of 64, nothing else running."""
    await encoder.encode.remote(texts[:8])
    started = time.perf_counter()
    for start in range(0, len(texts), 64):
        await encoder.encode.remote(texts[start:start + 64])
    return round(len(texts) / (time.perf_counter() - started), 1)


def scifact_docs(limit: int | None = None, skip: set[str] | None = None) -> list[dict[str, str]]:
    from actors.data import read_documents

    docs = [{"id": d.doc_id, "text": d.text} for d in read_documents(SCIFACT / "corpus.jsonl")
            if d.doc_id not in (skip or set())]
    return docs[:limit] if limit else docs


async def load_run(args: argparse.Namespace) -> dict[str, Any]:
    import ray
    import yaml
    from ray import serve

    from serve_app.app import app_from_config, prepare_indexes, serve_env
    from serve_app.config import DEFAULT_CONFIG, parse_config

    work = Path(tempfile.mkdtemp(prefix="ragfan-writes-"))
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    raw["writes"]["dir"] = str(work / "writes")
    config = parse_config(raw, base_dir=DEFAULT_CONFIG.parent)
    port = _free_port()
    with serve_env():
        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    prepare_indexes(config, progress=True)
    serve.run(app_from_config(config, api_keys=[]), name="ragfan", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    hub = serve.get_deployment_handle("versions", "ragfan")
    demo = {json.loads(line)["_id"] for line in (DEFAULT_CONFIG.parent / "data" / "corpus.jsonl").open()}
    abstracts = scifact_docs(skip=demo)
    own_rate = await encoder_rate(serve.get_deployment_handle("encoder", "ragfan"),
                                  [d["text"] for d in abstracts[:256]])
    abstracts = abstracts[256:]
    print(f"encoder alone: {own_rate} abstracts/s")
    load, writes, visibility = Load(url), Writes(url), Visibility(hub)
    phases: dict[str, tuple[float, float]] = {}
    limits = httpx.Limits(max_connections=SEARCH_CLIENTS + 8)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http, httpx.AsyncClient(timeout=120) as writer:
        t0 = time.perf_counter()
        clients = [asyncio.ensure_future(load.client(i, http, t0)) for i in range(SEARCH_CLIENTS)]
        polling = asyncio.ensure_future(visibility.run())
        await asyncio.sleep(args.baseline)
        phases["searches alone"] = (0.0, time.perf_counter() - t0)
        start = time.perf_counter() - t0
        await writes.steady(writer, args.rate, args.duration, t0)
        phases["searches + short writes"] = (start, time.perf_counter() - t0)
        start = time.perf_counter() - t0
        abstract_rate = await writes.abstracts(writer, abstracts, args.abstracts, t0)
        phases["searches + abstracts"] = (start, time.perf_counter() - t0)
        load.stop.set()
        await asyncio.gather(*clients)
        await asyncio.sleep(5)  # the last writes become visible
        visibility.stop.set()
        await polling
    print(f"abstracts: {abstract_rate}/s")
    checks = {"after the load": await check(url, writes)}
    faults: dict[str, Any] = {}
    for label, deployment in (("a corpus replica", "corpus"), ("a gateway replica", "gateway"),
                              ("the hub (write-ordering)", "versions")):
        killed = kill_one("ragfan", deployment)
        faults[label] = {"killed": killed, "back_in_s": await until_ok(url)}
        checks[f"after killing {label}"] = await check(url, writes)
        print(label, faults[label], checks[f"after killing {label}"])
    serve.delete("ragfan")
    started = time.perf_counter()
    serve.run(app_from_config(config, api_keys=[]), name="ragfan", route_prefix="/")
    faults["a full stop and restart"] = {"back_in_s": round(time.perf_counter() - started, 1)}
    checks["after a full stop and restart"] = await check(url, writes)
    serve.shutdown()
    ray.shutdown()
    shutil.rmtree(work, ignore_errors=True)

    def rows(kind: str, start: float, end: float) -> list[dict[str, Any]]:
        return [r for r in writes.rows if r["kind"] in kind.split("|") and start <= r["t"] < end]

    steady_rows = rows("upsert|update|delete", *phases["searches + short writes"])
    abstract_rows = rows("abstracts", *phases["searches + abstracts"])
    for row in writes.rows:
        row["visible_ms"] = visibility.latency_ms(row)
    short_seconds = phases["searches + short writes"][1] - phases["searches + short writes"][0]
    return {
        "config": "embedded default, writes on; 8 search clients, cache: false",
        "searches": {name: load.window(*window) for name, window in phases.items()},
        "short_writes": {
            "writes": len(steady_rows), "docs_per_s": round(len(steady_rows) / short_seconds, 1),
            "target_per_s": args.rate,
            "ack": summary([r["ack_ms"] for r in steady_rows if not r["wait"]]),
            "visible_everywhere": summary([r["visible_ms"] for r in steady_rows if r.get("visible_ms") is not None]),
            "never_visible": sum(r.get("visible_ms") is None for r in steady_rows),
            "wait_true": summary([r["ack_ms"] for r in steady_rows if r["wait"]]),
        },
        "abstracts": {
            "docs": sum(r["docs"] for r in abstract_rows), "docs_per_s": abstract_rate,
            "encoder_alone_docs_per_s": own_rate, "ratio_to_encoder": round(abstract_rate / own_rate, 2),
            "visible_everywhere": summary([r["visible_ms"] for r in abstract_rows
                                           if r.get("visible_ms") is not None]),
        },
        "failed_writes": writes.failed,
        "faults": faults,
        "checks": checks,
        "machine": machine(),
        "versions": versions(),
    }


async def quality_run(args: argparse.Namespace) -> dict[str, Any]:
    import ray
    from ray import serve

    from actors.ingest import ingest
    from serve_app.app import app_from_config, serve_env
    from serve_app.evaluate import load_beir, measure, to_run
    from serve_app.schemas import SearchResponse

    work = Path(tempfile.mkdtemp(prefix="ragfan-writes-quality-"))
    docs = scifact_docs()
    rng = random.Random(0)
    late = set(rng.sample([d["id"] for d in docs], len(docs) // 10))
    base_source = work / "base.jsonl"
    with (SCIFACT / "corpus.jsonl").open() as src, base_source.open("w") as out:
        for line in src:
            if json.loads(line)["_id"] not in late:
                out.write(line)
    settings = {"kinds": ("dense", "keyword"), "max_words": 100_000, "progress": True}
    with serve_env():
        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    ingest(SCIFACT / "corpus.jsonl", work / "full", **settings)
    shutil.copytree(work / "full", work / "base", symlinks=True)  # the same vectors: 90% is an incremental ingest
    ingest(base_source, work / "base", **settings)
    queries, qrels = load_beir(SCIFACT, "test")

    def app(name: str, out: Path, writes: bool) -> Any:
        from serve_app.config import parse_config

        small = {"top_k": 100, "timeout_ms": 30_000, "ray_actor_options": {"num_cpus": 0.5}}
        return parse_config({
            "app_name": name, "cache": None,
            "writes": {"enabled": writes, "dir": str(work / f"{name}-writes"),
                       "merge": {"max_docs": 1_000_000, "max_age_s": 1e9}},
            "retrievers": [{"name": "dense", "kind": "dense", "artifacts": str(out / "dense"), **small},
                           {"name": "keyword", "kind": "keyword", "artifacts": str(out / "keyword"), **small}],
        }, base_dir=work)

    async def ndcg(url: str) -> dict[str, float]:
        run: dict[str, dict[str, float]] = {}
        ids = list(queries)
        async with httpx.AsyncClient(timeout=300) as http:
            for start in range(0, len(ids), 32):
                part = ids[start:start + 32]
                r = await http.post(f"{url}/v1/search/batch", json={"searches": [
                    {"query": queries[q], "top_k": 100, "cache": False} for q in part]})
                r.raise_for_status()
                for qid, item in zip(part, r.json()["responses"], strict=True):
                    run[qid] = to_run(SearchResponse.model_validate(item), qid, ignore_identical_ids=False)
        return measure(run, qrels)

    url = f"http://127.0.0.1:{port}"
    result: dict[str, Any] = {"dataset": "SciFact test", "corpus": len(docs), "upserted": len(late)}
    serve.run(app_from_config(app("full", work / "full", False), api_keys=[]), name="full", route_prefix="/full")
    result["all_at_once"] = await ndcg(f"{url}/full")
    serve.delete("full")
    print("all at once", result["all_at_once"])
    live = app("live", work / "base", True)
    serve.run(app_from_config(live, api_keys=[]), name="live", route_prefix="/live")
    result["base_only_90pct"] = await ndcg(f"{url}/live")
    late_docs = [d for d in docs if d["id"] in late]
    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=600) as http:
        for start in range(0, len(late_docs), 100):
            r = await http.post(f"{url}/live/v1/documents",
                                json={"documents": late_docs[start:start + 100],
                                      "wait": start + 100 >= len(late_docs)})
            r.raise_for_status()
    result["upsert_seconds"] = round(time.perf_counter() - started, 1)
    result["upserted_in_delta"] = await ndcg(f"{url}/live")
    print("delta", result["upserted_in_delta"])
    hub = serve.get_deployment_handle("versions", "live")
    for deployment in ("dense", "keyword"):
        await hub.merge.remote(deployment)
    result["after_merge"] = await ndcg(f"{url}/live")
    print("merged", result["after_merge"])
    key = "nDCG@10"
    result["ndcg10_difference"] = {
        "delta_minus_all_at_once": round(result["upserted_in_delta"][key] - result["all_at_once"][key], 4),
        "merged_minus_all_at_once": round(result["after_merge"][key] - result["all_at_once"][key], 4),
    }
    serve.shutdown()
    ray.shutdown()
    shutil.rmtree(work, ignore_errors=True)
    return {**result, "machine": machine(), "versions": versions()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quality", action="store_true", help="the SciFact 90%% + 10%% upserted quality run")
    parser.add_argument("--baseline", type=float, default=30.0, help="seconds of searches alone (default 30)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of short writes (default 60)")
    parser.add_argument("--rate", type=float, default=20.0, help="short writes a second (default 20)")
    parser.add_argument("--abstracts", type=float, default=30.0, help="seconds of abstracts (default 30)")
    parser.add_argument("--output", help="write the results as JSON here")
    args = parser.parse_args()
    os.environ.setdefault("RAGFAN_CACHE_DIR", str(Path.home() / ".cache" / "ragfan"))
    result = asyncio.run(quality_run(args) if args.quality else load_run(args))
    print(json.dumps({k: v for k, v in result.items() if k not in ("machine", "versions")}, indent=2))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
