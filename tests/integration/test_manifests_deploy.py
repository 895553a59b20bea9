"""The KubeRay manifest's application, deployed on the local cluster, answers a search.

`base_url` (tests/integration/conftest.py) deploys the application of cluster_configs/rayservice.yaml's
serveConfigV2, its import_path called with its args, as Serve does on KubeRay; the local Ray offers the
custom resource `dense` as the manifest's dense worker pods do.
"""

from __future__ import annotations

import ray
from ray import serve

from serve_app.config import load_config
from serve_app.schemas import SearchResponse
from tests.integration.conftest import ROOT, manifest_application, replica_actors, wait_until


def test_the_manifest_application_answers_a_search(base_url, http):
    r = http.post(f"{base_url}/v1/search", json={"query": "vitamin D and multiple sclerosis", "top_k": 5})
    assert r.status_code == 200, r.text
    body = SearchResponse.model_validate(r.json())
    assert len(body.results) == 5 and body.degraded is False
    assert {s.status for s in body.retrievers.values()} == {"ok"}


def test_the_deployed_application_is_the_one_the_manifest_names(base_url):
    app = manifest_application()
    config = load_config(ROOT / app["args"]["config"])
    assert set(serve.status().applications[app["name"]].deployments) == {"gateway", "versions", "encoder",
                                                                           *config.names}

    def running_and_healthy() -> bool:  # an earlier test may have just had a replica killed and replaced
        status = serve.status().applications[app["name"]]
        return status.status == "RUNNING" and all(d.status == "HEALTHY" for d in status.deployments.values())

    wait_until(running_and_healthy, timeout_s=60)
    # Each dense replica holds one unit of `dense`, as on KubeRay's dense pods; nothing else takes any.
    dense = [r.name for r in config.retrievers if (r.ray_actor_options.resources or {}).get("dense")]
    assert dense == ["corpus", "persona", "domain"]
    held = ray.cluster_resources()["dense"] - ray.available_resources().get("dense", 0)
    assert held == sum(len(replica_actors(app["name"], name)) for name in dense)
