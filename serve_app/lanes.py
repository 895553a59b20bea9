"""One retriever's call, and one model's encoding, as the gateway makes them.

A `RetrieverLane` owns everything around one retriever's call: the bound on calls in flight, the
circuit breaker, the batcher that groups concurrent requests into one call per group, the deadline,
the shard scatter and merge, and the log line when the retriever's health changes. The gateway
only validates, asks every selected lane, fuses and answers.

An `EncoderLane` batches query texts for one model's encoder deployment. Every lane of that model
awaits the same encoding of a request, so a query is encoded once, however many retrievers use it.

A batch query (`search_many`, `encode_many`) is one call downstream for all of its queries, with
each query's own deadline: one slot of the in-flight bound, one breaker outcome.

Handles are duck-typed (`handle.search.remote(queries)`, `handle.encode.remote(texts)`), so unit
tests drive lanes with the fake handle that ships with ragfan, `serve_app.testing.FakeHandle`, and no Ray.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import numpy as np

from actors.errors import RetrieverFailed
from actors.shards import merge as merge_shards
from actors.types import Filters, Hit, Query, Searched, Unavailable
from serve_app.batcher import Batcher
from serve_app.breaker import CIRCUIT_OPEN, CircuitBreaker
from serve_app.cache import Cache, cache_key
from serve_app.clock import now
from serve_app.fanout import Call, fan_out
from serve_app.outcome import MAX_ERROR_CHARS, Outcome, describe_error
from serve_app.schemas import CacheState
from serve_app.types import Status

logger = logging.getLogger("ray.serve")
# How long a lane trusts the index fingerprint its replicas reported before asking again. A
# redeployed retriever's new index is cached under its own fingerprint within this time.
FINGERPRINT_TTL_S = 10.0
# After the pinned version moved (a reload), how soon a lane asks again for the new version's
# fingerprint while its replicas still report the old one. Until then nothing is cached.
FINGERPRINT_RETRY_S = 0.25
DESCRIBE_TIMEOUT_S = 5.0  # how long a health check waits for a replica's description
# A sharded call stops waiting for slow shards a share of its remaining time (at least 20 ms) before
# its requests' deadline, so the shards that did answer are merged and reach the requests in time,
# even on a busy event loop.
SHARD_MARGIN_S = 0.02
SHARD_MARGIN_SHARE = 0.1


async def _await_cancelling(response: Any) -> Any:
    """Await a Serve response; if we are cancelled, cancel the request in the replica too."""
    try:
        return await response
    except asyncio.CancelledError:
        cancel = getattr(response, "cancel", None)
        if callable(cancel):
            cancel()
        raise


def slots(max_concurrent_batches: int, replicas: int) -> int:
    """Calls a lane keeps in flight: what the replicas run at once, plus one waiting behind them,
    so a replica starts its next batch the moment one ends instead of a round trip later."""
    return max_concurrent_batches * replicas + 1


class EncoderLane:
    """Encodes each request's query once for every lane of one model, batched across requests."""

    def __init__(self, model: str, handle: Any, *, max_batch_size: int, max_concurrent: int,
                 on_batch: Callable[[int], None] | None = None) -> None:
        self.model = model
        self.handle = handle
        self.batcher: Batcher[str, np.ndarray] = Batcher(
            self._send, max_batch_size=max_batch_size, max_concurrent=max_concurrent, on_batch=on_batch
        )

    async def _send(self, texts: list[str], deadline: float) -> list[np.ndarray]:
        return list(await _await_cancelling(self.handle.encode.remote(texts)))  # one row per text

    async def describe(self) -> Outcome:
        """What the encoder replica reports (model, dim, device), or why it does not answer."""
        return (await fan_out({self.model: Call(self.handle.describe.remote, DESCRIBE_TIMEOUT_S)}))[self.model]

    async def encode_many(self, texts: Sequence[str], *, timeout_s: float) -> dict[str, np.ndarray]:
        """Each text's vector, from one call for all of them; TimeoutError, or RetrieverFailed."""
        deadline = now() + timeout_s
        rows = await self.batcher.submit_many(texts, deadlines=[deadline] * len(texts))
        problem = next((r for r in rows if isinstance(r, BaseException)), None)
        if isinstance(problem, TimeoutError | asyncio.CancelledError):
            raise problem
        if problem is not None:
            raise RetrieverFailed(f"encoder for {self.model}: {describe_error(problem)}") from None
        return dict(zip(texts, rows, strict=True))  # type: ignore[arg-type]  # no exception is left


