"""`encoder.placement: gateway`: the gateway replicas encode queries in-process, and no encoder
deployment runs.

The `inside` app serves tinybeir twice over: `dense` takes its query vectors from the gateway's own
encoder (the default `encoder: shared`), and `own` (`encoder: local`) encodes with a model of its
own, torch, in its replica. Both hold the same documents with the same model, so they must find the
same documents with the same scores: the vectors the gateway sends are the model's. Writes are on, so
the gateway also embeds the documents a client writes.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import httpx
import pytest
from ray import serve

from serve_app.app import app_from_config, prepare_indexes
from serve_app.config import parse_config
from tests.integration.conftest import TINYBEIR

pytestmark = pytest.mark.integration
APP = "inside"


@pytest.fixture(scope="module")
def url(cluster, tmp_path_factory):
    small = {"ray_actor_options": {"num_cpus": 0.1}, "timeout_ms": 20_000, "top_k": 10}
    config = parse_config({
        "app_name": APP,
        "cache": None,  # every search reaches the retrievers
        "cache_dir": str(tmp_path_factory.mktemp("inside-cache")),
        "gateway": {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0.1}},
        "encoder": {"placement": "gateway", "ray_actor_options": {"num_cpus": 0.2}},
        "writes": {"enabled": True, "dir": str(tmp_path_factory.mktemp("inside-writes"))},
        "retrievers": [
            {"name": "dense", "kind": "dense", "data": str(TINYBEIR / "corpus.jsonl"), **small},
            {"name": "own", "kind": "dense", "encoder": "local", "data": str(TINYBEIR / "corpus.jsonl"), **small},
        ],
    }, base_dir=Path("."))
    prepare_indexes(config, progress=False)
    serve.run(app_from_config(config, api_keys=[]), name=APP, route_prefix=f"/{APP}")
    yield f"{cluster}/{APP}"
    serve.delete(APP)


def test_no_encoder_deployment_runs_and_the_gateway_reports_its_encoder(url):
    assert set(serve.status().applications[APP].deployments) == {"gateway", "versions", "dense", "own"}
    body = httpx.get(f"{url}/v1/retrievers", timeout=30).json()
    [encoder] = body["encoders"]
    assert encoder["name"] == "gateway" and encoder["healthy"] is True, encoder
    assert encoder["used_by"] == ["dense"]  # `own` encodes for itself
    assert encoder["detail"]["placement"] == "gateway" and encoder["detail"]["backend"] == "onnx"


def test_the_gateways_vectors_find_what_the_model_in_the_retriever_finds(url):
    queries = [json.loads(line)["text"] for line in (TINYBEIR / "queries.jsonl").open()][:5]
    with httpx.Client(timeout=30) as http:
        for query in queries:
            found = {}
            for name in ("dense", "own"):
                r = http.post(f"{url}/v1/search", json={"query": query, "retrievers": [name], "top_k": 5})
                assert r.status_code == 200, r.text
                assert r.json()["retrievers"][name]["status"] == "ok", r.json()["retrievers"]
                found[name] = [(hit["id"], hit["sources"][0]["score"]) for hit in r.json()["results"]]  # its cosine
            assert [i for i, _ in found["dense"]] == [i for i, _ in found["own"]], query
            assert [s for _, s in found["dense"]] == pytest.approx([s for _, s in found["own"]], abs=1e-4)


def test_a_written_document_is_embedded_in_the_gateway_and_found(url):
    word = "zq" + uuid.uuid4().hex[:10]
    text = f"{word} is a protein that regulates insulin secretion in pancreatic beta cells"
    with httpx.Client(timeout=60) as http:
        r = http.post(f"{url}/v1/documents", json={"documents": [{"id": word, "text": text}], "wait": True})
        assert r.status_code == 200, r.text
        for _ in range(4):  # either gateway replica
            r = http.post(f"{url}/v1/search", json={"query": text, "retrievers": ["dense"], "top_k": 3})
            assert r.status_code == 200 and r.json()["results"][0]["id"] == word, r.text
