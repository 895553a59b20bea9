"""One real local Ray cluster per test session, and up to eight apps on its one Serve HTTP proxy.

Each app is a session fixture, deployed the first time a test asks for it and deleted once the last
test that needs it has run (`pytest_runtest_teardown`, at the end of this file):

- `ragfan`  (/)          `base_url`: the five real retrievers of cluster_configs/ragfan-cluster.yaml, the
                         real model in each replica, deployed from the KubeRay manifest's serveConfigV2
                         (cluster_configs/rayservice.yaml) as KubeRay would
- `faults`  (/faults)    `faults_url`: synthetic retrievers that sleep, fail, hang or trip their breaker,
                         for fan-out behaviour
- `off`     (/off)       `off_url`: the default config with enabled: false (RAGFAN_DISABLED)
- `guard`   (/guard)     `guard_url`: two gateway replicas behind API keys, two working retrievers and one
                         whose altered index fails to start
- `watch`   (/watch)     `watch_url`: two gateway replicas behind WATCH_KEY, over one retriever that answers,
                         one that fails and one that hangs: what the metrics, Prometheus and /dashboard
                         tests watch
- `tight`   (/tight)     `tight_url`: a gateway that runs 2 requests and queues 2; the rest get 503
- `elastic` (/elastic)   `elastic_url`: one retriever autoscaled from 1 to 3 replicas on short delays
- `sharded` (/sharded)   `sharded_url`: one dense collection twice, whole and split over two shards

Some test modules deploy an app of their own (test_cache, test_encoder_placement, test_reliability, test_reload,
test_writes).
Ray exports the cluster's metrics for Prometheus on `metrics_port`, every METRICS_REPORT_MS.

Starting Ray costs seconds and loading the model costs more, so everything is session-scoped.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import random
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import ray
import yaml
from ray import serve

from serve_app.app import app_from_config, prepare_indexes, serve_env
from serve_app.config import DEFAULT_CONFIG, load_config, parse_config

pytestmark = pytest.mark.integration
CORPUS = DEFAULT_CONFIG.parent / "data" / "corpus.jsonl"
TINYBEIR = Path(__file__).resolve().parents[1] / "fixtures" / "tinybeir"
ROOT = Path(__file__).resolve().parents[2]
RAYSERVICE = ROOT / "cluster_configs" / "rayservice.yaml"
WATCH_KEY = "watch-key-0123456789"  # the watch app's API key
# How often Ray's processes report metrics to the export (Ray's default: 10 s). Every report of every
# process is parsed by the node's agent: at 1 s, with the session's apps up, that took a fifth of a core.
METRICS_REPORT_MS = 5000
DENSE_UNITS = 3  # the custom resource the manifest's dense retrievers need: one per replica, three at the least


def manifest_application() -> dict:
    """The one application in the RayService's serveConfigV2 (the same as cluster_configs/serve.yaml)."""
    (service,) = [d for d in yaml.safe_load_all(RAYSERVICE.read_text(encoding="utf-8")) if d["kind"] == "RayService"]
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    return app


