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

A replica serves one index version at a time and changes it while serving (actors/versions.py).
It opens the version the app's VersionHub has pinned, or the link's when none is pinned yet, and
follows the pin: a new one is opened and verified in a worker thread beside the one being served,
then swapped in with one assignment. A batch already running finishes on the version it started
with, and every answer says which version searched it (`Searched`). For that moment both versions
are in memory.
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
from actors.delta import LiveRetriever
from actors.embedder import limit_threads
from actors.errors import Cancelled, Conflict, DataError, RagError
from actors.factory import RetrieverSpec, fingerprint, open_retriever, verify_version
from actors.index import mark_in_use, swap_in, verify
from actors.types import CancelToken, Hit, Query, Searched, Unavailable
from actors.versions import (
    SYNC_WAIT_S,
    is_merged,
    log_dir,
    merged_link,
    merged_version,
    reloadable,
    saved_pin,
    version_dir,
    version_now,
)

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

    async def __call__(self, queries: Sequence[Query], search: Callable[..., list[list[Hit]]] | None = None
                       ) -> list[list[Hit]]:
        """`search` (default: the runner's own) on `queries` in a worker thread."""
        async with self._slots:
            cancel = CancelToken()
            # Encoding and index search hold the GIL for milliseconds: keep them off the event loop.
            work = asyncio.ensure_future(asyncio.to_thread(search or self._search, queries, cancel=cancel))
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
    async def __init__(  # type: ignore[misc]  # Serve awaits an async constructor
        self, spec: RetrieverSpec, *, num_cpus: float = 1.0, max_concurrent_batches: int = 1, versions: Any = None
    ) -> None:
        """`versions`: the handle of the app's VersionHub (actors/versions.py); None: serve the link's version."""
        self.spec = spec
        self.threads = limit_threads(num_cpus, torch=spec.needs_model)
        context = serve.get_replica_context()
        self.deployment, self.member = context.deployment, context.replica_id.unique_id
        self.versions = versions
        self.retriever: Retriever | None = None
        self.version: str | None = None  # the index version this replica serves (actors/versions.py)
        self.fingerprint: str | None = None  # what the result cache keys this retriever's answers by
        self.start_error: str | None = None
        pinned = await self._pinned()
        self.released = await self._released() if spec.writes_dir is not None else 0
        if pinned is not None and (spec.artifacts is not None or is_merged(pinned)):
            try:
                version_dir(spec, pinned)
            except DataError as exc:  # deleted by hand: serving the current one beats not serving at all
                logger.error("retriever %s: %s; opening the current version instead", spec.name, exc.message)
                pinned = None
        try:
            self.retriever, self.version, self.fingerprint = await asyncio.to_thread(self._open, pinned)
        except Exception as exc:
            # Stay up and say why, instead of failing the whole app: the gateway degrades answers
            # without this retriever, and /v1/retrievers shows the reason.
            self.start_error = f"failed to start: {type(exc).__name__}: {exc}"[:500]
            logger.error("retriever %s (%s) %s", spec.name, spec.kind, self.start_error)
        self.runner: SearchRunner | None = None
        self._max_concurrent = max_concurrent_batches
        if self.retriever is not None:
            self.runner = SearchRunner(self.retriever.search, max_concurrent=max_concurrent_batches)
            logger.info("retriever %s (%s) ready, version %s: %s", spec.name, spec.kind, self.version,
                        self.retriever.describe())
        loop = asyncio.get_running_loop()
        self._following = loop.create_task(self._follow()) if versions is not None else None
        self._writing = loop.create_task(self._follow_writes()) if versions is not None and spec.writes_dir else None

    async def _pinned(self) -> str | None:
        """The version the other replicas serve, as the hub has it pinned; None: none yet, or no hub."""
        if self.versions is None or self.spec.kind == "synthetic":
            return None
        try:
            pins = await asyncio.wait_for(self.versions.sync.remote(self.member, {self.deployment: None}), 30)
            return pins.get(self.deployment)
        except Exception as exc:  # no hub to ask: serve the link's version, and report it when the hub is back
            saved = saved_pin(self.spec)
            logger.warning("retriever %s: the version hub did not answer (%s); opening %s", self.spec.name, exc,
                           saved or "the current version")
            return saved

    async def _released(self) -> int:
        """The last log record this replica may apply now: the hub's say, or, without a hub, the log's end."""
        try:
            return await asyncio.wait_for(self.versions.released_now.remote(), 30)
        except Exception as exc:
            logger.warning("retriever %s: the write hub did not answer (%s); replaying the whole log",
                           self.spec.name, exc)
            return sys.maxsize

    def _open(self, version: str | None) -> tuple[Retriever, str | None, str]:
        """Load and warm up `version` (None: the link's now); returns (retriever, version, fingerprint).

        Runs in a worker thread, beside the version being served. For artifacts, the version is named
        before opening: if a rebuild swaps the link in between, this still opens the named one.
        """
        spec = self.spec
        now = version_now(spec) if spec.kind != "synthetic" else None
        if spec.artifacts is None and not is_merged(version):
            if version is not None and version != now:
                # a data file has no older versions on disk: open it as it is now, and say which version that is
                logger.warning("retriever %s: %s was pinned, but its data file is now %s; serving the file as it is",
                               spec.name, version, now)
            version = now
        version = version or now
        pinned = version if spec.artifacts is not None or is_merged(version) else None
        retriever = open_retriever(spec, version=pinned)
        if spec.writes_dir is not None:  # the version, and the log's writes after what it holds
            manifest = verify(version_dir(spec, version)) if version is not None and is_merged(version) else {}
            retriever = LiveRetriever(retriever, deployment=self.deployment, base_seq=manifest.get("log_seq", 0),
                                      touched=manifest.get("log_touched", 0), log_dir=log_dir(spec.writes_dir))
            retriever.catch_up(self.released)
        self._mark(version)
        if spec.kind != "synthetic":  # synthetic retrievers only sleep: nothing lazy to warm up
            # Pay torch's and FAISS's lazy first-call set-up here, not in the first user's deadline.
            retriever.search([self._warm_up_query(retriever)])
        return retriever, version, fingerprint(spec, pinned)

    async def _follow(self) -> None:
        """Report what this replica serves to the hub, and open each version it pins, forever."""
        known = self.version  # the pin this replica last acted on: opened, or failed to open
        failed: dict[str, tuple[str, str]] = {}
        while True:
            try:
                pins = await self.versions.sync.remote(
                    self.member, {self.deployment: self.version}, known={self.deployment: known}, failed=failed,
                    wait_s=SYNC_WAIT_S,
                )
            except Exception as exc:  # the hub is restarting: report again shortly
                logger.debug("retriever %s: version hub: %s", self.spec.name, exc)
                await asyncio.sleep(1.0)
                continue
            await asyncio.to_thread(self._mark, self.version)  # renewed at least every SYNC_WAIT_S
            pin = pins.get(self.deployment)
            if pin is None or pin == known:
                continue
            known, failed = pin, {}
            if pin == self.version:
                continue
            try:
                retriever, version, fp = await asyncio.to_thread(self._open, pin)
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"[:500]
                logger.error("retriever %s: version %s refused, still serving %s: %s",
                             self.spec.name, pin, self.version, reason)
                failed = {self.deployment: (pin, reason)}
                continue
            before, served = self.version, self.retriever
            if isinstance(retriever, LiveRetriever) and isinstance(served, LiveRetriever):
                # On the loop, with no await before the swap: the new version never answers with fewer
                # writes than the one it replaces had applied (a few records at most, read from the log).
                retriever.catch_up(served.applied)
            # The swap: searches already running finish on the retriever they started with.
            self.retriever, self.version, self.fingerprint = retriever, version, fp
            if self.runner is None:  # it had failed to start: a fixed index brings it back
                self.runner = SearchRunner(retriever.search, max_concurrent=self._max_concurrent)
                self.start_error = None
            logger.info("retriever %s: now serving version %s (was %s)", self.spec.name, version, before)

    async def _follow_writes(self) -> None:
        """Apply the log's new records as the hub releases them, forever (actors/writes.py)."""
        while True:
            live = self.retriever
            knows = live.applied if isinstance(live, LiveRetriever) else 0
            try:
                answer = await self.versions.follow_writes.remote(
                    self.member, knows=knows, deployment=self.deployment, wait_s=SYNC_WAIT_S)
            except Exception as exc:  # the hub is restarting: ask again shortly
                logger.debug("retriever %s: write hub: %s", self.spec.name, exc)
                await asyncio.sleep(0.5)
                continue
            self.released = answer["released"]
            live = self.retriever  # the version may have been swapped meanwhile: it catches up here
            if isinstance(live, LiveRetriever) and answer["released"] > live.applied:
                try:
                    await asyncio.to_thread(live.catch_up, answer["released"])
                except Exception as exc:  # a record this replica cannot apply: say so, and keep serving
                    logger.error("retriever %s: applying the write log failed: %s", self.spec.name, exc)
                    await asyncio.sleep(1.0)

    async def merge(self) -> dict[str, Any]:
        """Write this replica's base and delta as one new version, for the hub to pin: {version, log_seq}."""
        live = self.retriever
        if not isinstance(live, LiveRetriever):
            raise Conflict(f"{self.spec.name} takes no writes, or failed to start: nothing to merge")
        spec = self.spec

        def build(directory: Any) -> dict[str, Any]:
            fields = live.save(directory)
            return {**fields, "model": fields.get("model", spec.model_name), "merged_from": self.version,
                    **({"shard": list(spec.shard)} if spec.shard else {})}

        directory = await asyncio.to_thread(swap_in, merged_link(spec), build=build)
        manifest = await asyncio.to_thread(verify, directory)
        return {"version": merged_version(spec, directory), "log_seq": manifest["log_seq"]}

    def _mark(self, version: str | None) -> None:
        """Keep `version`'s directory from being deleted by later ingests while this replica serves it."""
        if (self.spec.artifacts is not None or is_merged(version)) and version is not None:
            try:
                mark_in_use(version_dir(self.spec, version))
            except DataError:
                pass

    def _warm_up_query(self, retriever: Retriever) -> Query:
        if self.spec.shared_encoder:  # a unit vector of the index's dimension stands in for an encoded query
            dim = retriever.describe()["dim"]
            return Query(text="warm-up query", top_k=1, vector=np.eye(1, dim, dtype=np.float32)[0])
        return Query(text="warm-up query", top_k=1)

    async def search(self, queries: list[Query]) -> Searched | Unavailable:
        """One hit list per query, in order, and the version that answered."""
        if self.runner is None or self.retriever is None:
            # An answer, not an exception: Serve would log a traceback for every request.
            return Unavailable(f"{self.spec.name} {self.start_error}")
        retriever, version = self.retriever, self.version  # one version for the whole batch
        # read before the search: never newer than its hits
        seq = retriever.touched if isinstance(retriever, LiveRetriever) else None
        return Searched(await self.runner(queries, retriever.search), version, seq)

    async def check_version(self) -> dict[str, Any]:
        """Verify the version the link points to now, without serving it: {version, model, dim}.

        Raises Conflict naming the problem: a synthetic retriever, a missing or corrupt file, or
        another model than this retriever's."""
        reloadable(self.spec)
        try:
            version = await asyncio.to_thread(version_now, self.spec)
            if self.spec.artifacts is None:  # a data file: each replica checks it as it opens it
                return {"version": version, "model": None, "dim": None}
            manifest = await asyncio.to_thread(verify_version, self.spec, version)
        except RagError as exc:
            raise Conflict(f"{self.spec.name}: the new version is refused: {exc.message}") from None
        return {"version": version, "model": manifest.get("model"), "dim": manifest.get("dim")}

    def version_now(self) -> str:
        """The version the link points to now (cheap: one readlink), for `reload.watch_s`."""
        return version_now(self.spec)

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
            "version": self.version,
            "replica": self.member,
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
