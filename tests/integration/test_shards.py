"""A dense retriever split over two shard deployments, against the same collection unsplit."""

from __future__ import annotations

import json

import ray

from actors.shards import shard_of
from tests.integration.conftest import TINYBEIR, replica_actors, wait_until

QUERIES = [json.loads(line)["text"] for line in (TINYBEIR / "queries.jsonl").read_text().splitlines()]


def ask(http, url, retriever, query, top_k=10, **extra):
    r = http.post(f"{url}/v1/search", json={"query": query, "top_k": top_k, "retrievers": [retriever], **extra})
    assert r.status_code == 200, r.text
    return r.json()


def test_shard_merge_through_the_app_equals_the_unsharded_retriever(sharded_url, http):
    for query in QUERIES:
        whole, split = ask(http, sharded_url, "whole", query), ask(http, sharded_url, "split", query)
        assert split["retrievers"]["split"]["coverage"] == 1.0 and split["degraded"] is False
        assert whole["retrievers"]["whole"]["coverage"] is None
        expected = [(h["id"], h["sources"][0]["score"]) for h in whole["results"]]
        merged = [(h["id"], h["sources"][0]["score"]) for h in split["results"]]
        assert [i for i, _ in merged] == [i for i, _ in expected], query
        assert all(abs(a - b) < 1e-5 for (_, a), (_, b) in zip(merged, expected, strict=True))
    info = {i["name"]: i for i in http.get(f"{sharded_url}/v1/retrievers").json()["retrievers"]}
    shards = info["split"]["detail"]["shards"]
    assert len(shards) == 2 and info["split"]["healthy"]
    assert sum(s["num_docs"] for s in shards) == info["whole"]["detail"]["num_docs"] == 40
    print(f"\nshard docs: {[s['num_docs'] for s in shards]} of {info['whole']['detail']['num_docs']}")


def test_a_lost_shard_gives_a_partial_answer_with_its_coverage(sharded_url, sharded_data, http):
    def kill_shard1() -> None:
        for actor in replica_actors("sharded", "split-shard1"):
            ray.kill(actor, no_restart=True)

    # With its data gone, no new replica of shard 1 can open its index: it stays up and says why
    # (actors/deployment.py). So the shard is down from the kill until the data is back, by order,
    # however fast Serve replaces the killed replica.
    away = sharded_data.with_name("corpus.away")
    sharded_data.rename(away)
    try:
        kill_shard1()
        body = ask(http, sharded_url, "split", QUERIES[0], timeout_ms=500)
    finally:
        away.rename(sharded_data)
    status = body["retrievers"]["split"]
    assert status["status"] == "ok" and status["coverage"] == 0.5 and body["degraded"] is True
    assert "shard 1" in status["error"]
    assert body["results"] and all(shard_of(h["id"], 2) == 0 for h in body["results"])

    def whole_again() -> bool:  # while a replacement starts, an answer may still be partial, or none at all
        r = http.post(f"{sharded_url}/v1/search", json={"query": QUERIES[0], "retrievers": ["split"]})
        if r.status_code == 200 and r.json()["retrievers"]["split"]["coverage"] == 1.0:
            return True
        if "failed to start" in r.text:  # a replacement that started without its data: the next one has it
            kill_shard1()
        return False

    recovered = wait_until(whole_again, 90)
    print(f"\nshard 1 killed: coverage 0.5, answered from shard 0; full coverage again after {recovered:.1f} s")


def test_ingest_shards_writes_one_checked_artifact_directory_per_shard(cluster, tmp_path):
    from actors.factory import open_artifacts
    from actors.ingest import ingest
    from actors.shards import shard_dir
    from actors.spec import DenseOptions, RetrieverSpec
    from actors.types import Query

    reports = ingest(TINYBEIR / "corpus.jsonl", tmp_path, kinds=("dense",), shards=2, progress=False)
    dirs = [shard_dir(tmp_path / "dense", i, 2) for i in range(2)]
    assert [r.path for r in reports] == dirs
    manifests = [json.loads((d / "manifest.json").read_text()) for d in dirs]
    assert [m["shard"] for m in manifests] == [[0, 2], [1, 2]]
    assert sum(m["num_docs"] for m in manifests) == sum(r.num_docs for r in reports) > 0
    spec = RetrieverSpec(name="s", options=DenseOptions(encoder="local"), artifacts=tmp_path / "dense", shard=(1, 2))
    shard1 = open_artifacts(spec)
    assert all(shard_of(d.doc_id, 2) == 1 for d in shard1.documents)
    [hits] = shard1.search([Query(QUERIES[0], top_k=3)])
    assert hits and all(shard_of(h.doc_id, 2) == 1 for h in hits)
    # a second run finds the shards built, checks them and reuses them
    assert all(r.reused for r in ingest(TINYBEIR / "corpus.jsonl", tmp_path, kinds=("dense",), shards=2,
                                        progress=False))
