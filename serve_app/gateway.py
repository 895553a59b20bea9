"""The ingress deployment: validate, fan out with deadlines, fuse, answer.

HTTP routes and the Python client share one code path, `Gateway.search`; errors become HTTP
statuses in one place, the exception handlers at the bottom of this module.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle

from actors.encoder import encoder_name
from serve_app import __version__, guard
from serve_app.breaker import CircuitBreaker
from serve_app.config import AppConfig
from serve_app.errors import InvalidRequest, NoRetrieverAvailable
from serve_app.fanout import Call, Outcome, fan_out
from serve_app.fusion import fuse
from serve_app.lanes import CIRCUIT_OPEN, EncoderLane, RetrieverLane, slots
from serve_app.schemas import (
    EncoderInfo,
    ErrorResponse,
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
DESCRIBE_TIMEOUT_S = 5.0
ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "API keys are on and the request has no valid one"},
    413: {"model": ErrorResponse, "description": "the body is over gateway.max_body_bytes"},
    503: {"model": ErrorResponse, "description": "no selected retriever answered, or the gateway is overloaded; "
          "see Retry-After"},
}
SEARCH_ERRORS = {**ERRORS, 400: {"model": ErrorResponse, "description": "a malformed Content-Length"}}
DISABLED = "ragfan is disabled (RAGFAN_DISABLED or enabled: false)"

api = FastAPI(
    title="ragfan",
    version=__version__,
    description="Fans each query out to several retrievers in parallel and fuses their answers.",
)


def validate(request: SearchRequest, config: AppConfig) -> list[str]:
    """Checks that depend on the config; returns the selected retriever names."""
    errors = []
    if len(request.query) > config.max_query_chars:
        errors.append({
            "loc": ["body", "query"],
            "msg": f"query is {len(request.query)} characters; the limit is {config.max_query_chars}",
            "type": "string_too_long",
        })
    selected = request.retrievers or config.names
    unknown = [n for n in selected if n not in config.names]
    if unknown:
        errors.append({
            "loc": ["body", "retrievers"],
            "msg": f"unknown retriever(s) {', '.join(map(repr, unknown))}; valid: {', '.join(config.names)}",
            "type": "value_error",
        })
    unknown_weights = sorted(set((request.fusion and request.fusion.weights) or {}) - set(config.names))
    if unknown_weights:
        errors.append({
            "loc": ["body", "fusion", "weights"],
            "msg": f"fusion weights name unknown retriever(s) {', '.join(map(repr, unknown_weights))}; "
            f"valid: {', '.join(config.names)}",
            "type": "value_error",
        })
    if request.filters:
        known = {k for r in config.retrievers if r.name in selected for k in r.filter_keys}
        bad = sorted(set(request.filters) - known)
        if bad:
            errors.append({
                "loc": ["body", "filters"],
                "msg": f"no selected retriever filters on {', '.join(map(repr, bad))}; "
                f"filter keys: {', '.join(sorted(known)) or '(none)'}",
                "type": "value_error",
            })
    if errors:
        raise InvalidRequest("; ".join(e["msg"] for e in errors), errors)
    return list(dict.fromkeys(selected))


def _describe_all(parts: list[Outcome]) -> Outcome:
    """One retriever's description from its deployments: itself, or each shard of it."""
    if len(parts) == 1:
        return parts[0]
    bad = next((o for o in parts if o.status != "ok"), None)
    if bad is not None:
        return bad
    shards = [o.value for o in parts]
    first_error = next((d["error"] for d in shards if d.get("error")), None)
    detail = {"num_docs": sum(d.get("num_docs", 0) for d in shards), "shards": shards}
    return Outcome(parts[0].name, "ok", value={**detail, "error": first_error} if first_error else detail)


# Helpers and exception handlers live above the class: `serve.ingress` copies the class and the
# FastAPI app when it is decorated, and sees only what exists at that moment.
def _status(o: Outcome) -> RetrieverStatus:
    return RetrieverStatus(
        status=o.status, latency_ms=o.latency_ms, num_hits=len(o.value or []), error=o.error, coverage=o.coverage
    )


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)


@api.exception_handler(InvalidRequest)
async def _invalid(_: Request, exc: InvalidRequest) -> JSONResponse:
    return JSONResponse(status_code=422, content={"detail": exc.errors})


@api.exception_handler(NoRetrieverAvailable)
async def _unavailable(_: Request, exc: NoRetrieverAvailable) -> JSONResponse:
    return JSONResponse(
        status_code=503,
        content={"detail": {"message": exc.message, "retrievers": exc.reasons}},
        headers={"Retry-After": str(exc.retry_after_s)},
    )


api.add_middleware(guard.Guard)


