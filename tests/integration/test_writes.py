"""Live writes on the real app: upserts and deletes are searched by every replica, survive killed
replicas, a killed hub, a killed gateway and a full restart, and merge into a new version.

The `writes` app serves tinybeir: `dense` (two replicas), `keyword`, `split` (dense, two shards) and
`quick` (synthetic: takes no writes), with its API key on and its writes directory in a temporary
directory. The tests run in file order; `written` holds what every acknowledged write left, and
each test checks all of it again after its fault.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from pathlib import Path

import httpx
import pytest
import ray
from ray import serve

from actors.shards import shard_of
from actors.wal import segments
from serve_app.app import app_from_config
from serve_app.config import parse_config
from tests.integration.conftest import TINYBEIR, replica_actors, synthetic, wait_until

pytestmark = pytest.mark.integration
KEY = "writes-key-0123456789"
AUTH = {"authorization": f"Bearer {KEY}"}
APP = "writes"
MERGE_DOCS = 30  # a deployment merges its delta at this many writes: only the merge test writes that many
WRITERS = ["dense", "keyword", "split"]
CHECK_CONCURRENCY = 8  # searches in flight at once while checking every write


def word() -> str:
    """A made-up word no document has: a search for it finds exactly what a test wrote."""
    return "zq" + uuid.uuid4().hex[:10]


@pytest.fixture(scope="module")
def app(cluster, tmp_path_factory):
    """(url, config, writes dir); the app is deleted at the end of the module."""
    writes_dir = tmp_path_factory.mktemp("writes")
    small = {"ray_actor_options": {"num_cpus": 0.1}, "timeout_ms": 5000, "top_k": 10}
    dense = {"kind": "dense", "data": str(TINYBEIR / "corpus.jsonl"), **small}
    config = parse_config({
        "app_name": APP,
        "cache_dir": str(tmp_path_factory.mktemp("writes-cache")),
        "gateway": {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0.1}},
        "encoder": {"ray_actor_options": {"num_cpus": 0.2}},
        "writes": {"enabled": True, "dir": str(writes_dir), "max_documents": 50,
                   "merge": {"max_docs": MERGE_DOCS, "max_age_s": 3600}},
        "retrievers": [
            {"name": "dense", "num_replicas": 2, **dense},
            {"name": "keyword", "kind": "keyword", "data": str(TINYBEIR / "corpus.jsonl"), **small},
            {"name": "split", "shards": 2, **dense},
            synthetic("quick"),
        ],
    }, base_dir=Path("."))
    from serve_app.app import prepare_indexes

    prepare_indexes(config, progress=False)
    serve.run(app_from_config(config, api_keys=[KEY]), name=APP, route_prefix=f"/{APP}")
    yield cluster_url(cluster), config, writes_dir
    serve.delete(APP)


def cluster_url(cluster: str) -> str:
    return f"{cluster}/{APP}"


@pytest.fixture(scope="module")
def written() -> dict[str, str | None]:
    """Every acknowledged write so far: id -> its last text, or None once deleted."""
    return {}


def upsert(http, url, docs, *, retrievers=None, wait=True, headers=AUTH) -> httpx.Response:
    body = {"documents": docs, "wait": wait, **({"retrievers": retrievers} if retrievers else {})}
    return http.post(f"{url}/v1/documents", json=body, headers=headers)


def delete(http, url, ids, *, retrievers=None, wait=True) -> httpx.Response:
    body = {"ids": ids, "wait": wait, **({"retrievers": retrievers} if retrievers else {})}
    return http.post(f"{url}/v1/documents/delete", json=body, headers=AUTH)


def search_body(query: str, retriever: str, *, cache: bool = False) -> dict:
    return {"query": query, "retrievers": [retriever], "cache": cache, "top_k": 10}


def answered(r: httpx.Response, retriever: str) -> list[dict]:
    """The results of a search that `retriever` answered."""
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["retrievers"][retriever]["status"] == "ok", body["retrievers"]
    return body["results"]


def hits(http, url, query: str, retriever: str, *, cache: bool = False) -> list[dict]:
    return answered(http.post(f"{url}/v1/search", json=search_body(query, retriever, cache=cache), headers=AUTH),
                    retriever)


def check_everything(http, url, written: dict[str, str | None], retrievers=WRITERS, rounds: int = 4) -> None:
    """Each acknowledged id is found with its last text by every writer, on whichever replica answers,
    or is absent if deleted. The texts hold a unique word, so the search for it is exact. The searches
    go out CHECK_CONCURRENCY at a time, each on its own, so each is routed to a replica on its own."""
    probes = [(doc_id, text, name) for _ in range(rounds) for doc_id, text in written.items() for name in retrievers]

    async def search_all() -> list[tuple[str, str | None, str, httpx.Response]]:
        gate = asyncio.Semaphore(CHECK_CONCURRENCY)
        async with httpx.AsyncClient(timeout=60) as client:
            async def one(doc_id: str, text: str | None, name: str):
                async with gate:
                    body = search_body(text or doc_id, name)
                    return doc_id, text, name, await client.post(f"{url}/v1/search", json=body, headers=AUTH)

            return await asyncio.gather(*(one(*p) for p in probes))

    for doc_id, text, name, r in asyncio.run(search_all()):  # a deleted document's id is also its word
        found = {h["id"]: h.get("text") for h in answered(r, name)}
        if text is None:
            assert doc_id not in found, (name, doc_id)
        else:
            assert found.get(doc_id) == text, (name, doc_id, found)


def doc(written, *, text: str | None = None) -> dict:
    """A new document: its id is a made-up word, and so is one of its text's words."""
    w = word()
    body = {"id": w, "text": text or f"{w} is a protein studied in stem cells"}
    written[w] = body["text"]
    return body


