"""The Serve deployment that hosts one retriever.

Each configured retriever becomes its own deployment, named after it, built from this class with
`RetrieverDeployment.options(name=..., ray_actor_options=..., ...)`. Every replica is a Ray actor
that loads its model and index once, in `__init__`. Concurrent calls are gathered by `@serve.batch`
so the model encodes them in one call, and that call runs in a worker thread so the replica's
event loop stays free to accept and cancel requests.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import ray
from ray import serve

from actors.base import Retriever
from actors.embedder import limit_threads
from actors.factory import RetrieverSpec, open_retriever
from actors.types import FilterValue, Hit, Query, Unavailable

logger = logging.getLogger("ray.serve")


@serve.deployment(logging_config={"enable_access_log": False})
class RetrieverDeployment:
    def __init__(
        self,
        spec: RetrieverSpec,
        *,
        num_cpus: float = 1.0,
        max_batch_size: int = 16,
        batch_wait_timeout_s: float = 0.01,
        max_concurrent_batches: int = 1,
    ) -> None:
        self.spec = spec
        self.threads = limit_threads(num_cpus)
        self.retriever: Retriever | None = None
        self.start_error: str | None = None
        try:
            self.retriever = open_retriever(spec)
            if spec.kind != "synthetic":  # synthetic retrievers only sleep: nothing lazy to warm up
                # Pay torch's and FAISS's lazy first-call set-up here, not in the first user's deadline.
                self.retriever.search([Query(text="warm-up query", top_k=1)])
        except Exception as exc:
            # Stay up and say why, instead of failing the whole app: the gateway degrades answers
            # without this retriever, and /v1/retrievers shows the reason.
            self.retriever = None
            self.start_error = f"failed to start: {type(exc).__name__}: {exc}"[:500]
            logger.error("retriever %s (%s) %s", spec.name, spec.kind, self.start_error)
        # Built per replica (not as a decorated method) so that config sets every batching knob,
        # `max_concurrent_batches` included, which Serve cannot change after decoration.
        self._search_batch = serve.batch(
            max_batch_size=max_batch_size,
            batch_wait_timeout_s=batch_wait_timeout_s,
            max_concurrent_batches=max_concurrent_batches,
        )(self._run_batch)
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self.in_flight = 0
        if self.retriever is not None:
            logger.info("retriever %s (%s) ready: %s", spec.name, spec.kind, self.retriever.describe())

    async def search(
        self, text: str, top_k: int = 10, filters: Mapping[str, FilterValue] | None = None
    ) -> list[Hit] | Unavailable:
        if self.retriever is None:
            # An answer, not an exception: Serve would log a traceback for every request.
            return Unavailable(f"{self.spec.name} {self.start_error}")
        # A lone request should not wait for company: only hold a batch open when others are in flight.
        self.in_flight += 1
        self._search_batch.set_batch_wait_timeout_s(self.batch_wait_timeout_s if self.in_flight > 1 else 0.0)
        try:
            return await self._search_batch(Query(text=text, top_k=top_k, filters=filters))
        finally:
            self.in_flight -= 1

    async def _run_batch(self, queries: list[Query]) -> list[list[Hit]]:
        # Encoding and index search hold the GIL for milliseconds to seconds: keep them off the loop.
        return await asyncio.to_thread(self.retriever.search, queries)

    def describe(self) -> dict[str, Any]:
        base = {
            "name": self.spec.name,
            "kind": self.spec.kind,
            "threads": self.threads,
            "node_id": ray.get_runtime_context().get_node_id(),  # where the scheduler placed this replica
            **({"shard": list(self.spec.shard)} if self.spec.shard else {}),
        }
        if self.retriever is None:
            return {**base, "error": self.start_error}
        return {**base, **self.retriever.describe()}

    def check_health(self) -> None:
        """Called by Serve periodically; raising marks the replica unhealthy and replaces it.

        A replica that failed to start stays up: a new one would fail the same way, and this one
        reports why. Fix the index or model and redeploy.
        """
        if self.retriever is not None:
            self.retriever.check()