@serve.deployment(logging_config={"enable_access_log": False})
@serve.ingress(api)
class Gateway:
    def __init__(
        self,
        config: AppConfig,
        retrievers: dict[str, list[DeploymentHandle]],
        encoders: dict[str, DeploymentHandle] | None = None,
        *,
        api_key_digests: tuple[bytes, ...] = (),
    ) -> None:
        self.config = config
        self.handles = retrievers  # one handle per retriever, or one per shard of a sharded one
        self.encoder_handles = encoders or {}  # model -> its encoder deployment
        self.weights = {r.name: r.weight for r in config.retrievers}
        enc = config.encoder
        self.encoders = {
            model: EncoderLane(model, handle, max_batch_size=enc.batch.max_batch_size,
                               max_concurrent=slots(enc.batch.max_concurrent_batches, enc.most_replicas))
            for model, handle in self.encoder_handles.items()
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
                encoder=self.encoders.get(r.model) if r.shared_encoder else None,
                vector_optional=r.kind == "graph",
            )
            for r in config.retrievers
        }
        guard.configure(max_body_bytes=config.gateway.max_body_bytes, key_digests=api_key_digests)

    async def search(self, request: SearchRequest | dict[str, Any]) -> SearchResponse:
        """The whole search; raises InvalidRequest or NoRetrieverAvailable."""
        started = time.perf_counter()
        if not isinstance(request, SearchRequest):
            try:
                request = SearchRequest.model_validate(request)
            except ValidationError as exc:
                raise InvalidRequest.from_validation(exc) from None
        selected = validate(request, self.config)
        if not self.config.enabled:
            return SearchResponse(
                query=request.query,
                results=[],
                retrievers={n: RetrieverStatus(status="skipped", error=DISABLED) for n in self.config.names},
                degraded=False,
                latency_ms=_ms(started),
            )
        answers = await self._fan_out(request, selected)
        outcomes = {o.name: o for o in answers}
        ok = {name: o.value for name, o in outcomes.items() if o.status == "ok"}
        statuses = {
            name: _status(outcomes[name]) if name in outcomes else RetrieverStatus(status="skipped")
            for name in self.config.names
        }
        total = _ms(started)
        logger.info(
            "search %.1f ms %s",
            total,
            " ".join(f"{n}={s.status}/{s.latency_ms:.0f}ms" for n, s in statuses.items() if s.status != "skipped"),
        )
        if not ok:
            retry = [self.lanes[n].breaker.retry_in_s() for n, o in outcomes.items() if o.error == CIRCUIT_OPEN]
            raise NoRetrieverAvailable(
                "no selected retriever answered",
                {name: {"status": o.status, "error": o.error} for name, o in outcomes.items()},
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
        return SearchResponse(
            query=request.query,
            results=[
                Result(
                    id=h.doc_id,
                    text=h.text,
                    score=h.score,
                    sources=[Source(retriever=r, rank=rank, score=score) for r, rank, score in h.sources],
                    metadata=dict(h.metadata),
                )
                for h in fused
            ],
            retrievers=statuses,
            degraded=len(ok) < len(selected) or any((o.coverage or 1) < 1 for o in outcomes.values()),
            latency_ms=total,
        )

    async def _fan_out(self, request: SearchRequest, selected: list[str]) -> list[Outcome]:
        """Every selected lane at once; the query is encoded once per model, for all lanes of it."""
        lanes = [self.lanes[name] for name in selected]
        encodings: dict[str, asyncio.Task] = {}
        for lane in lanes:
            if lane.encoder is not None and lane.encoder.model not in encodings:
                timeout_ms = max(x.timeout_ms for x in lanes if x.encoder is lane.encoder)
                timeout_s = min(timeout_ms, request.timeout_ms or timeout_ms) / 1000
                encodings[lane.encoder.model] = asyncio.ensure_future(
                    lane.encoder.encode(request.query, timeout_s=timeout_s)
                )
        try:
            return await asyncio.gather(*(
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

    def stats(self) -> dict[str, Any]:
        """Counts since this replica started: batch sizes sent per lane (`encoder:<model>` for encoders)."""
        batches = {name: dict(lane.batcher.sizes) for name, lane in self.lanes.items()}
        batches |= {f"encoder:{model}": dict(lane.batcher.sizes) for model, lane in self.encoders.items()}
        return {"batches": batches}

    async def retrievers(self) -> RetrieversResponse:
        outcomes: dict[str, Outcome] = {}
        if self.config.enabled:
            outcomes = await fan_out({
                f"{name}#{i}": Call(start=h.describe.remote, timeout_s=DESCRIBE_TIMEOUT_S)
                for name, handles in self.handles.items()
                for i, h in enumerate(handles)
            })
        infos = []
        for r in self.config.retrievers:
            parts = [outcomes[f"{r.name}#{i}"] for i in range(r.shards)] if outcomes else []
            o = _describe_all(parts) if parts else None
            detail = o.value if o is not None and o.status == "ok" else None
            start_error = (detail or {}).get("error")  # the replica is up but its retriever failed to load
            infos.append(RetrieverInfo(
                name=r.name,
                kind=r.kind,
                config=r.summary(),
                healthy=detail is not None and start_error is None,
                detail=detail,
                error=DISABLED if o is None else start_error or o.error,
                circuit=self.lanes[r.name].breaker.snapshot(),
                in_flight=self.lanes[r.name].in_flight,
            ))
        return RetrieversResponse(enabled=self.config.enabled, retrievers=infos, encoders=await self._encoders())

    async def _encoders(self) -> list[EncoderInfo]:
        outcomes = await fan_out({
            model: Call(start=h.describe.remote, timeout_s=DESCRIBE_TIMEOUT_S)
            for model, h in self.encoder_handles.items()
        })
        infos = []
        for model, o in outcomes.items():
            detail = o.value if o.status == "ok" else None
            error = (detail or {}).get("error") or (None if detail else o.error)
            infos.append(EncoderInfo(
                name=encoder_name(model), model=model, healthy=detail is not None and error is None, detail=detail,
                error=error, used_by=[r.name for r in self.config.retrievers if r.shared_encoder and r.model == model],
            ))
        return infos

    # -- HTTP ------------------------------------------------------------------------------
    @api.post("/v1/search", response_model=SearchResponse, summary="Search all or some retrievers",
              responses=SEARCH_ERRORS)
    async def http_search(self, request: SearchRequest) -> SearchResponse:
        return await self.search(request)

    @api.get("/v1/retrievers", response_model=RetrieversResponse, summary="Each retriever and its health",
             responses={401: ERRORS[401]})
    async def http_retrievers(self) -> RetrieversResponse:
        return await self.retrievers()

    @api.get("/healthz", summary="200 when the gateway is up")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}
