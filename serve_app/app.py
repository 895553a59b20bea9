"""Build the Serve application from a config: one deployment per retriever plus the gateway.

The same builder serves every entry point:

    ragfan serve --config my.yaml
    serve run serve_app.app:build_app config=my.yaml
    serve deploy cluster_configs/serve.yaml      (import_path: serve_app.app:build_app)
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from ray.serve import Application

from actors.deployment import RetrieverDeployment
from serve_app.config import AppConfig, check_files, load_config
from serve_app.gateway import Gateway


class BuildArgs(BaseModel):
    config: str | None = None  # path to a ragfan YAML; None is the embedded default


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Application builder for `serve run` / `serve deploy` / KubeRay serveConfigV2."""
    config = load_config(BuildArgs.model_validate(args or {}).config)
    check_files(config)
    return app_from_config(config)


def app_from_config(config: AppConfig) -> Application:
    handles = {}
    if config.enabled:  # disabled: only the gateway runs, and no model is loaded anywhere
        for r in config.retrievers:
            deployment = RetrieverDeployment.options(
                name=r.name,
                ray_actor_options=r.ray_actor_options.to_ray(),
                **r.serve_options(),
            )
            handles[r.name] = deployment.bind(
                r.spec(config.cache_dir),
                num_cpus=r.ray_actor_options.num_cpus,
                max_batch_size=r.batch.max_batch_size,
                batch_wait_timeout_s=r.batch.batch_wait_timeout_s,
            )
    gateway = Gateway.options(
        name="gateway",
        ray_actor_options=config.gateway.ray_actor_options.to_ray(),
        **config.gateway.serve_options(),
    )
    return gateway.bind(config, handles)


def prepare_indexes(config: AppConfig, *, progress: bool = True) -> None:
    """Build missing dense indexes here, with progress bars, before replicas start.

    Replicas would build them too, but a person watching `ragfan serve` should see the work.
    """
    from actors.factory import dense_index_dir, open_retriever

    if not config.enabled:
        return
    for r in config.retrievers:
        if r.kind == "dense":
            spec = r.spec(config.cache_dir)
            if not (dense_index_dir(spec) / "manifest.json").is_file():
                open_retriever(spec, progress=progress)
