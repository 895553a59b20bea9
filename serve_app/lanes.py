"""One retriever's call, and one model's encoding, as the gateway makes them.

A `RetrieverLane` owns everything around one retriever's call: the bound on calls in flight, the
circuit breaker, the batcher that groups concurrent requests into one call per group, the deadline,
the shard scatter and merge, and the log line when the retriever's health changes. The gateway
only validates, asks every selected lane, fuses and answers.

An `EncoderLane` batches query texts for one model's encoder deployment. Every lane of that model
awaits the same encoding of a request, so a query is encoded once, however many retrievers use it.

Handles are duck-typed (`handle.search.remote(queries)`, `handle.encode.remote(texts)`), so unit
tests drive lanes with the fake handle in tests/unit/fakes.py and no Ray.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from actors.errors import RetrieverFailed
from actors.shards import merge as merge_shards
from actors.types import Filters, Hit, Query, Unavailable
from serve_app.batcher import Batcher, now
from serve_app.breaker import CircuitBreaker
from serve_app.fanout import MAX_ERROR_CHARS, Call, Outcome, Status, describe_error, fan_out

logger = logging.getLogger("ray.serve")
CIRCUIT_OPEN = "circuit open"
DESCRIBE_TIMEOUT_S = 5.0  # how long a health check waits for a replica's description
# A sharded call stops waiting for slow shards this long before its requests' deadline, so the
# shards that did answer are merged and reach the requests in time.
SHARD_MARGIN_S = 0.02


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

    def __init__(self, model: str, handle: Any, *, max_batch_size: int, max_concurrent: int) -> None:
        self.model = model
        self.handle = handle
        self.batcher: Batcher[str, np.ndarray] = Batcher(
            self._send, max_batch_size=max_batch_size, max_concurrent=max_concurrent
        )

    async def _send(self, texts: list[str], deadline: float) -> list[np.ndarray]:
        return list(await _await_cancelling(self.handle.encode.remote(texts)))  # one row per text

    async def describe(self) -> Outcome:
        """What the encoder replica reports (model, dim, device), or why it does not answer."""
        return (await fan_out({self.model: Call(self.handle.describe.remote, DESCRIBE_TIMEOUT_S)}))[self.model]

    async def encode(self, text: str, *, timeout_s: float) -> np.ndarray:
        try:
            return await self.batcher.submit(text, timeout_s=timeout_s)
        except (TimeoutError, asyncio.CancelledError):
            raise
        except Exception as exc:
            raise RetrieverFailed(f"encoder for {self.model}: {describe_error(exc)}") from None


@dataclass(frozen=True, slots=True)
class _Answer:
    """One query's answer from every shard of a retriever: merged hits, and which shards failed."""

    hits: list[Hit]
    coverage: float | None = None
    problems: str | None = None
    status: Status = "ok"  # "timeout" or "error" when no shard answered


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
    ) -> None:
        self.name = name
        self.handles = list(handles)  # one, or one per shard
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

    # -- one request ------------------------------------------------------------------------------
    async def search(
        self, text: str, *, top_k: int, filters: Filters | None, timeout_ms: int | None,
        vector: Awaitable[np.ndarray] | None = None,
    ) -> Outcome:
        """This retriever's answer to one request, as an Outcome; never raises but for cancellation.

        `vector` is the request's shared encoding (a task every lane of the model awaits).
        """
        if self.in_flight >= self.max_in_flight:
            return Outcome(self.name, "skipped", error=f"{self.max_in_flight} calls already in flight")
        if not self.breaker.allow():
            return Outcome(self.name, "skipped", error=CIRCUIT_OPEN)
        self.in_flight += 1
        try:
            outcome = await self._call(text, top_k, filters, timeout_ms, vector)
        except asyncio.CancelledError:
            self.breaker.release()
            raise
        finally:
            self.in_flight -= 1
        if outcome.status == "timeout" and timeout_ms is not None and timeout_ms < self.timeout_ms:
            self.breaker.release()  # the caller's own shorter deadline says nothing about the retriever
            return outcome
        was = self.breaker.state
        self.breaker.record(outcome.status == "ok")
        self._note(outcome, opened=was != "open" and self.breaker.state == "open")
        return outcome

    async def _call(self, text, top_k, filters, timeout_ms, vector) -> Outcome:
        started = now()
        timeout_s = min(self.timeout_ms, timeout_ms or self.timeout_ms) / 1000
        deadline = started + timeout_s
        waiting_for = "the encoder"
        note = None

        def elapsed() -> float:
            return round((now() - started) * 1000, 2)

        try:
            async with asyncio.timeout_at(deadline):
                encoded = None
                if vector is not None and not self.vector_optional:
                    encoded = await asyncio.shield(vector)  # shared with the other lanes of this model
                elif vector is not None:
                    # The graph can answer without a vector, so it waits for one only half its time.
                    try:
                        encoded = await asyncio.wait_for(asyncio.shield(vector), (deadline - now()) / 2)
                    except TimeoutError:
                        note = "linked entities by name only: the encoder did not answer in time"
                    except RetrieverFailed as exc:
                        note = f"linked entities by name only: {exc}"
                waiting_for = self.name
                query = Query(text=text, top_k=max(self.top_k, top_k), filters=self._own(filters), vector=encoded)
                answer = await self.batcher.submit(query, timeout_s=deadline - now())
        except TimeoutError:
            reason = "" if waiting_for == self.name else f" (waiting for {waiting_for})"
            return Outcome(self.name, "timeout", elapsed(), error=f"no answer within {timeout_s * 1000:.0f} ms{reason}")
        except Exception as exc:
            return Outcome(self.name, "error", elapsed(), error=describe_error(exc))
        if answer.status != "ok":
            return Outcome(self.name, answer.status, elapsed(), error=answer.problems, coverage=0.0)
        return Outcome(self.name, "ok", elapsed(), value=answer.hits, error=answer.problems or note,
                       coverage=answer.coverage)

    def _own(self, filters: Filters | None) -> Filters | None:
        """The filters that reach this retriever: only the keys it filters on."""
        return {k: v for k, v in (filters or {}).items() if k in self.filter_keys} or None

    # -- one call per group of requests -----------------------------------------------------------
    async def _send(self, queries: list[Query], deadline: float) -> list[_Answer]:
        """Call the retriever, or every shard of it at once, with the whole group."""
        if len(self.handles) == 1:
            hits = await self._call_one(self.handles[0], queries)
            return [_Answer(h) for h in hits]
        shard_deadline = deadline - SHARD_MARGIN_S
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
        answered = [p for p in parts if not isinstance(p, BaseException)]
        if not answered:
            status: Status = "timeout" if all(isinstance(e, TimeoutError) for e in failed.values()) else "error"
            return [_Answer([], 0.0, problems, status) for _ in queries]
        coverage = round(len(answered) / len(parts), 4)
        return [
            _Answer(merge_shards((a[q] for a in answered), queries[q].top_k), coverage, problems)
            for q in range(len(queries))
        ]

    async def _call_one(self, handle: Any, queries: list[Query], deadline: float | None = None) -> list[list[Hit]]:
        async with asyncio.timeout_at(deadline):  # None: the batcher's deadline for the whole call bounds it
            answer = await _await_cancelling(handle.search.remote(queries))
        if isinstance(answer, Unavailable):  # the replica is up, but its retriever failed to start
            raise RetrieverFailed(answer.reason)
        return answer

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