# -- the basic path ------------------------------------------------------------------------------------
def test_an_upsert_with_wait_is_searched_by_every_replica_of_every_writer(app, http, written):
    url, _, _ = app
    docs = [doc(written), doc(written)]
    r = upsert(http, url, docs)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["accepted"] == 2 and body["sequence"] >= 2 and body["visible"] is True
    assert body["retrievers"] == WRITERS
    check_everything(http, url, written, rounds=6)  # dense has two replicas and split two shards


def test_updates_and_deletes_apply_in_the_order_acknowledged(app, http, written):
    url, _, _ = app
    first = doc(written)
    assert upsert(http, url, [first]).status_code == 200
    second = {"id": first["id"], "text": f"{first['id']} replaced: now about insulin and glucose"}
    gone = doc(written)
    r = upsert(http, url, [second, gone, {"id": gone["id"], "text": gone["text"] + " again"}])
    assert r.status_code == 200
    written[first["id"]] = second["text"]
    r = delete(http, url, [gone["id"]])
    assert r.status_code == 200 and r.json()["visible"] is True
    written[gone["id"]] = None
    check_everything(http, url, written)


def test_a_write_goes_to_the_shard_that_owns_its_id(app, http, written):
    url, _, _ = app
    d = doc(written)
    assert upsert(http, url, [d], retrievers=["split"]).status_code == 200
    shards = http.get(f"{url}/v1/retrievers", headers=AUTH).json()
    split = next(r for r in shards["retrievers"] if r["name"] == "split")["detail"]["shards"]
    owner = shard_of(d["id"], 2)
    assert split[owner]["writes"]["touched"] > split[1 - owner]["writes"]["touched"] or \
        split[owner]["writes"]["delta_docs"] >= 1
    assert [h["id"] for h in hits(http, url, d["id"], "split")][:1] == [d["id"]]
    assert not [h for h in hits(http, url, d["id"], "dense") if h["id"] == d["id"]]  # only split was named
    written.pop(d["id"])  # not written to every writer: left out of the later checks


def test_a_cached_answer_from_before_a_write_is_not_served_after_it(app, http, written):
    url, _, _ = app
    w = word()
    before = hits(http, url, w, "keyword", cache=True)
    assert hits(http, url, w, "keyword", cache=True) == before  # now it is cached
    d = {"id": w, "text": f"{w} appears in this new document"}
    written[w] = d["text"]
    assert upsert(http, url, [d]).status_code == 200
    assert [h["id"] for h in hits(http, url, w, "keyword", cache=True)][:1] == [w]


# -- the client and the CLI --------------------------------------------------------------------------------
def test_the_client_upserts_and_deletes_over_http_and_through_a_handle_sync_and_async(app, http, written):
    url, _, _ = app
    from serve_app.client import RagClient

    over_http = RagClient(url=url, api_key=KEY)
    through_handle = RagClient(APP)  # joins the session's cluster, no key: a handle needs none
    for client in (over_http, through_handle):
        with client:
            a, b = doc(written), doc(written)
            answer = client.upsert([a], wait=True)
            assert answer.accepted == 1 and answer.visible and answer.retrievers == WRITERS
            assert asyncio.run(client.upsert_async([b], retrievers=["keyword"], wait=True)).retrievers == ["keyword"]
            written.pop(b["id"])
            gone = client.delete([a["id"]], wait=True)
            assert gone.sequence > answer.sequence and gone.visible
            written[a["id"]] = None
            assert asyncio.run(client.delete_async([b["id"]], wait=True)).accepted == 1
            written[b["id"]] = None
    check_everything(http, url, written, rounds=2)


