"""One real local Ray cluster per test session, with three apps on one Serve HTTP proxy.

- `ragfan` (/)        the embedded default: five real retrievers, the real model in each replica
- `faults` (/faults)  synthetic retrievers that sleep, fail or hang, for fan-out behaviour
- `off`    (/off)     the same default config with enabled: false

Starting Ray costs seconds and loading the model costs more, so everything is session-scoped.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import httpx
import pytest
import ray
from ray import serve

from serve_app.app import app_from_config, prepare_indexes
from serve_app.config import DEFAULT_CONFIG, load_config, parse_config

pytestmark = pytest.mark.integration
CORPUS = DEFAULT_CONFIG.parent / "data" / "corpus.jsonl"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    port = _free_port()
    ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def base_url(cluster) -> str:
    config = load_config()
    prepare_indexes(config, progress=False)
    serve.run(app_from_config(config), name="ragfan", route_prefix="/")
    return cluster


def synthetic(name: str, **kw) -> dict:
    return {
        "name": name,
        "kind": "synthetic",
        "data": str(CORPUS),
        "ray_actor_options": {"num_cpus": 0.1, "memory": "256MiB"},
        "timeout_ms": 2000,
        **kw,
    }


@pytest.fixture(scope="session")
def faults_url(cluster) -> str:
    config = parse_config(
        {
            "app_name": "faults",
            "gateway": {"ray_actor_options": {"num_cpus": 0.1}},
            "retrievers": [
                *(synthetic(f"slow{i}", delay_ms=200) for i in range(1, 5)),
                synthetic("failing", fail="always"),
                synthetic("hanging", delay_ms=5000, timeout_ms=300),
            ],
        },
        base_dir=Path("."),
    )
    serve.run(app_from_config(config), name="faults", route_prefix="/faults")
    return cluster + "/faults"


@pytest.fixture(scope="session")
def off_url(cluster, monkeypatch_session) -> str:
    monkeypatch_session.setenv("RAGFAN_DISABLED", "true")
    config = load_config()
    monkeypatch_session.delenv("RAGFAN_DISABLED")
    serve.run(app_from_config(config), name="off", route_prefix="/off")
    return cluster + "/off"


@pytest.fixture(scope="session")
def monkeypatch_session():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="session")
def http():
    with httpx.Client(timeout=60) as client:
        yield client


def replica_actors(app: str, deployment: str) -> list:
    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return [
        ray.get_actor(a["name"], namespace=a["namespace"])
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(prefix)
    ]


def wait_until(predicate, timeout_s: float, interval_s: float = 0.25) -> float:
    """Poll until predicate() is true; return the seconds it took, or fail."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout_s:
        if predicate():
            return time.perf_counter() - started
        time.sleep(interval_s)
    pytest.fail(f"condition not met within {timeout_s} s")
