"""The gateway: validate a search, ask the lanes, fuse, answer; a batch of searches the same way.

`Gateway` is plain Python over deployment handles. Everything around one retriever's call lives in
its lane (serve_app/lanes.py); HTTP lives in serve_app/http.py; the Serve deployment that hosts a
gateway replica is `GatewayDeployment` in serve_app/app.py. So the whole search path runs in a unit
test with `serve_app.testing.FakeHandle` and no Ray.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import ValidationError

from actors.encoder import encoder_name
from actors.errors import (
    InvalidRequest,
    NoRetrieverAvailable,
    NotFound,
    PayloadTooLarge,
    RagError,
    ServiceUnavailable,
)
from actors.versions import SYNC_WAIT_S
from serve_app.breaker import CIRCUIT_OPEN, CircuitBreaker
from serve_app.cache import make_cache
from serve_app.clock import now
from serve_app.config import AppConfig, RetrieverConfig
from serve_app.fusion import fuse
from serve_app.lanes import Ask, EncoderLane, RetrieverLane, slots
from serve_app.outcome import Outcome, describe_error
from serve_app.reload import LiveReplicas, Reloader, gateway_member
from serve_app.schemas import (
    BatchItem,
    BatchSearchError,
    BatchSearchRequest,
    BatchSearchResponse,
    BatchSearchResult,
    DeleteRequest,
    EncoderInfo,
    ErrorResponse,
    FusionOptions,
    ReloadRequest,
    ReloadResponse,
    ReplicaVersion,
    Result,
    RetrieverInfo,
    RetrieversResponse,
    RetrieverStatus,
    SearchRequest,
    SearchResponse,
    Source,
    UpsertRequest,
    WriteResponse,
)
from serve_app.telemetry import StatsHub, Telemetry
from serve_app.writes import Writer

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


def validate_batch(
    batch: BatchSearchRequest | dict[str, Any], config: AppConfig
) -> list[tuple[SearchRequest, list[str]] | InvalidRequest]:
    """Each search of the batch validated, or its InvalidRequest in its place.

    Raises InvalidRequest when the body is not a batch (no list, an empty one), and PayloadTooLarge
    past `gateway.max_batch_searches`.
    """
    if not isinstance(batch, BatchSearchRequest):
        try:
            batch = BatchSearchRequest.model_validate(batch)
        except ValidationError as exc:
            raise InvalidRequest.from_validation(exc.errors()) from None
    limit = config.gateway.max_batch_searches
    if len(batch.searches) > limit:
        raise PayloadTooLarge(f"the batch has {len(batch.searches)} searches; the limit is {limit} "
                              "(gateway.max_batch_searches): send them in smaller batches")
    checked: list[tuple[SearchRequest, list[str]] | InvalidRequest] = []
    for search in batch.searches:
        try:
            checked.append(validate(search, config))
        except InvalidRequest as exc:
            checked.append(exc)
    return checked


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
        *,
        telemetry: Telemetry | None = None,
        stats_hub: Any = None,
        replica: str = "local",
        versions: Any = None,
        live: LiveReplicas | None = None,
    ) -> None:
        """`retrievers`: per retriever, its handle, or one per shard; `encoders`: per model, its handle.

        `telemetry` records each search (serve_app/telemetry.py); by default one with no Prometheus
        instruments, or none with `gateway.metrics: false`. `stats_hub`: the handle of the app's
        stats deployment, where this replica (`replica`) pushes its counts; by default a StatsHub of
        this gateway's own. `versions`: the handle of the app's VersionHub (actors/versions.py), which
        this replica follows (`follow_versions`) and reloads through; `live`: the ids of a deployment's
        live replicas (serve_app/reload.py).
        """
        if telemetry is None and config.gateway.metrics:
            telemetry = Telemetry.of(config)
        self.telemetry = telemetry
        self.stats_hub = stats_hub
        self.own_hub = StatsHub(clock=telemetry.clock) if stats_hub is None and telemetry else None
        self.replica = replica
        self.versions = versions
        self.live = live
        self.lanes: dict[str, RetrieverLane] = {}
        self.encoders: dict[str, EncoderLane] = {}
        self.write_end = 0  # with live writes: the last log record this replica knows of ...
        self.touched: dict[str, int] = {}  # ... and the last one addressed to each deployment
        self.configure(config, retrievers, encoders or {})

    def configure(self, config: AppConfig, retrievers: Mapping[str, list[Any]], encoders: Mapping[str, Any]) -> None:
        """Serve `config` from now on, with these handles: at start, and when a changed config is applied
        to the running app (`GatewayDeployment.reconfigure`). A lane or encoder lane whose settings did
        not change is kept, with its breaker, batches in flight and followed version; searches already
        running finish with the lanes they started with."""
        before = getattr(self, "config", None)
        self.config = config
        self.weights = {r.name: r.weight for r in config.retrievers}
        if before is None or before.cache != config.cache:
            self.cache = make_cache(config.cache)  # one per gateway replica; its lanes share it
        if self.telemetry is not None:
            self.telemetry.follow(config)
        enc = config.encoder
        kept_encoders = before is not None and before.encoder == enc
        self.encoders = {
            model: self.encoders[model] if kept_encoders and model in self.encoders else EncoderLane(
                model, handle, max_batch_size=enc.batch.max_batch_size,
                max_concurrent=slots(enc.batch.max_concurrent_batches, enc.most_replicas),
                on_batch=self._on_batch(f"encoder:{model}"))
            for model, handle in encoders.items()
        }
        old = {r.name: r for r in before.retrievers} if before is not None else {}
        keep = kept_encoders and before is not None and before.cache == config.cache
        self.lanes = {
            r.name: self.lanes[r.name] if keep and old.get(r.name) == r else self._lane(r, retrievers.get(r.name, []))
            for r in config.retrievers
        }
        self.reloader = Reloader(self.lanes, {r.name: r.kind for r in config.retrievers},
                                 self.versions if config.enabled else None, live=self.live)
        self.writer = Writer(config, self.encoders, self.versions if config.writes.enabled else None,
                             learnt=self._learnt)

    def _lane(self, r: RetrieverConfig, handles: list[Any]) -> RetrieverLane:
        lane = RetrieverLane(
            r.name,
            handles,
            top_k=r.top_k,
            timeout_ms=r.timeout_ms,
            filter_keys=r.filter_keys,
            max_in_flight=r.max_in_flight,
            breaker=CircuitBreaker(failures=r.circuit_breaker.failures, cooldown_s=r.circuit_breaker.cooldown_s),
            batcher_options={
                "max_batch_size": r.batch.max_batch_size,
                "max_concurrent": slots(r.batch.max_concurrent_batches, r.most_replicas),
                "wait_s": r.batch.batch_wait_timeout_s,
                "on_batch": self._on_batch(r.name),
            },
            encoder=self.encoders.get(r.encoder_model) if r.encoder_model else None,
            vector_optional=r.kind == "graph",
            cache=self.cache,
            deployments=r.deployment_names(),
        )
        previous = self.lanes.get(r.name)
        if previous is not None and previous.deployments == lane.deployments:
            lane.follow(previous.pins)  # the version it follows does not change with its settings
        if self.config.writes.enabled and r.name in self.config.writers:
            lane.follow_writes({d: self.touched.get(d, 0) for d in lane.deployments})
        return lane

    async def search(self, request: SearchRequest | dict[str, Any]) -> SearchResponse:
        """The whole search; raises InvalidRequest or NoRetrieverAvailable."""
        started = now()
        request, selected = validate(request, self.config)
        if not self.config.enabled:
            return self._disabled(request, started)
        [outcomes] = await self.ask([(request, selected)])
        return self._answered(request, outcomes, started)

    async def search_batch(self, batch: BatchSearchRequest | dict[str, Any]) -> BatchSearchResponse:
        """Each search of the batch answered in its place, in order: a bad or failed one is an error
        item and fails no other. Raises only for the body itself (InvalidRequest, PayloadTooLarge)."""
        started = now()
        checked = validate_batch(batch, self.config)
        valid = [c for c in checked if not isinstance(c, InvalidRequest)]
        asked = iter(await self.ask(valid) if valid and self.config.enabled else [])
        return BatchSearchResponse(
            responses=[self._item(c, asked, started) for c in checked], latency_ms=_ms(started)
        )

    def _item(self, checked: tuple[SearchRequest, list[str]] | InvalidRequest, asked: Any, started: float) -> BatchItem:
        """One search of a batch: fused and answered as `search` answers it, or its error."""
        try:
            if isinstance(checked, InvalidRequest):
                raise checked
            request = checked[0]
            if not self.config.enabled:
                return _ok(self._disabled(request, started))
            return _ok(self._answered(request, next(asked), started))
        except (InvalidRequest, NoRetrieverAvailable) as exc:
            return _failed(exc)

    def _answered(self, request: SearchRequest, outcomes: dict[str, Outcome], started: float) -> SearchResponse:
        """Fuse and answer one search, and record it; raises NoRetrieverAvailable as `fuse` does."""
        fusing = now()
        try:
            results = self.fuse(request, outcomes)
        except NoRetrieverAvailable:
            if self.telemetry is not None:
                self.telemetry.searched(outcomes, "failed", now() - started)
            raise
        fused_s = now() - fusing
        response = self.answer(request, outcomes, results, started)
        if self.telemetry is not None:
            self.telemetry.searched(outcomes, "degraded" if response.degraded else "complete",
                                    response.latency_ms / 1000, fused_s)
        return response

    async def ask(self, searches: list[tuple[SearchRequest, list[str]]]) -> list[dict[str, Outcome]]:
        """Each search's outcome per selected retriever. Every lane is asked once, with the queries of
        all the searches that select it, and each model's encoder once, for all of their texts."""
        selecting: dict[str, list[int]] = {}  # lane -> the searches that select it
        for i, (_, selected) in enumerate(searches):
            for name in selected:
                selecting.setdefault(name, []).append(i)
        asks = {name: [_ask(searches[i][0]) for i in indices] for name, indices in selecting.items()}
        # The lanes these searches were validated against, throughout: a changed config applied
        # meanwhile (`configure`) serves the searches that come after.
        lanes = self.lanes
        # The result cache first: a text that every lane of its model finds there is never encoded.
        found = await asyncio.gather(*(lanes[name].lookup(group) for name, group in asks.items()))
        lookups = dict(zip(asks, found, strict=True))
        missed = [(name, i) for name, indices in selecting.items()
                  for j, i in enumerate(indices) if lookups[name].found[j] is None]
        encodings = self._encode(searches, missed, lanes)
        try:
            answers = await asyncio.gather(*(
                lanes[name].search_many(group, encodings.get(_model(lanes[name])), lookups[name])
                for name, group in asks.items()
            ))
        finally:
            for task in encodings.values():
                if task.done() and not task.cancelled():
                    task.exception()  # each lane saw it; mark it retrieved
                task.cancel()
        by_lane = {name: dict(zip(indices, outcomes, strict=True))
                   for (name, indices), outcomes in zip(selecting.items(), answers, strict=True)}
        return [{name: by_lane[name][i] for name in selected} for i, (_, selected) in enumerate(searches)]

    def _encode(self, searches: list[tuple[SearchRequest, list[str]]], missed: list[tuple[str, int]],
                lanes: Mapping[str, RetrieverLane]) -> dict[str | None, asyncio.Future]:
        """One encoding task per model, of every text that a lane of it must search (`missed`: the
        lane, and the search's index), for as long as the longest of their deadlines."""
        texts: dict[str, dict[str, None]] = {}  # per model, each text once, in order
        timeout_ms: dict[str, int] = {}
        encoders: dict[str, EncoderLane] = {}
        for name, i in missed:
            request, lane = searches[i][0], lanes[name]
            model = _model(lane)
            if lane.encoder is not None and model is not None:
                encoders[model] = lane.encoder
                texts.setdefault(model, {})[request.query] = None
                own = min(lane.timeout_ms, request.timeout_ms or lane.timeout_ms)
                timeout_ms[model] = max(timeout_ms.get(model, 0), own)
        return {
            model: asyncio.ensure_future(encoders[model].encode_many(list(t), timeout_s=timeout_ms[model] / 1000))
            for model, t in texts.items()
        }

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
            retry = [lane.breaker.retry_in_s() for n, o in outcomes.items()
                     if o.error == CIRCUIT_OPEN and (lane := self.lanes.get(n)) is not None]
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
        lane = self.lanes.get(name)  # None: a retriever a changed config removed while this search ran
        return outcome.status == "timeout" and own is not None and lane is not None and own < lane.timeout_ms

    def answer(self, request: SearchRequest, outcomes: dict[str, Outcome], results: list[Result],
               started: float) -> SearchResponse:
        statuses = {
            name: _status(outcomes[name]) if name in outcomes else RetrieverStatus(status="skipped")
            for name in self.config.names
        }
        latency_ms = _ms(started)
        if self.config.gateway.log_searches:  # off by default: a flushed log record per request
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

    # -- versions ---------------------------------------------------------------------------------
    async def reload(self, request: ReloadRequest | str) -> ReloadResponse:
        """Every replica of the retriever serves the version its link points to now (serve_app/reload.py)."""
        return await self.reloader.reload(request if isinstance(request, str) else request.name)

    async def follow_versions(self, wait_s: float = SYNC_WAIT_S) -> None:
        """Tell the hub which version of each retriever this replica follows, wait up to `wait_s` for a
        pin to move, and hand the pins to the lanes (which then drop the old version's cached answers)."""
        lanes = [lane for lane in self.lanes.values() if self.config.retriever(lane.name).kind != "synthetic"]
        following = {d: lane.pins.get(d) for lane in lanes for d in lane.deployments}
        pins = await self.versions.sync.remote(gateway_member(self.replica), following, wait_s=wait_s)
        for lane in lanes:
            lane.follow(pins)

    async def upsert(self, request: UpsertRequest | dict[str, Any]) -> WriteResponse:
        """Add or replace documents by id (serve_app/writes.py); answers once they are durable."""
        return await self.writer.upsert(request)

    async def delete(self, request: DeleteRequest | dict[str, Any]) -> WriteResponse:
        """Remove documents by id (serve_app/writes.py); answers once that is durable."""
        return await self.writer.delete(request)

    async def follow_writes(self, wait_s: float = SYNC_WAIT_S) -> None:
        """Tell the hub the last log record this replica knows, wait up to `wait_s` for more, and hand
        each deployment's last record to the lanes: they cache answers under it from then on. The hub
        lets retriever replicas apply a record only once every gateway replica has reported it."""
        answer = await self.versions.follow_writes.remote(gateway_member(self.replica), knows=self.write_end,
                                                          wait_s=wait_s)
        self._learnt(answer["touched"])
        self.write_end = answer["end"]

    def _learnt(self, touched: Mapping[str, int]) -> None:
        """The last log record addressed to each deployment moved: the lanes cache under it from now on."""
        self.touched.update(touched)
        for lane in self.lanes.values():
            if lane.name in self.config.writers:
                lane.follow_writes(touched)

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
            replicas = await self._replicas(lane) if r.kind != "synthetic" else []
            infos.append(RetrieverInfo(
                name=r.name, kind=r.kind, config=r.summary(), healthy=detail is not None and start_error is None,
                detail=detail, error=DISABLED if o is None else start_error or o.error,
                circuit=lane.breaker.snapshot(), in_flight=lane.in_flight, version=lane.pinned, replicas=replicas,
            ))
        return RetrieversResponse(enabled=self.config.enabled, retrievers=infos, encoders=await self._encoders())

    async def _replicas(self, lane: RetrieverLane) -> list[ReplicaVersion]:
        """Each live replica of the lane and the version it serves; [] without a hub, or when it does not answer."""
        if self.versions is None or not self.config.enabled:
            return []
        try:
            return (await self.reloader.replicas(lane))[0]
        except Exception as exc:
            logger.warning("gateway: the version hub did not answer: %s", describe_error(exc))
            return []

    async def _encoders(self) -> list[EncoderInfo]:
        lanes = list(self.encoders.values())
        in_deployment = self.config.encoder.placement == "deployment"
        infos = []
        for lane, o in zip(lanes, await asyncio.gather(*(lane.describe() for lane in lanes)), strict=True):
            detail = o.value if o.status == "ok" else None
            error = (detail or {}).get("error") or (None if detail else o.error)
            infos.append(EncoderInfo(
                name=encoder_name(lane.model) if in_deployment else "gateway", model=lane.model,
                healthy=detail is not None and error is None,
                detail=detail, error=error,
                used_by=[r.name for r in self.config.retrievers if r.encoder_model == lane.model],
            ))
        return infos

    # -- metrics and the dashboard's figures ---------------------------------------------------------
    def _on_batch(self, lane: str) -> Callable[[int], None] | None:
        """What a lane's batcher tells of each batch it sends: its size, to the metrics."""
        telemetry = self.telemetry
        return None if telemetry is None else (lambda size: telemetry.batch_sent(lane, size))

    async def push_stats(self) -> None:
        """Send what this replica counted since its last push to the hub, and set the lanes' gauges."""
        if self.telemetry is None:
            return
        lanes = self.telemetry.lanes_now(self.lanes)
        counted = self.telemetry.take()
        try:
            if self.own_hub is not None:
                self.own_hub.push(self.replica, counted, lanes)
            else:
                await self.stats_hub.push.remote(self.replica, counted, lanes)
        except BaseException:
            self.telemetry.give_back(counted)  # they go with the next push
            raise

    async def live_stats(self) -> dict[str, Any]:
        """GET /v1/stats: the last 15 minutes, for every gateway replica (see serve_app/telemetry.py),
        and each retriever's health now."""
        if self.telemetry is None:
            raise NotFound("metrics are off for this app (gateway.metrics: false)")
        try:
            await self.push_stats()  # this replica's latest counts, before it reads them
            if self.own_hub is not None:
                summary = self.own_hub.summary(self.config.names)
            else:
                summary = await self.stats_hub.summary.remote(self.config.names)
        except Exception as exc:
            raise ServiceUnavailable(f"the stats deployment does not answer: {describe_error(exc)}") from None
        names = list(summary["retrievers"])
        described: list[Outcome | None] = [None] * len(names)  # disabled: no retriever runs
        if self.config.enabled:
            described = list(await asyncio.gather(*(self.lanes[n].describe() for n in names)))
        for name, o in zip(names, described, strict=True):
            health = summary["retrievers"][name]["health"]
            error = DISABLED if o is None else (o.value or {}).get("error") if o.status == "ok" else o.error
            failing = health.pop("failing")
            health["healthy"] = o is not None and o.status == "ok" and not error
            health["error"] = error
            health["state"] = "down" if not health["healthy"] else "failing" if failing else "ok"
        return summary

    def stats(self) -> dict[str, Any]:
        """Counts since this replica started: batch sizes sent per lane (`encoder:<model>` for encoders)."""
        batches = {name: dict(lane.batcher.sizes) for name, lane in self.lanes.items()}
        batches |= {f"encoder:{model}": dict(lane.batcher.sizes) for model, lane in self.encoders.items()}
        return {"batches": batches}


def _model(lane: RetrieverLane) -> str | None:
    return lane.encoder.model if lane.encoder is not None else None


def _ask(request: SearchRequest) -> Ask:
    return Ask(request.query, request.top_k, request.filters, request.timeout_ms, cache=request.cache)


def _ok(response: SearchResponse) -> BatchSearchResult:
    return BatchSearchResult.model_construct(status=200, **dict(response))


def _failed(exc: RagError) -> BatchSearchError:
    """A search's error as a batch item: the body and Retry-After a single search would get."""
    return BatchSearchError(status=exc.status_code, error=ErrorResponse(detail=exc.detail()),
                            retry_after_s=exc.retry_after_s if isinstance(exc, ServiceUnavailable) else None)


def _status(o: Outcome) -> RetrieverStatus:
    return RetrieverStatus(
        status=o.status, latency_ms=o.latency_ms, num_hits=len(o.value or []), error=o.error, coverage=o.coverage,
        cached=o.cache == "hit", cache=o.cache,  # type: ignore[arg-type]  # a CacheState, or None
        version=o.version,
    )


def _ms(started: float) -> float:
    return round((now() - started) * 1000, 2)
