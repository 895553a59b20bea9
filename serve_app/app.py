"""Build the Serve application from a config: one deployment per retriever plus the gateway.

The same builder serves every entry point:

    ragfan serve --config my.yaml
    serve run serve_app.app:build_app config=my.yaml
    serve deploy cluster_configs/serve.yaml      (import_path: serve_app.app:build_app)
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import cache, partial
from pathlib import Path
from typing import Any

import ray
from fastapi import FastAPI
from pydantic import BaseModel
from ray import serve
from ray.serve import Application, Deployment

import actors
from actors.encoder import EncoderDeployment, GatewayEncoder, encoder_name
from actors.metrics import ray_instruments
from actors.versions import VersionHub, log_dir
from actors.writes import WriteHub
from serve_app import __version__
from serve_app.config import AppConfig, check_startable, file_problems, load_config
from serve_app.gateway import Gateway
from serve_app.http import build_api, digest, load_api_keys
from serve_app.telemetry import PUSH_INTERVAL_S, StatsHub, Telemetry

logger = logging.getLogger("ray.serve")


@serve.deployment(logging_config={"enable_access_log": False})
@serve.ingress()
class GatewayDeployment(Gateway):
    """A gateway replica: handle calls reach `search`, `retrievers` and `stats`; HTTP reaches the
    FastAPI app that `build_api` makes for this replica once it is constructed.

    With `gateway.metrics` on, it records ragfan's metrics through Ray (`ray.serve.metrics`) and
    pushes its counts to the app's stats deployment every PUSH_INTERVAL_S, for GET /v1/stats.
    """

    def __init__(
        self,
        config: AppConfig,
        retrievers: dict[str, list[Any]],
        encoders: dict[str, Any] | None = None,
        *,
        stats_hub: Any = None,
        api_key_digests: tuple[bytes, ...] = (),
        versions: Any = None,
    ) -> None:
        telemetry = Telemetry.of(config, instruments=ray_instruments()) if config.gateway.metrics else None
        context = serve.get_replica_context()
        encoders = {**(encoders or {}), **_gateway_encoders(config, {})}
        super().__init__(config, retrievers, encoders, telemetry=telemetry, stats_hub=stats_hub,
                         replica=context.replica_id.unique_id, versions=versions,
                         live=partial(live_replicas, context.app_name))
        self.api_key_digests = api_key_digests
        loop = asyncio.get_running_loop()
        self._pushing = loop.create_task(self._push_forever()) if telemetry else None
        self._following = loop.create_task(self._forever(self.follow_versions, "version hub", 1.0)) \
            if versions is not None else None
        # a disabled app has no hub: nothing to follow, even where its config has writes on
        self._writing = loop.create_task(self._forever(self.follow_writes, "write hub", 0.5)) \
            if versions is not None and config.writes_dir else None
        self.app_name = context.app_name
        self._watching: list[asyncio.Task] = []
        self._watch()

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """A changed config applied to the running app (`ragfan apply`) arrives here, not as a restart:
        Serve calls this on every replica, and on each replica it starts later. The deployments of
        retrievers and encoders new to this replica are reached by name."""
        config = AppConfig.model_validate(user_config["config"])
        if config == self.config:
            return
        lanes, encoders = self.lanes, self.encoders
        handles = {
            r.name: lanes[r.name].handles if r.name in lanes and lanes[r.name].deployments == r.deployment_names()
            else [serve.get_deployment_handle(d, self.app_name) for d in r.deployment_names()]
            for r in config.retrievers
        } if config.enabled else {}
        kept = {m: lane.handle for m, lane in encoders.items() if config.encoder == self.config.encoder}
        models = {
            m: kept[m] if m in kept else serve.get_deployment_handle(encoder_name(m), self.app_name)
            for m in config.encoder_deployments
        } | _gateway_encoders(config, kept) if config.enabled else {}
        self.configure(config, handles, models)
        self._watch()
        logger.info("gateway: applied a changed config: %d retrievers (%s)", len(config.retrievers),
                    ", ".join(config.names))

    def _watch(self) -> None:
        """One task per retriever with `reload.watch_s`, for the config served now."""
        for task in self._watching:
            task.cancel()
        self._watching = [
            asyncio.get_running_loop().create_task(self.reloader.watch(r.name, r.reload.watch_s))
            for r in self.config.retrievers if self.versions is not None and r.reload.watch_s
        ]

    async def _forever(self, follow: Any, hub: str, pause_s: float) -> None:
        """Call `follow` (one long call to the hub) again and again; after a failure, again in `pause_s`."""
        while True:
            try:
                await follow()
            except Exception as exc:  # the hub restarting: follow again shortly
                logger.debug("gateway: %s: %s", hub, exc)
                await asyncio.sleep(pause_s)

    async def _push_forever(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(PUSH_INTERVAL_S)
            try:
                await self.push_stats()
                failing = False
            except Exception as exc:  # the hub restarting: the counts wait for the next push
                if not failing:
                    logger.warning("gateway: could not push stats to the stats deployment: %s", exc)
                failing = True

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api(self, key_digests=self.api_key_digests)


# The app's hub: one small replica that every other one reaches.
# - It holds the VersionHub: which index version each retriever deployment serves (actors/versions.py).
#   Every retriever replica and gateway replica holds one long call here at all times (VersionHub.sync),
#   so the limit is far above the replica count; each call costs an idle coroutine.
# - It also holds the StatsHub behind GET /v1/stats (serve_app/telemetry.py): each gateway replica pushes
#   to it every PUSH_INTERVAL_S. It had a deployment of its own until issue 21: a Serve replica costs
#   about 140 MB of memory at rest, and this work fits in an idle coroutine of the hub.
@serve.deployment(name="versions", num_replicas=1, ray_actor_options={"num_cpus": 0.05}, max_ongoing_requests=10_000,
                  logging_config={"enable_access_log": False})
class VersionsDeployment(VersionHub, StatsHub):
    """The app's hub: its VersionHub, and its StatsHub."""

    def __init__(self) -> None:
        VersionHub.__init__(self)
        StatsHub.__init__(self)


