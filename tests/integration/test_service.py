"""The embedded default app, end to end: HTTP, the Python client, bad input, logs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import ray
from ray import serve

from actors.errors import InvalidRequest
from serve_app.client import RagClient
from serve_app.schemas import SearchResponse

NAMES = ["corpus", "keyword", "graph", "persona", "domain"]
QUERY = "vitamin D deficiency and the risk of multiple sclerosis"


def test_search_asks_all_five_retrievers_and_fuses(base_url, http):
    r = http.post(f"{base_url}/v1/search", json={"query": QUERY, "top_k": 10})
    assert r.status_code == 200, r.text
    body = SearchResponse.model_validate(r.json())
    assert {n: s.status for n, s in body.retrievers.items()} == dict.fromkeys(NAMES, "ok")
    assert body.degraded is False and body.latency_ms > 0
    assert len(body.results) == 10
    scores = [res.score for res in body.results]
    assert scores == sorted(scores, reverse=True)
    assert len({res.id for res in body.results}) == 10
    # the top result is found by dense and BM25 alike, and it is about the query
    top = body.results[0]
    assert {"corpus", "keyword"} <= {s.retriever for s in top.sources}
    assert "multiple sclerosis" in top.text.lower()
    assert all(s.rank >= 1 for res in body.results for s in res.sources)


def test_graph_hits_name_entities_relation_and_source(base_url, http):
    body = {"query": "obesity and type 2 diabetes", "retrievers": ["graph"], "top_k": 50}
    r = http.post(f"{base_url}/v1/search", json=body)
    assert r.status_code == 200
    body = r.json()
    assert body["retrievers"]["graph"]["status"] == "ok"
    assert body["retrievers"]["corpus"]["status"] == "skipped"
    hits = body["results"]
    assert hits and all(h["id"].startswith("kg:") for h in hits)
    assert {"head", "relation", "tail", "source_id", "hops"} <= set(hits[0]["metadata"])
    assert any(h["metadata"]["hops"] == "2" and " -> " in h["metadata"]["path"] for h in hits)


def test_filters_restrict_only_the_retrievers_that_declare_the_key(base_url, http):
    body = {"query": "explain the evidence on vaccines", "filters": {"persona": "patient"}, "top_k": 50}
    both = http.post(f"{base_url}/v1/search", json={**body, "retrievers": ["persona", "corpus"]}).json()
    assert both["retrievers"]["persona"]["num_hits"] == 8  # the bundled data has 8 patient snippets
    assert both["retrievers"]["corpus"]["num_hits"] == 50  # corpus has no `persona` key: unfiltered
    only = http.post(f"{base_url}/v1/search", json={**body, "retrievers": ["persona"]}).json()
    assert len(only["results"]) == 8
    assert all(h["metadata"]["persona"] == "patient" for h in only["results"])
    assert "vaccine" in only["results"][0]["text"]


def test_retrievers_endpoint_reports_health_and_config(base_url, http):
    r = http.get(f"{base_url}/v1/retrievers")
    assert r.status_code == 200
    infos = {i["name"]: i for i in r.json()["retrievers"]}
    assert list(infos) == NAMES
    assert all(i["healthy"] for i in infos.values()), infos
    assert infos["corpus"]["detail"]["num_docs"] == 500
    assert infos["graph"]["detail"]["num_facts"] > 100
    assert infos["corpus"]["config"]["num_cpus"] == 0.3
    # the dense retrievers hold no model: the shared encoder encodes their queries, on the CPU since it
    # asked for no GPU (num_gpus > 0 would put it on CUDA)
    dense = [infos[n]["detail"] for n in ("corpus", "persona", "domain")]
    assert {(d["encoder"], d["torch_loaded"]) for d in dense} == {("shared", False)}
    assert infos["graph"]["detail"]["torch_loaded"] is False and infos["keyword"]["detail"]["torch_loaded"] is False
    (encoder,) = r.json()["encoders"]
    assert encoder["healthy"] and encoder["detail"]["device"] == "cpu" and encoder["detail"]["dim"] == 384
    assert encoder["used_by"] == ["corpus", "graph", "persona", "domain"]
    assert all(i["circuit"]["state"] == "closed" for i in infos.values())


def test_health_openapi_and_docs(base_url, http):
    assert http.get(f"{base_url}/healthz").json() == {"status": "ok"}
    spec = http.get(f"{base_url}/openapi.json").json()
    assert {"/v1/search", "/v1/retrievers", "/healthz"} <= set(spec["paths"])
    assert http.get(f"{base_url}/docs").status_code == 200


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ({"query": ""}, "query", "empty"),
        ({"query": "   "}, "query", "empty"),
        ({"query": "x" * 8193}, "query", "limit is 8192"),
        ({"query": "x", "top_k": 0}, "top_k", "greater than or equal to 1"),
        ({"query": "x", "top_k": 101}, "top_k", "less than or equal to 100"),
        ({"query": "x", "top_k": "ten"}, "top_k", "integer"),
        ({"query": ["x"]}, "query", "string"),
        ({"query": "x", "retrievers": ["corpus", "nope"]}, "retrievers", "valid: corpus, keyword, graph"),
        ({"query": "x", "filters": {"colour": "red"}}, "filters", "filter keys: domain, persona"),
        ({"query": "x", "timeout_ms": -5}, "timeout_ms", "greater than or equal to 1"),
    ],
)
def test_bad_input_gets_a_422_naming_the_field(base_url, http, body, field, message):
    r = http.post(f"{base_url}/v1/search", json=body)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert any(field in map(str, d["loc"]) and message in d["msg"] for d in detail), detail


@pytest.mark.parametrize(
    ("content", "message"),
    [(b'{"query": "x",', "body is not valid JSON"), (b"", "Field required"), (b"[1, 2]", "valid dictionary")],
)
def test_malformed_or_missing_body_gets_a_422(base_url, http, content, message):
    r = http.post(f"{base_url}/v1/search", content=content, headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert message in json.dumps(r.json())


def test_python_client_in_process_sync_and_async(base_url):
    client = RagClient.from_handle(serve.get_app_handle("ragfan"))
    r = client.search("metformin and type 2 diabetes", top_k=3, retrievers=["corpus", "graph"])
    assert isinstance(r, SearchResponse) and len(r.results) == 3
    assert r.retrievers["graph"].status == "ok" and r.retrievers["keyword"].status == "skipped"
    with pytest.raises(InvalidRequest, match="top_k"):
        client.search("x", top_k=0)
    with pytest.raises(InvalidRequest, match="valid: corpus"):
        client.search("x", retrievers=["nope"])


async def test_python_client_async(base_url):
    client = RagClient.from_handle(serve.get_app_handle("ragfan"))
    # deep enough that the domain retriever's hits are among the fused results (in the top 5 they are not)
    r = await client.search_async("p53 mutations in breast cancer", top_k=50, filters={"domain": "oncology"})
    assert r.results and not r.degraded
    assert r.retrievers["domain"].status == "ok" and r.retrievers["domain"].num_hits > 0
    domain_hits = [h for h in r.results if any(s.retriever == "domain" for s in h.sources)]
    assert domain_hits and all(h.metadata["domain"] == "oncology" for h in domain_hits)
    # the domain retriever alone: every hit it returns carries the filtered value
    only = await client.search_async(
        "p53 mutations in breast cancer", top_k=20, filters={"domain": "oncology"}, retrievers=["domain"]
    )
    assert len(only.results) == only.retrievers["domain"].num_hits > 0
    assert all(h.metadata["domain"] == "oncology" for h in only.results), [h.metadata for h in only.results]


def test_python_client_from_another_process(base_url):
    address = ray.get_runtime_context().gcs_address
    script = (
        "from serve_app.client import RagClient\n"
        f"r = RagClient(address={address!r}).search('aspirin and colorectal cancer', top_k=4)\n"
        "print(r.model_dump_json())\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    body = SearchResponse.model_validate_json(out.stdout.strip().splitlines()[-1])
    assert len(body.results) == 4 and body.retrievers["corpus"].status == "ok"


def test_the_default_app_logs_no_line_per_search(base_url, http):
    """`gateway.log_searches` is off by default: a line per search is opt-in (test_faults.py checks it on)."""
    assert http.post(f"{base_url}/v1/search", json={"query": "log line check"}).status_code == 200
    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
    gateway_logs = list(logs.glob("replica_ragfan_gateway_*.log"))
    assert gateway_logs  # the replica's log is there, and says nothing per search
    assert not [line for p in gateway_logs for line in p.read_text(errors="replace").splitlines()
                if re.search(r" -- search [0-9.]+ ms ", line)]
