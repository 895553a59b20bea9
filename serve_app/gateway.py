"""The gateway: validate a search, ask the lanes, fuse, answer.

`Gateway` is plain Python over deployment handles. Everything around one retriever's call lives in
its lane (serve_app/lanes.py); HTTP lives in serve_app/http.py; the Serve deployment that hosts a
gateway replica is `GatewayDeployment` in serve_app/app.py. So the whole search path runs in a unit
test with `serve_app.testing.FakeHandle` and no Ray.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

from pydantic import ValidationError

from actors.encoder import encoder_name
from actors.errors import InvalidRequest, NoRetrieverAvailable
from serve_app.batcher import now
from serve_app.breaker import CircuitBreaker
from serve_app.config import AppConfig
from serve_app.fanout import Outcome
from serve_app.fusion import fuse
from serve_app.lanes import CIRCUIT_OPEN, EncoderLane, RetrieverLane, slots
from serve_app.schemas import (
    EncoderInfo,
    FusionOptions,
    Result,
    RetrieverInfo,
    RetrieversResponse,
    RetrieverStatus,
    SearchRequest,
    SearchResponse,
    Source,
)

logger = logging.getLogger("ray.serve")
DISABLED = "ragfan is disabled (RAGFAN_DISABLED or enabled: false)"


def validate(request: SearchRequest | dict[str, Any], config: AppConfig) -> tuple[SearchRequest, list[str]]:
    """The request, typed, and the names of the retrievers it selects; raises InvalidRequest.

    The rules that depend on the config (the query's length, retriever names, filter keys) are the
    ones serve_app/http.py writes into the OpenAPI schema.
    """
    if not isinstance(request, SearchRequest):
        try:
            request = SearchRequest.model_validate(request)
        except ValidationError as exc:
            raise InvalidRequest.from_validation(exc.errors()) from None
    errors = []
    if len(request.query) > config.max_query_chars:
        errors.append(_error("query", f"query is {len(request.query)} characters; the limit is "
                                      f"{config.max_query_chars}", "string_too_long"))
    valid = ", ".join(config.names)
    unknown = [n for n in request.retrievers or () if n not in config.names]
    if unknown:
        errors.append(_error("retrievers", f"unknown retriever(s) {', '.join(map(repr, unknown))}; valid: {valid}"))
    unknown = sorted(set((request.fusion and request.fusion.weights) or {}) - set(config.names))
    if unknown:
        errors.append(_error("fusion.weights", f"fusion weights name unknown retriever(s) "
                                               f"{', '.join(map(repr, unknown))}; valid: {valid}"))
    # A filter reaches the retrievers that filter on its key; the others answer unfiltered.
    keys = filter_keys(config)
    unknown = sorted(set(request.filters or {}) - set(keys))
    if unknown:
        errors.append(_error("filters", f"no retriever filters on {', '.join(map(repr, unknown))}; "
                                        f"filter keys: {', '.join(keys) or '(none)'}"))
    if errors:
        raise InvalidRequest("; ".join(e["msg"] for e in errors), errors)
    return request, list(dict.fromkeys(request.retrievers or config.names))


def filter_keys(config: AppConfig) -> list[str]:
    """Every metadata key some retriever filters on."""
    return sorted({k for r in config.retrievers for k in r.filter_keys})


def _error(field: str, msg: str, kind: str = "value_error") -> dict[str, Any]:
    return {"loc": ["body", *field.split(".")], "msg": msg, "type": kind}


class Gateway:
    def __init__(
        self,
        config: AppConfig,
        retrievers: dict[str, list[Any]],
        encoders: dict[str, Any] | None = None,
    ) -> None:
        """`retrievers`: per retriever, its handle, or one per shard; `encoders`: per model, its handle."""
        self.config = config
        self.weights = {r.name: r.weight for r in config.retrievers}
        enc = config.encoder
        self.encoders = {
            model: EncoderLane(model, handle, max_batch_size=enc.batch.max_batch_size,
                               max_concurrent=slots(enc.batch.max_concurrent_batches, enc.most_replicas))
            for model, handle in (encoders or {}).items()
        }
        self.lanes = {
            r.name: RetrieverLane(
                r.name,
                retrievers.get(r.name, []),
                top_k=r.top_k,
                timeout_ms=r.timeout_ms,
                filter_keys=r.filter_keys,
                max_in_flight=r.max_in_flight,
                breaker=CircuitBreaker(failures=r.circuit_breaker.failures, cooldown_s=r.circuit_breaker.cooldown_s),
                batcher_options={
                    "max_batch_size": r.batch.max_batch_size,
                    "max_concurrent": slots(r.batch.max_concurrent_batches, r.most_replicas),
                    "wait_s": r.batch.batch_wait_timeout_s,
                },
                encoder=self.encoders.get(r.encoder_model) if r.encoder_model else None,
                vector_optional=r.kind == "graph",
            )
            for r in config.retrievers
        }

    async def search(self, request: SearchRequest | dict[str, Any]) -> SearchResponse:
        """The whole search; raises InvalidRequest or NoRetrieverAvailable."""
        started = now()
        request, selected = validate(request, self.config)
        if not self.config.enabled:
            return self._disabled(request, started)
        outcomes = await self.ask(request, selected)
        results = self.fuse(request, outcomes)
        return self.answer(request, outcomes, results, started)

    async def ask(self, request: SearchRequest, selected: list[str]) -> dict[str, Outcome]:
        """Every selected lane at once; the query is encoded once per model, for all lanes of it."""
        lanes = [self.lanes[name] for name in selected]
        encodings: dict[str, asyncio.Future] = {}
        for lane in lanes:
            if lane.encoder is not None and lane.encoder.model not in encodings:
                timeout_ms = max(x.timeout_ms for x in lanes if x.encoder is lane.encoder)
                timeout_s = min(timeout_ms, request.timeout_ms or timeout_ms) / 1000
                encodings[lane.encoder.model] = asyncio.ensure_future(
                    lane.encoder.encode(request.query, timeout_s=timeout_s)
                )
        try:
            answers = await asyncio.gather(*(
                lane.search(request.query, top_k=request.top_k, filters=request.filters,
                            timeout_ms=request.timeout_ms,
                            vector=encodings[lane.encoder.model] if lane.encoder is not None else None)
                for lane in lanes
            ))
        finally:
            for task in encodings.values():
                if task.done() and not task.cancelled():
                    task.exception()  # each lane saw it; mark it retrieved
                task.cancel()
        return {o.name: o for o in answers}

    def fuse(self, request: SearchRequest, outcomes: dict[str, Outcome]) -> list[Result]:
        """One ranked list from the lanes that answered.

        When none did: no results if it was the request's own `timeout_ms` that cut every one of them
        short (as Elasticsearch answers a search past its `timeout`: 200, marked timed out); else
        NoRetrieverAvailable, which is 503 with Retry-After, because the retrievers themselves failed.
        """
        ok = {name: o.value for name, o in outcomes.items() if o.status == "ok"}
        if not ok and all(self._out_of_its_own_time(request, n, o) for n, o in outcomes.items()):
            return []  # the request's own deadline left no time: a degraded answer, not a failure
        if not ok:
            retry = [self.lanes[n].breaker.retry_in_s() for n, o in outcomes.items() if o.error == CIRCUIT_OPEN]
            raise NoRetrieverAvailable(
                "no selected retriever answered",
                {name: {"status": o.status, "error": o.error} for name, o in outcomes.items()},
                # every one skipped by an open circuit: retry when the first one probes again
                retry_after_s=max(1, math.ceil(min(retry))) if len(retry) == len(outcomes) else 1,
            )
        options = request.fusion or FusionOptions()
        fused = fuse(
            ok,
            method=options.method or self.config.fusion.method,
            weights={**self.weights, **(options.weights or {})},
            k=options.k or self.config.fusion.k,
            top_k=request.top_k,
        )
        return [
            Result(id=h.doc_id, text=h.text, score=h.score, metadata=dict(h.metadata),
                   sources=[Source(retriever=r, rank=rank, score=score) for r, rank, score in h.sources])
            for h in fused
        ]

    def _out_of_its_own_time(self, request: SearchRequest, name: str, outcome: Outcome) -> bool:
        """Whether a lane timed out within the request's `timeout_ms`, before its own deadline."""
        own = request.timeout_ms
        return outcome.status == "timeout" and own is not None and own < self.lanes[name].timeout_ms

    def answer(self, request: SearchRequest, outcomes: dict[str, Outcome], results: list[Result],
               started: float) -> SearchResponse:
        statuses = {
            name: _status(outcomes[name]) if name in outcomes else RetrieverStatus(status="skipped")
            for name in self.config.names
        }
        latency_ms = _ms(started)
        logger.info("search %.1f ms %s", latency_ms, " ".join(
            f"{n}={s.status}/{s.latency_ms:.0f}ms" for n, s in statuses.items() if s.status != "skipped"
        ))
        answered = sum(o.status == "ok" for o in outcomes.values())
        left_out = {"text", "metadata"} - set(request.include) if request.include is not None else set()
        if left_out:  # ids, scores and sources only: None is left out of the JSON (schemas.Result)
            results = [r.model_copy(update=dict.fromkeys(left_out)) for r in results]
        return SearchResponse(
            query=request.query,
            results=results,
            retrievers=statuses,
            degraded=answered < len(outcomes) or any((o.coverage or 1) < 1 for o in outcomes.values()),
            latency_ms=latency_ms,
        )

    def _disabled(self, request: SearchRequest, started: float) -> SearchResponse:
        return SearchResponse(
            query=request.query,
            results=[],
            retrievers={n: RetrieverStatus(status="skipped", error=DISABLED) for n in self.config.names},
            degraded=False,
            latency_ms=_ms(started),
        )

    # -- health and counts ------------------------------------------------------------------------
    async def retrievers(self) -> RetrieversResponse:
        """Each retriever's health as its replicas report it, with this replica's breaker and load."""
        lanes = [self.lanes[r.name] for r in self.config.retrievers]
        described: list[Outcome | None] = [None] * len(lanes)
        if self.config.enabled:
            described = list(await asyncio.gather(*(lane.describe() for lane in lanes)))
        infos = []
        for r, lane, o in zip(self.config.retrievers, lanes, described, strict=True):
            detail = o.value if o is not None and o.status == "ok" else None
            start_error = (detail or {}).get("error")  # the replica is up but its retriever failed to load
            infos.append(RetrieverInfo(
                name=r.name, kind=r.kind, config=r.summary(), healthy=detail is not None and start_error is None,
                detail=detail, error=DISABLED if o is None else start_error or o.error,
                circuit=lane.breaker.snapshot(), in_flight=lane.in_flight,
            ))
        return RetrieversResponse(enabled=self.config.enabled, retrievers=infos, encoders=await self._encoders())

    async def _encoders(self) -> list[EncoderInfo]:
        lanes = list(self.encoders.values())
        infos = []
        for lane, o in zip(lanes, await asyncio.gather(*(lane.describe() for lane in lanes)), strict=True):
            detail = o.value if o.status == "ok" else None
            error = (detail or {}).get("error") or (None if detail else o.error)
            infos.append(EncoderInfo(
                name=encoder_name(lane.model), model=lane.model, healthy=detail is not None and error is None,
                detail=detail, error=error,
                used_by=[r.name for r in self.config.retrievers if r.encoder_model == lane.model],
            ))
        return infos

    def stats(self) -> dict[str, Any]:
        """Counts since this replica started: batch sizes sent per lane (`encoder:<model>` for encoders)."""
        batches = {name: dict(lane.batcher.sizes) for name, lane in self.lanes.items()}
        batches |= {f"encoder:{model}": dict(lane.batcher.sizes) for model, lane in self.encoders.items()}
        return {"batches": batches}


def _status(o: Outcome) -> RetrieverStatus:
    return RetrieverStatus(
        status=o.status, latency_ms=o.latency_ms, num_hits=len(o.value or []), error=o.error, coverage=o.coverage
    )


def _ms(started: float) -> float:
    return round((now() - started) * 1000, 2)