@dataclass(frozen=True, slots=True)
class Ask:
    """One search's question to one retriever: what the gateway hands a lane for each request."""

    text: str
    top_k: int
    filters: Filters | None = None
    timeout_ms: int | None = None  # the request's own deadline, when it lowers the lane's
    cache: bool = True  # false: the request neither reads nor fills the result cache


class Lookup(NamedTuple):
    """What the result cache held for a group of asks: each one's state, key, and hits (None: not there)."""

    states: list[CacheState]
    keys: list[str | None]
    found: list[list[Hit] | None]


@dataclass(frozen=True, slots=True)
class _Answer:
    """One query's answer from every shard of a retriever: merged hits, and which shards failed."""

    hits: list[Hit]
    coverage: float | None = None
    problems: str | None = None
    status: Status = "ok"  # "timeout" or "error" when no shard answered
    version: str | None = None  # the index version that answered: each shard's, joined by "|"


class RetrieverLane:
    def __init__(
        self,
        name: str,
        handles: Sequence[Any],
        *,
        top_k: int,
        timeout_ms: int,
        filter_keys: Sequence[str] = (),
        max_in_flight: int = 64,
        breaker: CircuitBreaker | None = None,
        batcher_options: dict[str, Any] | None = None,
        encoder: EncoderLane | None = None,
        vector_optional: bool = False,
        cache: Cache | None = None,
        deployments: Sequence[str] | None = None,
    ) -> None:
        self.name = name
        self.handles = list(handles)  # one, or one per shard
        self.deployments = list(deployments or [name])  # the deployment behind each handle
        self.top_k = top_k
        self.timeout_ms = timeout_ms
        self.filter_keys = set(filter_keys)
        self.max_in_flight = max_in_flight
        self.breaker = breaker or CircuitBreaker()
        self.encoder = encoder  # set when queries must carry vectors from the shared encoder
        self.vector_optional = vector_optional  # the graph: without a vector it still links entities by name
        self.batcher: Batcher[Query, _Answer] = Batcher(self._send, **(batcher_options or {}))
        self.in_flight = 0
        self.last_problem: str | None = None
        self.cache = cache
        # What the cache keys answers by: the index the replicas report (`describe`), refreshed
        # every FINGERPRINT_TTL_S; None until known, and then nothing is cached.
        self.fingerprint: str | None = None
        self.fingerprint_version: str | None = None  # the version that fingerprint names
        self._fingerprint_at = -math.inf
        # The version the app's VersionHub pins for each deployment (actors/versions.py), as the
        # gateway follows it; empty when there is no hub (unit tests): any version is then taken.
        self.pins: dict[str, str | None] = {}
        # With live writes: the last log record addressed to each deployment, as the gateway follows the
        # log (actors/writes.py). An answer is cached, and found, only under the records it reflects.
        self.touched: dict[str, int] = {}
        self._filling: dict[str, asyncio.Future] = {}  # keys being fetched: identical misses share one

    # -- requests ---------------------------------------------------------------------------------
    async def search_many(self, asks: Sequence[Ask], vectors: Awaitable[Any] | None = None,
                          looked_up: Lookup | None = None) -> list[Outcome]:
        """This retriever's answer to each of `asks`, as Outcomes, from one call that carries them all;
        never raises but for cancellation.

        The call takes one slot of the in-flight bound and records one breaker outcome. `vectors` is
        the shared encoding, a task every lane of the model awaits: each text's vector by text
        (`EncoderLane.encode_many`).
        """
        if self.in_flight >= self.max_in_flight:
            return [Outcome(self.name, "skipped", error=f"{self.max_in_flight} calls already in flight")] * len(asks)
        if not self.breaker.allow():
            return [Outcome(self.name, "skipped", error=CIRCUIT_OPEN)] * len(asks)
        self.in_flight += 1
        try:
            outcomes = await self._call(asks, vectors, looked_up)
        except asyncio.CancelledError:
            self.breaker.release()
            raise
        finally:
            self.in_flight -= 1
        # Only what the retriever was asked says anything about it: a cached answer says nothing.
        asked = [(a, o) for a, o in zip(asks, outcomes, strict=True) if o.cache != "hit"]
        if not asked:
            self.breaker.release()  # the cache answered: the retriever was not asked
            return outcomes
        if all(o.status == "timeout" and self._own_deadline(a) for a, o in asked):
            self.breaker.release()  # the callers' own shorter deadlines say nothing about the retriever
            return outcomes
        outcome = next((o for _, o in asked if o.status == "ok"), asked[0][1])  # the call answered, or why not
        was = self.breaker.state
        self.breaker.record(outcome.status == "ok")
        self._note(outcome, opened=was != "open" and self.breaker.state == "open")
        return outcomes

    def _own_deadline(self, ask: Ask) -> bool:
        return ask.timeout_ms is not None and ask.timeout_ms < self.timeout_ms

    async def _call(self, asks: Sequence[Ask], vectors: Awaitable[Any] | None, looked_up: Lookup | None
                    ) -> list[Outcome]:
        started = now()
        limits = [min(self.timeout_ms, a.timeout_ms or self.timeout_ms) / 1000 for a in asks]

        def elapsed() -> float:
            return round((now() - started) * 1000, 2)

        # The cache first, before the encoder: the gateway looks up every lane before it encodes
        # (`looked_up`), so a query that every lane of a model finds there is never encoded.
        states, keys, found = looked_up or await self.lookup(asks)
        outcomes: list[Outcome | None] = [
            Outcome(self.name, "ok", elapsed(), value=hits, cache="hit", version=self.answered_by)
            if hits is not None else None for hits in found
        ]
        todo = [i for i, o in enumerate(outcomes) if o is None]
        # an identical query already on its way to the retriever: wait for its answer instead
        waiting = {i: self._filling[k] for i in todo if (k := keys[i]) is not None and k in self._filling}

        async def fetch(indexes: list[int]) -> None:
            if indexes:
                got = await self._fetch([asks[i] for i in indexes], [keys[i] for i in indexes], vectors, started,
                                        [limits[i] for i in indexes])
                for i, outcome in zip(indexes, got, strict=True):
                    outcomes[i] = outcome

        await fetch([i for i in todo if i not in waiting])
        for i, future in waiting.items():
            outcomes[i] = await self._shared(future, started + limits[i], limits[i], elapsed)
        await fetch([i for i in waiting if outcomes[i] is None])  # the identical query in flight did not complete
        answered = [o for o in outcomes if o is not None]
        assert len(answered) == len(asks)  # every ask has its outcome now
        return [replace(o, cache=states[i]) if i in todo else o for i, o in enumerate(answered)]

    async def _fetch(self, asks: Sequence[Ask], keys: Sequence[str | None], vectors: Awaitable[Any] | None,
                     started: float, limits: Sequence[float]) -> list[Outcome]:
        """Ask the retriever for `asks` in one call; complete answers go into the cache under `keys`."""
        deadline = started + max(limits)

        def elapsed() -> float:
            return round((now() - started) * 1000, 2)

        filling = {key: asyncio.get_running_loop().create_future() for key in keys if key and key not in self._filling}
        self._filling.update(filling)
        try:
            try:
                async with asyncio.timeout_at(deadline):
                    encoded, note = await self._encoded(vectors, deadline)
            except TimeoutError:
                return [Outcome(self.name, "timeout", elapsed(),
                                error=f"no answer within {s * 1000:.0f} ms (waiting for the encoder)") for s in limits]
            except Exception as exc:
                return [Outcome(self.name, "error", elapsed(), error=describe_error(exc))] * len(asks)
            queries = [
                Query(text=a.text, top_k=max(self.top_k, a.top_k), filters=self._own(a.filters),
                      vector=encoded.get(a.text) if encoded is not None else None)
                for a in asks
            ]
            answers = await self.batcher.submit_many(queries, deadlines=[started + s for s in limits])
            for answer in answers:
                if isinstance(answer, asyncio.CancelledError):
                    raise answer
            outcomes = [_outcome(self.name, a, s, elapsed(), note) for a, s in zip(answers, limits, strict=True)]
            # Only complete answers are kept: never a timeout, an error, or a partial shard answer, nor one
            # that a version other than the key's fingerprint answered (a reload in progress).
            complete = {key: o.value for key, o in zip(keys, outcomes, strict=True)
                        if key and o.status == "ok" and (o.coverage or 1) >= 1 and note is None
                        and o.version == self.answered_by}
            for key, future in filling.items():
                future.set_result(complete.get(key))
        finally:
            # Every exit resolves what it registered (an encoder timeout or error, a cancellation):
            # None wakes the identical requests parked on a key, and each then fetches its own answer.
            for key, future in filling.items():
                del self._filling[key]
                if not future.done():
                    future.set_result(None)
        if complete and self.cache is not None:
            await self.cache.set_many(complete)
        return outcomes

    async def _shared(self, future: asyncio.Future, deadline: float, limit_s: float, elapsed: Callable[[], float]
                      ) -> Outcome | None:
        """An identical query's answer, fetched by another request; None when that did not complete."""
        try:
            async with asyncio.timeout_at(deadline):
                hits = await asyncio.shield(future)
        except TimeoutError:
            return Outcome(self.name, "timeout", elapsed(), error=f"no answer within {limit_s * 1000:.0f} ms")
        return None if hits is None else Outcome(self.name, "ok", elapsed(), value=hits)

    # -- the result cache ---------------------------------------------------------------------------
    def _key(self, ask: Ask) -> str | None:
        if self.cache is None or not ask.cache or self.fingerprint is None:
            return None
        state = self.fingerprint if not self.touched else f"{self.fingerprint}@{self.answered_by}"
        return cache_key(self.name, state, ask.text, max(self.top_k, ask.top_k), self._own(ask.filters))

    async def lookup(self, asks: Sequence[Ask]) -> Lookup:
        """What the result cache holds for `asks`: each one's state, key and hits."""
        if self.cache is None:
            return Lookup(["off"] * len(asks), [None] * len(asks), [None] * len(asks))
        await self._refresh_fingerprint()
        keys = [self._key(a) for a in asks]
        asked = [k for k in keys if k is not None]
        found = await self.cache.get_many(asked) if asked else []
        by_key = dict(zip(asked, found, strict=True)) if found is not None else {}
        states: list[CacheState] = [
            "off" if k is None else "bypass" if found is None else "hit" if by_key.get(k) is not None else "miss"
            for k in keys
        ]
        return Lookup(states, keys, [by_key.get(k) if k else None for k in keys])

    async def _refresh_fingerprint(self) -> None:
        if now() - self._fingerprint_at < (FINGERPRINT_TTL_S if self.fingerprint else FINGERPRINT_RETRY_S):
            return
        self._fingerprint_at = now()
        described = await self.describe()
        detail = described.value if described.status == "ok" else {}
        version = version_of(detail)
        if self.pinned is not None and version != self.pinned:  # a replica not yet on the pinned version
            self.fingerprint = self.fingerprint_version = None
            return
        self.fingerprint, self.fingerprint_version = fingerprint_of(detail), version

    # -- versions -----------------------------------------------------------------------------------
    @property
    def answered_by(self) -> str | None:
        """What a replica's answer must report to be cached (and what a cached answer reports): the
        version, and with live writes the last record each shard applied, `v@17` (shards: joined by "|")."""
        version = self.fingerprint_version
        if version is None or not self.touched:
            return version
        return "|".join(f"{v}@{self.touched.get(d, 0)}" for v, d in zip(version.split("|"), self.deployments,
                                                                        strict=False))

    def follow_writes(self, touched: Mapping[str, int]) -> None:
        """The log moved: from now on answers are cached, and read, under the records they reflect."""
        self.touched.update({d: touched[d] for d in self.deployments if d in touched})

    @property
    def pinned(self) -> str | None:
        """The version pinned for this retriever (each shard's, joined by "|"); None: not known."""
        versions = [self.pins.get(d) for d in self.deployments]
        return None if any(v is None for v in versions) else "|".join(versions)  # type: ignore[arg-type]

    def follow(self, pins: Mapping[str, str | None]) -> None:
        """The pins moved: no answer is read from or written to the cache under the old version's
        fingerprint from now on; the new one is learnt once a replica reports it."""
        pins = {d: pins.get(d) for d in self.deployments}
        if pins != self.pins:
            self.pins = pins
            if self.fingerprint_version is not None and self.fingerprint_version != self.pinned:
                self.fingerprint = self.fingerprint_version = None
                self._fingerprint_at = -math.inf


    async def _encoded(self, vectors: Awaitable[Any] | None, deadline: float) -> tuple[Any, str | None]:
        """The shared encoding, and a note when the graph goes on without it."""
        if vectors is None:
            return None, None
        if not self.vector_optional:
            return await asyncio.shield(vectors), None  # shared with the other lanes of this model
        # The graph can answer without a vector, so it waits for one only half its time.
        try:
            return await asyncio.wait_for(asyncio.shield(vectors), (deadline - now()) / 2), None
        except TimeoutError:
            return None, "linked entities by name only: the encoder did not answer in time"
        except RetrieverFailed as exc:
            return None, f"linked entities by name only: {exc}"

    def _own(self, filters: Filters | None) -> Filters | None:
        """The filters that reach this retriever: only the keys it filters on."""
        return {k: v for k, v in (filters or {}).items() if k in self.filter_keys} or None

    # -- one call per group of requests -----------------------------------------------------------
    async def _send(self, queries: list[Query], deadline: float) -> list[_Answer]:
        """Call the retriever, or every shard of it at once, with the whole group."""
        if len(self.handles) == 1:
            hits, version = await self._call_one(self.handles[0], queries)
            return [_Answer(h, version=version) for h in hits]
        shard_deadline = deadline - max(SHARD_MARGIN_S, SHARD_MARGIN_SHARE * (deadline - now()))
        parts = await asyncio.gather(
            *(self._call_one(h, queries, shard_deadline) for h in self.handles), return_exceptions=True
        )
        for part in parts:
            if isinstance(part, asyncio.CancelledError):
                raise part
        failed = {i: p for i, p in enumerate(parts) if isinstance(p, BaseException)}
        problems = "; ".join(
            f"shard {i}: timeout" if isinstance(e, TimeoutError) else f"shard {i}: error: {describe_error(e)}"
            for i, e in failed.items()
        )[:MAX_ERROR_CHARS] or None
        answered = [p[0] for p in parts if not isinstance(p, BaseException)]
        versions = [p[1] for p in parts if not isinstance(p, BaseException)]
        version = "|".join(versions) if not failed and None not in versions else None  # type: ignore[arg-type]
        if not answered:
            status: Status = "timeout" if all(isinstance(e, TimeoutError) for e in failed.values()) else "error"
            return [_Answer([], 0.0, problems, status) for _ in queries]
        coverage = round(len(answered) / len(parts), 4)
        return [
            _Answer(merge_shards((a[q] for a in answered), queries[q].top_k), coverage, problems, version=version)
            for q in range(len(queries))
        ]

    async def _call_one(self, handle: Any, queries: list[Query], deadline: float | None = None
                        ) -> tuple[list[list[Hit]], str | None]:
        """One replica's hit lists, and the version that answered (None: a replica that does not say)."""
        async with asyncio.timeout_at(deadline):  # None: the batcher's deadline for the whole call bounds it
            answer = await _await_cancelling(handle.search.remote(queries))
        if isinstance(answer, Unavailable):  # the replica is up, but its retriever failed to start
            raise RetrieverFailed(answer.reason)
        if isinstance(answer, Searched):
            # with live writes, the version and the last record applied: `v@17`
            return answer.hits, answer.version if answer.seq is None else f"{answer.version}@{answer.seq}"
        return answer, None

    # -- health -----------------------------------------------------------------------------------
    async def describe(self) -> Outcome:
        """What the retriever's replica reports, or each shard's summed up; never raises."""
        outcomes = await fan_out({
            str(i): Call(h.describe.remote, DESCRIBE_TIMEOUT_S) for i, h in enumerate(self.handles)
        })
        parts = list(outcomes.values())
        if len(parts) == 1:
            return parts[0]
        bad = next((o for o in parts if o.status != "ok"), None)
        if bad is not None:
            return Outcome(self.name, bad.status, error=f"shard {bad.name}: {bad.error}")
        shards = [o.value for o in parts]
        first_error = next((d["error"] for d in shards if d.get("error")), None)
        detail = {"num_docs": sum(d.get("num_docs", 0) for d in shards), "shards": shards}
        return Outcome(self.name, "ok", value={**detail, "error": first_error} if first_error else detail)

    def _note(self, outcome: Outcome, *, opened: bool) -> None:
        """Log trouble when it starts or changes, and the recovery; not every request."""
        problem = None if outcome.status == "ok" else f"{outcome.status}: {outcome.error}"
        if opened:
            logger.warning("retriever %s: circuit open after %d failures in a row; skipping it for %.1f s",
                           self.name, self.breaker.consecutive_failures, self.breaker.cooldown_s)
        if problem == self.last_problem:
            return
        if problem is None:
            logger.info("retriever %s answers again", self.name)
        else:
            logger.warning("retriever %s degraded the answer: %s", self.name, problem)
        self.last_problem = problem