@serve.deployment(name="versions", num_replicas=1, ray_actor_options={"num_cpus": 0.05}, max_ongoing_requests=10_000,
                  logging_config={"enable_access_log": False})
class WritesDeployment(WriteHub, StatsHub):
    """The hub of an app with live writes: a VersionHub that also orders, logs and merges them
    (actors/writes.py), and the StatsHub."""

    def __init__(self, log_dir: str, deployments: list[str], *, max_docs: int, max_age_s: float) -> None:
        app = serve.get_replica_context().app_name
        WriteHub.__init__(self, Path(log_dir), deployments, max_docs=max_docs, max_age_s=max_age_s,
                          live=partial(live_replicas, app), replica=lambda d: serve.get_deployment_handle(d, app))
        StatsHub.__init__(self)
        self._merging = asyncio.get_running_loop().create_task(self.merge_forever())


_named: tuple[float, list[dict[str, str]]] = (-math.inf, [])  # when the cluster's named actors were listed, and them
NAMED_TTL_S = 0.5  # one listing serves every deployment of a /v1/retrievers, and a reload's polls for this long


async def live_replicas(app: str, deployment: str) -> list[str]:
    """The ids of the deployment's live replicas, from the names of their actors (a listing at most
    NAMED_TTL_S old: the GCS lists every named actor of the cluster each time)."""
    global _named
    if time.monotonic() - _named[0] > NAMED_TTL_S:
        _named = (time.monotonic(), await asyncio.to_thread(ray.util.list_named_actors, all_namespaces=True))
    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return [a["name"][len(prefix):] for a in _named[1] if a["name"].startswith(prefix)]


@serve.deployment(name="stats", num_replicas=1, ray_actor_options={"num_cpus": 0.05},
                  logging_config={"enable_access_log": False})
class StatsDeployment(StatsHub):
    """The StatsHub of a disabled app, which runs no hub: only its gateway. Each gateway replica
    reaches it once per PUSH_INTERVAL_S, plus once per read of /v1/stats."""