def test_the_cli_upserts_a_jsonl_file_and_deletes_ids(app, http, written, tmp_path, capsys):
    url, _, _ = app
    from serve_app.cli import main

    docs = [doc(written) for _ in range(5)]
    source = tmp_path / "new.jsonl"
    source.write_text("".join(json.dumps({"_id": d["id"], "text": d["text"]}) + "\n" for d in docs))
    assert main(["upsert", str(source), "--url", url, "--api-key", KEY, "--wait", "--batch", "2"]) == 0
    assert "upserted 5 documents in dense, keyword, split" in capsys.readouterr().out
    assert main(["delete", docs[0]["id"], "--url", url, "--api-key", KEY, "--wait"]) == 0
    written[docs[0]["id"]] = None
    assert main(["delete", "x", "--url", url, "--api-key", KEY, "--retriever", "quick"]) == 2
    assert "does not take writes" in capsys.readouterr().err
    assert main(["upsert", str(source), "--url", url]) == 2  # no key
    check_everything(http, url, written, rounds=1)


# -- bad input ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("body", "status", "says"), [
    ({"documents": [{"id": "x", "text": "  "}]}, 422, "text"),
    ({"documents": [{"id": "", "text": "fine"}]}, 422, "id"),
    ({"documents": [{"id": "x"}]}, 422, "text"),
    ({"documents": [{"id": "x", "text": "fine"}], "retrievers": ["nope"]}, 422, "nope"),
    ({"documents": [{"id": f"x{i}", "text": "fine"} for i in range(51)]}, 413, "max_documents"),
    ({"documents": [{"id": "x", "text": "fine"}], "retrievers": ["quick"]}, 409, "does not take writes"),
    ({"documents": [{"id": "ok", "text": "fine"}, {"id": "bad", "text": ""}]}, 422, "text"),
])
def test_a_bad_write_is_a_4xx_naming_the_problem_and_applies_nothing(app, http, body, status, says):
    url, _, writes_dir = app
    end = _log_end(writes_dir)
    r = http.post(f"{url}/v1/documents", json=body, headers=AUTH)
    assert r.status_code == status, r.text
    assert says in r.text
    assert _log_end(writes_dir) == end


def test_a_write_without_the_key_is_a_401(app, http):
    url, _, writes_dir = app
    end = _log_end(writes_dir)
    r = upsert(http, url, [{"id": "x", "text": "fine"}], headers={})
    assert r.status_code == 401 and _log_end(writes_dir) == end


def test_a_write_that_cannot_be_made_durable_is_a_503_and_is_not_applied(app, http, written):
    url, _, writes_dir = app
    log = writes_dir / "log"
    os.rename(log, writes_dir / "log-away")
    log.write_text("the log's storage is gone")
    try:
        w = word()
        r = upsert(http, url, [{"id": w, "text": f"{w} must never be searched"}])
        assert r.status_code == 503, r.text
        assert "durable" in r.json()["detail"]
    finally:
        log.unlink()
        os.rename(writes_dir / "log-away", log)
    assert not hits(http, url, w, "keyword")
    written[w] = None
    d = doc(written)
    assert upsert(http, url, [d]).status_code == 200  # the storage is back: writes are again


# -- faults ---------------------------------------------------------------------------------------------
def test_acknowledged_writes_survive_a_killed_retriever_replica(app, http, written):
    url, _, _ = app
    assert upsert(http, url, [doc(written)]).status_code == 200
    victim = replica_actors(APP, "dense")[0]
    ray.kill(victim, no_restart=True)
    wait_until(lambda: len(replica_actors(APP, "dense")) == 2 and _replicas_ready(http, url, "dense", 2), 180, 1)
    check_everything(http, url, written, retrievers=["dense"], rounds=6)


