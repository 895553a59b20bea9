"""Build the Serve application from a config: one deployment per retriever plus the gateway.

The same builder serves every entry point:

    ragfan serve --config my.yaml
    serve run serve_app.app:build_app config=my.yaml
    serve deploy cluster_configs/serve.yaml      (import_path: serve_app.app:build_app)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pydantic import BaseModel
from ray.serve import Application

from actors.deployment import RetrieverDeployment
from serve_app.config import AppConfig, check_startable, file_problems, load_config
from serve_app.gateway import Gateway
from serve_app.guard import digest, load_api_keys

logger = logging.getLogger("ray.serve")


# Ray Serve settings every process of a ragfan cluster should run with. They are read when Serve's
# modules are imported, so they must be in the environment before Ray starts its workers; on a
# cluster started elsewhere (`ray start`, KubeRay) set them on every node.
# RAY_SERVE_THROUGHPUT_OPTIMIZED runs replica code and the router on the replica's own event loop
# and logs to files only. On 2 cores it halved the cost of a hop (docs/BENCHMARKS.md). ragfan's
# replicas never block their event loop (CPU work runs in worker threads), as that mode requires.
# Its log buffer is set back to one record, so that a warning reaches the log when it happens.
SERVE_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1"}
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
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class BuildArgs(BaseModel):
    config: str | None = None  # path to a ragfan YAML; None is the embedded default


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Application builder for `serve run` / `serve deploy` / KubeRay serveConfigV2."""
    config = load_config(BuildArgs.model_validate(args or {}).config)
    for name, problem in check_startable(config).items():
        logger.warning("retriever %s will not start: %s", name, problem)
    return app_from_config(config)


def app_from_config(config: AppConfig, api_keys: list[str] | None = None) -> Application:
    """The app for `config`. API keys: `api_keys`, else RAGFAN_API_KEYS and gateway.api_keys_file."""
    handles: dict[str, list[Any]] = {}
    if config.enabled:  # disabled: only the gateway runs, and no model is loaded anywhere
        for r in config.retrievers:
            # One deployment per retriever, or one per shard (`corpus-shard0`, ...) of a sharded one.
            handles[r.name] = [
                RetrieverDeployment.options(
                    name=name, ray_actor_options=r.ray_actor_options.to_ray(), **r.serve_options()
                ).bind(
                    spec,
                    num_cpus=r.ray_actor_options.num_cpus,
                    max_batch_size=r.batch.max_batch_size,
                    batch_wait_timeout_s=r.batch.batch_wait_timeout_s,
                    max_concurrent_batches=r.batch.max_concurrent_batches,
                )
                for name, spec in zip(r.deployment_names(), r.specs(config.cache_dir), strict=True)
            ]
    gateway = Gateway.options(
        name="gateway",
        ray_actor_options=config.gateway.ray_actor_options.to_ray(),
        **config.gateway.serve_options(),
    )
    keys = load_api_keys(config.gateway.api_keys_file) if api_keys is None else api_keys
    # Only digests travel to the replicas (and into Serve's stored config), never the keys.
    return gateway.bind(config, handles, api_key_digests=tuple(digest(k) for k in keys))


def prepare_indexes(config: AppConfig, *, progress: bool = True) -> None:
    """Build missing dense indexes here, with progress bars, before replicas start.

    Replicas would build them too, but a person watching `ragfan serve` should see the work.
    """
    from actors.factory import dense_index_dir, open_retriever

    if not config.enabled:
        return
    broken = file_problems(config)
    for r in config.retrievers:
        if r.kind == "dense" and r.data is not None and r.name not in broken:
            for spec in r.specs(config.cache_dir):
                if not (dense_index_dir(spec) / "manifest.json").is_file():
                    open_retriever(spec, progress=progress)
