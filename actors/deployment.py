"""The Serve deployment that hosts one retriever.

Each configured retriever becomes its own deployment, named after it, built from this class with
`RetrieverDeployment.options(name=..., ray_actor_options=..., ...)`. Every replica is a Ray actor
that loads its index (and, with `encoder: local`, its model) once, in `__init__`.

Calls carry a batch: the gateway groups the concurrent requests for this retriever into one call
(serve_app/lanes.py), so this replica runs `retriever.search` once per group, in a worker thread,
at most `max_concurrent_batches` at a time, and its event loop stays free to accept and cancel.

A cancelled call (the gateway's deadline passed) cannot stop its thread, so `SearchRunner` hands
each search a `CancelToken` and sets it: the search stops at its next stage or batch boundary, and
the call keeps its slot until it has. `/v1/retrievers` shows the counts (`calls`).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import ray
from ray import serve

from actors.base import Retriever
from actors.embedder import limit_threads
from actors.errors import Cancelled
from actors.factory import RetrieverSpec, fingerprint, open_retriever
from actors.types import CancelToken, Hit, Query, Unavailable

logger = logging.getLogger("ray.serve")


class SearchRunner:
    """Runs searches in worker threads, at most `max_concurrent` at a time, and stops abandoned ones.

    `counts`: `started` searches, `running` now, `cancelled` (the caller gave up while it ran),
    and `stopped_early` (of those, the ones that stopped at a boundary, raising Cancelled, rather
    than running to the end).
    """

    def __init__(self, search: Callable[..., list[list[Hit]]], *, max_concurrent: int = 1) -> None:
        self._search = search
        self._slots = asyncio.Semaphore(max_concurrent)
        self.counts = dict.fromkeys(("started", "running", "cancelled", "stopped_early"), 0)

    async def __call__(self, queries: Sequence[Query]) -> list[list[Hit]]:
        async with self._slots:
            cancel = CancelToken()
            # Encoding and index search hold the GIL for milliseconds: keep them off the event loop.
            work = asyncio.ensure_future(asyncio.to_thread(self._search, queries, cancel=cancel))
            self.counts["started"] += 1
            self.counts["running"] += 1
            work.add_done_callback(self._ended)
            try:
                return await asyncio.shield(work)
            except asyncio.CancelledError:
                # Tell the search to stop, and hold the slot until it has: max_concurrent bounds the
                # threads at work, not just the calls someone still waits for.
                cancel.cancel()
                self.counts["cancelled"] += 1
                await asyncio.wait([work])
                raise

    def _ended(self, work: asyncio.Future) -> None:
        self.counts["running"] -= 1
        if not work.cancelled() and isinstance(work.exception(), Cancelled):
            self.counts["stopped_early"] += 1


@serve.deployment(logging_config={"enable_access_log": False})
class RetrieverDeployment:
    def __init__(self, spec: RetrieverSpec, *, num_cpus: float = 1.0, max_concurrent_batches: int = 1) -> None:
        self.spec = spec
        self.threads = limit_threads(num_cpus, torch=spec.needs_model)
        self.retriever: Retriever | None = None
        self.start_error: str | None = None
        self.fingerprint: str | None = None  # what the result cache keys this retriever's answers by
        try:
            # Named before opening: if a rebuild swaps in between, answers of the newer index go under the
            # older name, which readers of the newer one never ask for; never the other way round.
            self.fingerprint = fingerprint(spec)
            self.retriever = open_retriever(spec)
            if spec.kind != "synthetic":  # synthetic retrievers only sleep: nothing lazy to warm up
                # Pay torch's and FAISS's lazy first-call set-up here, not in the first user's deadline.
                self.retriever.search([self._warm_up_query(self.retriever)])
        except Exception as exc:
            # Stay up and say why, instead of failing the whole app: the gateway degrades answers
            # without this retriever, and /v1/retrievers shows the reason.
            self.retriever = None
            self.start_error = f"failed to start: {type(exc).__name__}: {exc}"[:500]
            logger.error("retriever %s (%s) %s", spec.name, spec.kind, self.start_error)
        self.runner: SearchRunner | None = None
        if self.retriever is not None:
            self.runner = SearchRunner(self.retriever.search, max_concurrent=max_concurrent_batches)
            logger.info("retriever %s (%s) ready: %s", spec.name, spec.kind, self.retriever.describe())

    def _warm_up_query(self, retriever: Retriever) -> Query:
        if self.spec.shared_encoder:  # a unit vector of the index's dimension stands in for an encoded query
            dim = retriever.describe()["dim"]
            return Query(text="warm-up query", top_k=1, vector=np.eye(1, dim, dtype=np.float32)[0])
        return Query(text="warm-up query", top_k=1)

    async def search(self, queries: list[Query]) -> list[list[Hit]] | Unavailable:
        """One hit list per query, in order."""
        if self.runner is None:
            # An answer, not an exception: Serve would log a traceback for every request.
            return Unavailable(f"{self.spec.name} {self.start_error}")
        return await self.runner(queries)

    def describe(self) -> dict[str, Any]:
        base = {
            "name": self.spec.name,
            "kind": self.spec.kind,
            "threads": self.threads,
            "encoder": "shared" if self.spec.shared_encoder else "local" if self.spec.needs_model else None,
            "torch_loaded": "torch" in sys.modules,  # false where no model is needed: the point of `encoder: shared`
            "node_id": ray.get_runtime_context().get_node_id(),  # where the scheduler placed this replica
            "calls": dict(self.runner.counts) if self.runner else {},
            "fingerprint": self.fingerprint,
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