def test_acknowledged_writes_survive_a_killed_hub_and_writes_go_on_after_it(app, http, written):
    url, _, writes_dir = app
    before = _log_end(writes_dir)
    [hub] = replica_actors(APP, "versions")
    ray.kill(hub, no_restart=True)
    d = doc(written)
    acknowledged = []

    def write_goes_through() -> bool:
        r = upsert(http, url, [d])
        acknowledged.append(r.status_code)
        return r.status_code == 200

    wait_until(write_goes_through, 120, 1)
    assert set(acknowledged) <= {200, 503}  # while the hub was down: a clear 503, never a 500
    assert _log_end(writes_dir) > before
    check_everything(http, url, written)


def test_acknowledged_writes_survive_a_killed_gateway_replica(app, http, written):
    url, _, _ = app
    assert upsert(http, url, [doc(written)]).status_code == 200
    gateways = replica_actors(APP, "gateway")
    ray.kill(gateways[0], no_restart=True)

    def answers() -> bool:
        try:
            return upsert(http, url, [doc(written)]).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(answers, 120, 1)
    check_everything(http, url, written)


# -- merging ----------------------------------------------------------------------------------------------
def test_a_full_delta_merges_into_a_new_version_with_no_write_lost_and_the_log_truncated(app, http, written):
    url, _, writes_dir = app
    docs = [doc(written) for _ in range(MERGE_DOCS)]
    assert upsert(http, url, docs, retrievers=["dense", "keyword"]).status_code == 200
    for d in docs:  # not written to `split`: only the two that merge are checked for them
        written.pop(d["id"])

    def merged() -> bool:
        info = {r["name"]: r for r in http.get(f"{url}/v1/retrievers", headers=AUTH).json()["retrievers"]}
        return all(info[n]["version"] and info[n]["version"].startswith("merged-") for n in ("dense", "keyword"))

    wait_until(merged, 240, 1)
    for name in ("dense", "keyword"):
        pinned = next(r for r in http.get(f"{url}/v1/retrievers", headers=AUTH).json()["retrievers"]
                      if r["name"] == name)
        wait_until(lambda n=name, v=pinned["version"]: all(r["version"] == v for r in _replicas(http, url, n)),
                   120, 1)
    merged_docs = {d["id"]: d["text"] for d in docs}
    check_everything(http, url, {**written, **merged_docs}, retrievers=["dense", "keyword"], rounds=2)
    check_everything(http, url, written, retrievers=["split"], rounds=2)
    assert (writes_dir / "log" / "pins.json").is_file()
    # `split` still has its writes pending, so the log keeps them; nothing it needs went
    assert segments(writes_dir / "log")


def test_a_replica_started_after_a_merge_opens_the_merged_version_and_replays_the_rest(app, http, written):
    url, _, _ = app
    assert upsert(http, url, [doc(written)]).status_code == 200
    victim = replica_actors(APP, "keyword")[0]
    ray.kill(victim, no_restart=True)
    wait_until(lambda: _replicas_ready(http, url, "keyword", 1), 180, 1)
    assert all(r["version"].startswith("merged-") for r in _replicas(http, url, "keyword"))
    check_everything(http, url, written)


def test_acknowledged_writes_survive_a_full_stop_and_restart_of_the_app(app, http, written):
    url, config, _ = app
    assert upsert(http, url, [doc(written)]).status_code == 200
    serve.delete(APP)
    serve.run(app_from_config(config, api_keys=[KEY]), name=APP, route_prefix=f"/{APP}")
    check_everything(http, url, written)
    d = doc(written)
    assert upsert(http, url, [d]).status_code == 200
    check_everything(http, url, written, rounds=1)


def test_the_write_routes_pass_every_fuzz_check(app, tmp_path):
    from tests.integration.test_fuzz import fuzz

    url, _, _ = app
    fuzz(url, tmp_path, "--header", f"Authorization: Bearer {KEY}", "--include-path-regex", "^/v1/documents")


# -- helpers ----------------------------------------------------------------------------------------------
def _log_end(writes_dir: Path) -> int:
    """The last seq in the log on disk."""
    end = 0
    for first, path in segments(writes_dir / "log"):
        end = max(end, first - 1)
        for line in path.read_text(encoding="utf-8").splitlines():
            end = max(end, int(line.split(",", 1)[0].removeprefix('{"seq":')))
    return end


def _replicas(http, url, name: str) -> list[dict]:
    info = http.get(f"{url}/v1/retrievers", headers=AUTH).json()["retrievers"]
    return next(r for r in info if r["name"] == name)["replicas"]


def _replicas_ready(http, url, name: str, count: int) -> bool:
    replicas = _replicas(http, url, name)
    return len(replicas) == count and all(r["version"] for r in replicas)