def free_port() -> int:
    """A port free now, below Linux's ephemeral range (32768 and up) and Serve's direct-ingress ports
    (30000 to 31000). A port the OS hands out for binding to 0 is an ephemeral one, which Ray's own
    outgoing connections can take before the server binds it ("Failed to bind to address")."""
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(20000, 30000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port between 20000 and 30000")


METRICS_PORT = free_port()
# Hold files of the synthetic retrievers configured with `hold: HOLDS / name` (actors/synthetic.py)
HOLDS = Path(tempfile.mkdtemp(prefix="ragfan-holds-"))


@contextlib.contextmanager
def holding(name: str) -> Iterator[None]:
    """Hold every search of the synthetic retrievers configured with `hold: HOLDS / name` until the block ends."""
    (HOLDS / name).touch()
    try:
        yield
    finally:
        (HOLDS / name).unlink(missing_ok=True)


def held(name: str) -> int:
    """How many searches wait in `holding(name)` now, in every replica (each leaves a file while it waits)."""
    return len(list(HOLDS.glob(f"{name}.*.inside")))


@pytest.fixture(scope="session")
def metrics_port(cluster) -> int:
    """Where the session's Ray node exports its metrics (Prometheus text at /metrics)."""
    return METRICS_PORT


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    port = free_port()
    # `dense`: what KubeRay's dense worker pods advertise, so the manifest's dense retrievers can be placed.
    # 12 logical CPUs on 2 cores: the session's apps stay deployed until its end, and the last module's app
    # (test_writes) must still find the fractions of a CPU its replicas ask for, or serve.run waits forever.
    with serve_env():
        ray.init(num_cpus=12, resources={"dense": DENSE_UNITS}, include_dashboard=False, log_to_driver=False,
                 _metrics_export_port=METRICS_PORT,
                 _system_config={"metrics_report_interval_ms": METRICS_REPORT_MS})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def base_url(cluster) -> str:
    # As Serve does for serveConfigV2: import the builder named by import_path and call it with args.
    # args.config is relative to the workers' working directory: the repository root (in the image too).
    app = manifest_application()
    args = {**app["args"], "config": str(ROOT / app["args"]["config"])}
    prepare_indexes(load_config(args["config"]), progress=False)
    module, _, attr = app["import_path"].partition(":")
    builder = getattr(importlib.import_module(module), attr)
    serve.run(builder(args), name=app["name"], route_prefix=app["route_prefix"])
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
            "cache": None,  # every search reaches the retrievers: these apps test what they do
            "gateway": {"ray_actor_options": {"num_cpus": 0.1}, "log_searches": True},
            "retrievers": [
                *(synthetic(f"slow{i}", delay_ms=200) for i in range(1, 5)),
                synthetic("failing", fail="always"),
                synthetic("hanging", delay_ms=5000, timeout_ms=300),
                # batches of one, four at a time: an I/O-bound retriever overlapping its waits; a test holds
                # its calls (`holding`), for as long as it takes to see them inside at once
                synthetic("overlapping", batch={"max_batch_size": 1, "max_concurrent_batches": 4},
                          hold=str(HOLDS / "overlapping"), timeout_ms=120_000),
                synthetic("quick"),
                # circuit breaking: opens after 3 failures in a row, probes again after 5 s
                synthetic("flaky", fail="always", circuit_breaker={"failures": 3, "cooldown_s": 5.0}),
                # hangs for a minute; its breaker never opens, so every call waits out its deadline
                synthetic("stuck", delay_ms=60_000, timeout_ms=300, max_in_flight=3,
                          circuit_breaker={"failures": 1000}),
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
    """Handles to the deployment's live replica actors.

    A replica can stop between the listing and the lookup (a downscale, or a kill a test made);
    `ray.get_actor` then raises ValueError, and that replica is not counted, as it is gone.
    """
    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    handles = []
    for a in ray.util.list_named_actors(all_namespaces=True):
        if not a["name"].startswith(prefix):
            continue
        try:
            handles.append(ray.get_actor(a["name"], namespace=a["namespace"]))
        except ValueError:
            continue
    return handles


def wait_until(predicate, timeout_s: float, interval_s: float = 0.25) -> float:
    """Poll until predicate() is true; return the seconds it took, or fail."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout_s:
        if predicate():
            return time.perf_counter() - started
        time.sleep(interval_s)
    pytest.fail(f"condition not met within {timeout_s} s")


async def wait_until_async(predicate, timeout_s: float, interval_s: float = 0.05) -> float:
    """wait_until for a test's own event loop: poll without blocking it."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout_s:
        if predicate():
            return time.perf_counter() - started
        await asyncio.sleep(interval_s)
    pytest.fail(f"condition not met within {timeout_s} s")


API_KEY = "test-key-5f1c"  # the `guard` app's key; the tests check it never shows in logs


@pytest.fixture(scope="session")
def broken_index(tmp_path_factory) -> Path:
    """Keyword artifacts built by ingest, then altered: its retriever must fail to start."""
    from actors.ingest import ingest

    out = tmp_path_factory.mktemp("broken")
    ingest(TINYBEIR / "corpus.jsonl", out, kinds=("keyword",), progress=False)
    victim = next(p for p in sorted((out / "keyword").iterdir()) if p.name != "manifest.json" and p.is_file())
    with victim.open("ab") as fh:
        fh.write(b"tampered")
    return out / "keyword"


@pytest.fixture(scope="session")
def guard_url(cluster, broken_index, tmp_path_factory) -> str:
    """Two gateway replicas behind API keys; two working retrievers and one that fails to start."""
    keys = tmp_path_factory.mktemp("keys") / "api_keys.txt"
    keys.write_text(f"# keys for the guard app\n{API_KEY}\n")
    config = parse_config(
        {
            "app_name": "guard",
            "cache": None,  # every search reaches the retrievers: these apps test what they do
            "gateway": {"ray_actor_options": {"num_cpus": 0.1}, "num_replicas": 2, "api_keys_file": str(keys)},
            "retrievers": [
                synthetic("steady", delay_ms=20),
                # steady2 answers while steady is killed. When a gateway replica dies, Ray holds the
                # calls the other replica sends at that instant to steady2 for about 2 s, until
                # steady2's worker gives up reporting to the dead caller, it appears (docs/RELIABILITY.md):
                # a deadline above that lets the kill test count lost searches, not that stall.
                synthetic("steady2", delay_ms=20, timeout_ms=10000),
                {"name": "broken", "kind": "keyword", "artifacts": str(broken_index),
                 "ray_actor_options": {"num_cpus": 0.1}},
            ],
        },
        base_dir=Path("."),
    )
    serve.run(app_from_config(config, api_keys=None), name="guard", route_prefix="/guard")
    return cluster + "/guard"


@pytest.fixture(scope="session")
def watch_url(cluster) -> str:
    """Two gateway replicas behind WATCH_KEY; `steady` answers, `failing` always fails (its breaker opens
    after 3 failures and probes again every second), `hanging` times out at 300 ms."""
    config = parse_config(
        {
            "app_name": "watch",
            "gateway": {"ray_actor_options": {"num_cpus": 0.1}, "num_replicas": 2},
            "retrievers": [
                synthetic("steady", delay_ms=5),
                synthetic("failing", fail="always", circuit_breaker={"failures": 3, "cooldown_s": 1.0}),
                synthetic("hanging", delay_ms=5000, timeout_ms=300, circuit_breaker={"failures": 1000}),
            ],
        },
        base_dir=Path("."),
    )
    serve.run(app_from_config(config, api_keys=[WATCH_KEY]), name="watch", route_prefix="/watch")
    return cluster + "/watch"


@pytest.fixture(scope="session")
def tight_url(cluster) -> str:
    """A gateway that runs 2 requests and queues 2 more; the rest get 503 with Retry-After: 2."""
    config = parse_config(
        {
            "app_name": "tight",
            "cache": None,  # every search reaches the retrievers: these apps test what they do
            "gateway": {"ray_actor_options": {"num_cpus": 0.1}, "max_ongoing_requests": 2, "max_queued_requests": 2,
                        "retry_after_s": 2},
            "retrievers": [
                # a test holds its calls (`holding`) to fill the gateway's 2 + 2 for as long as it needs
                synthetic("slowish", batch={"max_batch_size": 1, "max_concurrent_batches": 8},
                          hold=str(HOLDS / "slowish"), timeout_ms=120_000),
            ],
        },
        base_dir=Path("."),
    )
    serve.run(app_from_config(config, api_keys=[]), name="tight", route_prefix="/tight")
    return cluster + "/tight"


@pytest.fixture(scope="session")
def elastic_url(cluster) -> str:
    """One retriever that serves one request at a time per replica, autoscaled 1..3 on short delays."""
    config = parse_config(
        {
            "app_name": "elastic",
            "cache": None,  # every search reaches the retrievers: these apps test what they do
            "gateway": {"ray_actor_options": {"num_cpus": 0.1}},
            "retrievers": [
                synthetic(
                    "busy", delay_ms=300, timeout_ms=10_000, max_ongoing_requests=4,
                    batch={"max_batch_size": 1},
                    autoscaling_config={
                        "min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 1,
                        "upscale_delay_s": 1, "downscale_delay_s": 3,
                        "metrics_interval_s": 0.5, "look_back_period_s": 2,
                    },
                ),
            ],
        },
        base_dir=Path("."),
    )
    serve.run(app_from_config(config, api_keys=[]), name="elastic", route_prefix="/elastic")
    return cluster + "/elastic"


@pytest.fixture(scope="session")
def sharded_data(tmp_path_factory) -> Path:
    """The split collection's own copy of the corpus: a test takes it away from the shards alone."""
    path = tmp_path_factory.mktemp("shard-data") / "corpus.jsonl"
    shutil.copyfile(TINYBEIR / "corpus.jsonl", path)
    return path


@pytest.fixture(scope="session")
def sharded_url(cluster, sharded_data, tmp_path_factory) -> str:
    """The same dense collection twice: whole, and split by document over two shard deployments."""
    dense = {"kind": "dense", "data": str(TINYBEIR / "corpus.jsonl"), "top_k": 10,
             "ray_actor_options": {"num_cpus": 0.2}, "timeout_ms": 5000}
    config = parse_config(
        {
            "app_name": "sharded",
            "cache": None,  # every search reaches the retrievers: these apps test what they do
            "cache_dir": str(tmp_path_factory.mktemp("shard-cache")),
            "gateway": {"ray_actor_options": {"num_cpus": 0.1}},
            "retrievers": [{"name": "whole", **dense},
                           {"name": "split", "shards": 2, **dense, "data": str(sharded_data)}],
        },
        base_dir=Path("."),
    )
    prepare_indexes(config, progress=False)
    serve.run(app_from_config(config, api_keys=[]), name="sharded", route_prefix="/sharded")
    return cluster + "/sharded"


# -- each session app goes once the last test that needs it has run --------------------------------
# Every deployed replica costs CPU while idle (Ray's metrics, Serve's health checks, the gateway's own
# loops); on two cores, apps kept to the session's end slowed every later module.
SESSION_APPS = {"base_url": manifest_application()["name"], "faults_url": "faults", "off_url": "off",
                "guard_url": "guard", "watch_url": "watch", "tight_url": "tight", "elastic_url": "elastic",
                "sharded_url": "sharded"}
_last_use: dict[str, list[str]] = {}  # test id -> the apps no later test needs


def pytest_collection_modifyitems(session, config, items) -> None:
    last = {fixture: item.nodeid for item in items for fixture in SESSION_APPS if fixture in item.fixturenames}
    _last_use.clear()
    for fixture, nodeid in last.items():
        _last_use.setdefault(nodeid, []).append(SESSION_APPS[fixture])


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem) -> None:
    for app in _last_use.get(item.nodeid, []):
        if ray.is_initialized() and app in serve.status().applications:
            serve.delete(app)