def _outcome(name: str, answer: Any, timeout_s: float, latency_ms: float, note: str | None) -> Outcome:
    """One query's Outcome from what the batcher gave it: its `_Answer`, or the exception."""
    if isinstance(answer, TimeoutError):
        return Outcome(name, "timeout", latency_ms, error=f"no answer within {timeout_s * 1000:.0f} ms")
    if isinstance(answer, BaseException):
        return Outcome(name, "error", latency_ms, error=describe_error(answer))
    if answer.status != "ok":
        return Outcome(name, answer.status, latency_ms, error=answer.problems, coverage=0.0)
    return Outcome(name, "ok", latency_ms, value=answer.hits, error=answer.problems or note, coverage=answer.coverage,
                   version=answer.version)


def version_of(detail: Mapping[str, Any]) -> str | None:
    """The version the replica, or each shard's, reports, joined by "|"; None when one is unknown."""
    parts = [d.get("version") for d in detail.get("shards", [detail])] if detail else []
    if not parts or any(not isinstance(p, str) for p in parts):
        return None
    return "|".join(parts)


def fingerprint_of(detail: Mapping[str, Any]) -> str | None:
    """The index fingerprint from what the replica, or each shard's, reports; None when one is unknown."""
    parts = [d.get("fingerprint") for d in detail.get("shards", [detail])]
    if not parts or any(not isinstance(p, str) for p in parts):
        return None
    return parts[0] if len(parts) == 1 else hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
