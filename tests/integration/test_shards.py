"""A dense retriever split over two shard deployments, against the same collection unsplit."""

from __future__ import annotations

import json

import ray

from actors.shards import shard_of
from tests.integration.conftest import TINYBEIR, replica_actors, wait_until

QUERIES = [json.loads(line)["text"] for line in (TINYBEIR / "queries.jsonl").read_text().splitlines()]


def ask(http, url, retriever, query, top_k=10):
    r = http.post(f"{url}/v1/search", json={"query": query, "top_k": top_k, "retrievers": [retriever]})
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


def test_a_lost_shard_gives_a_partial_answer_with_its_coverage(sharded_url, http):
    for actor in replica_actors("sharded", "split-shard1"):
        ray.kill(actor, no_restart=True)
    body = ask(http, sharded_url, "split", QUERIES[0])
    status = body["retrievers"]["split"]
    assert status["status"] == "ok" and status["coverage"] == 0.5 and body["degraded"] is True
    assert "shard 1" in status["error"]
    assert body["results"] and all(shard_of(h["id"], 2) == 0 for h in body["results"])
    recovered = wait_until(
        lambda: ask(http, sharded_url, "split", QUERIES[0])["retrievers"]["split"]["coverage"] == 1.0, 60
    )
    print(f"\nshard 1 killed: coverage 0.5, answered from shard 0; full coverage again after {recovered:.1f} s")