# Ray Serve settings every process of a ragfan cluster should run with. They are read when Serve's
# modules are imported, so they must be in the environment before Ray starts its workers; on a
# cluster started elsewhere (`ray start`, KubeRay) set them on every node.
# RAY_SERVE_THROUGHPUT_OPTIMIZED runs replica code and the router on the replica's own event loop
# and logs to files only. On 2 cores it halved the cost of a hop (docs/BENCHMARKS.md). ragfan's
# replicas never block their event loop (CPU work runs in worker threads), as that mode requires.
# Its log buffer is set back to one record, so that a warning reaches the log when it happens.
# The controller checks the HTTP proxy every second instead of every 10 s: it replaces a proxy after
# three failed checks in a row, so a dead one took HTTP down for ~25 s (benchmarks/ingress_kill.py).
SERVE_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1",
             "RAY_SERVE_PROXY_HEALTH_CHECK_PERIOD_S": "1"}
# That mode also serves HTTP through direct ingress, which at shutdown drains for 30 s so that a load
# balancer in front can stop routing. A cluster ragfan starts for itself (`ragfan serve`, bench,
# tests) has none, and Ctrl-C should take seconds; clusters started elsewhere keep Serve's default.
LOCAL_SERVE_ENV = {**SERVE_ENV, "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"}


@contextmanager
def serve_env() -> Iterator[None]:
    """LOCAL_SERVE_ENV in the environment while `ray.init` starts a local cluster, and only then.

    Ray's processes inherit it when they start. This process must not keep it: in a driver, the
    same setting makes Serve refuse synchronous handle calls, and its child processes (a script
    using RagClient, say) would inherit that too. Values already set in the environment win.
    """
    saved = {key: os.environ.get(key) for key in LOCAL_SERVE_ENV}
    for key, value in LOCAL_SERVE_ENV.items():
        os.environ.setdefault(key, value)
    try:
        yield
    finally:
        for key, before in saved.items():
            if before is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = before


class BuildArgs(BaseModel):
    config: str | None = None  # path to a ragfan YAML; None is the embedded default


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Application builder for `serve run` / `serve deploy` / KubeRay serveConfigV2."""
    config = load_config(BuildArgs.model_validate(args or {}).config)
    for name, problem in check_startable(config).items():
        logger.warning("retriever %s will not start: %s", name, problem)
    return app_from_config(config)


def _gateway_encoders(config: AppConfig, kept: Mapping[str, Any]) -> dict[str, Any]:
    """With `encoder.placement: gateway`, a model per shared model in this gateway replica (those in
    `kept` are reused); with `deployment`, none."""
    if config.encoder.placement != "gateway" or not config.enabled:
        return {}
    enc = config.encoder
    return {m: kept[m] if m in kept else GatewayEncoder(m, num_cpus=enc.ray_actor_options.num_cpus, backend=enc.backend)
            for m in config.shared_models}


def _deployment(decorated: Any) -> Deployment:
    """What `@serve.deployment` made of a class: a Deployment (Ray's type hints say it stays the class)."""
    return decorated


def app_from_config(config: AppConfig, api_keys: list[str] | None = None) -> Application:
    """The app for `config`. API keys: `api_keys`, else RAGFAN_API_KEYS and gateway.api_keys_file."""
    # Imported here, not at the top: the gateway's and the hub's replicas import this module, and the
    # retriever kinds bring FAISS, SciPy and bm25s, about 35 MB a process that never searches.
    from actors.deployment import RetrieverDeployment

    handles: dict[str, list[Any]] = {}
    encoders: dict[str, Any] = {}
    versions = None
    if config.enabled:  # disabled: only the gateway runs, and no model is loaded anywhere
        if config.writes_dir is not None:
            writes = config.writes
            hub_args = (str(log_dir(config.writes_dir)), [d for r in config.retrievers if r.name in config.writers
                                                          for d in r.deployment_names()])
            versions = _versioned(_deployment(WritesDeployment), *hub_args, writes.merge.model_dump()).bind(
                *hub_args, **writes.merge.model_dump())
        else:
            versions = _versioned(_deployment(VersionsDeployment)).bind()
        for r in config.retrievers:
            # One deployment per retriever, or one per shard (`corpus-shard0`, ...) of a sharded one.
            handles[r.name] = []
            for name, spec in zip(r.deployment_names(), config.specs(r), strict=True):
                args = {"num_cpus": r.ray_actor_options.num_cpus,
                        "max_concurrent_batches": r.batch.max_concurrent_batches}
                handles[r.name].append(_versioned(_deployment(RetrieverDeployment).options(
                    name=name, ray_actor_options=r.ray_actor_options.to_ray(), **r.serve_options()
                ), spec.model_dump_json(), args).bind(spec, **args, versions=versions))
        enc = config.encoder
        for model in config.encoder_deployments:  # one encoder per model that `encoder: shared` retrievers use
            options: dict[str, Any] = {
                "num_cpus": enc.ray_actor_options.num_cpus, "max_batch_size": enc.batch.max_batch_size,
                "batch_wait_timeout_s": enc.batch.batch_wait_timeout_s, "backend": enc.backend,
            }
            encoders[model] = _versioned(_deployment(EncoderDeployment).options(
                name=encoder_name(model), ray_actor_options=enc.ray_actor_options.to_ray(), **enc.serve_options()
            ), model, options).bind(model, **options)
    keys = load_api_keys(config.gateway.api_keys_file) if api_keys is None else api_keys
    digests = tuple(digest(k) for k in keys)  # only digests travel to the replicas (and Serve's stored config)
    # The retrievers, fusion, encoder and cache settings reach the gateway as `user_config`: a change to
    # them is applied by `reconfigure`, with no restart. Its own settings and keys are its code version.
    gateway = _versioned(_deployment(GatewayDeployment).options(
        name="gateway",
        ray_actor_options=config.gateway_actor_options().to_ray(),
        **config.gateway.serve_options(),
        user_config={"config": config.model_dump(mode="json")},
    ), config.gateway.model_dump_json(), config.enabled, [d.hex() for d in digests])
    hub = None
    if config.gateway.metrics:  # in the app's hub; a disabled app has no hub, so its stats get a replica of their own
        hub = versions if versions is not None else _versioned(_deployment(StatsDeployment)).bind()
    return gateway.bind(config, handles, encoders, stats_hub=hub, api_key_digests=digests, versions=versions)


@cache
def _source_digest() -> str:
    """A digest of ragfan's own code: a replica runs the code it started with, so new code is a new version."""
    digest = hashlib.sha256(__version__.encode())
    for package in (Path(actors.__file__).parent, Path(__file__).parent):
        for path in sorted(package.glob("*.py")):
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _versioned(deployment: Deployment, *arguments: Any) -> Deployment:
    """`deployment`, with a code version made of ragfan's code and the arguments its replicas start from.

    Serve replaces a deployment's replicas when its code version changes, and keeps them when it
    does not: a changed replica count is scaled, not restarted. `serve.run` gives a deployment with
    no version a random one, so applying a config again would restart every replica of the app
    (docs/RELOAD.md). Serve 2.60 no longer takes `version` in `.options()`, but still deploys the
    one a Deployment holds: set it there. tests/integration/test_apply.py checks that an unchanged
    deployment keeps its replicas, so a Ray that stops honouring it fails there.
    """
    blob = json.dumps([_source_digest(), *arguments], sort_keys=True, default=str)
    deployment._version = hashlib.sha256(blob.encode()).hexdigest()[:16]
    return deployment


def prepare_indexes(config: AppConfig, *, progress: bool = True) -> None:
    """Embed what replicas need and the cache lacks (dense indexes, graph vectors), before they start.

    The work goes to the same pool of Ray actors that `ragfan ingest` uses (one per free CPU or
    GPU), one pool per model, with progress bars; then the pool is gone and its memory with it.
    Replicas would build what is missing too, but one at a time, each loading the model. Starts a
    local Ray cluster if none is running.
    """
    from actors.factory import build_missing
    from actors.ingest import EmbedPool

    if not config.enabled:
        return
    broken = file_problems(config)
    pools: dict[str, EmbedPool] = {}  # its actors start on the first text to embed, not before
    try:
        for spec in (s for r in config.retrievers if r.name not in broken for s in r.specs(config.cache_dir)):
            if spec.model not in pools:
                pools[spec.model] = EmbedPool(spec.model, progress=progress)
            build_missing(spec, pools[spec.model].encode)
    finally:
        for pool in pools.values():
            pool.close()
