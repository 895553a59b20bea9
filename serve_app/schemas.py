"""Request and response models of the HTTP API and the Python client (one set for both)."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator
from pydantic.json_schema import SkipJsonSchema

from actors.types import FilterValue
from serve_app.types import FusionMethod, Status

Include = Literal["text", "metadata"]
CacheState = Literal["hit", "miss", "bypass", "off"]

# C0 and C1 control characters and DEL, less tab and newlines. Real text carries them: a page
# mis-decoded from cp1252 has U+0097 where an em dash was. They mean nothing to a retriever, so a
# query is searched with each one made a space.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
# A lone UTF-16 surrogate (a JSON "\ud800" escape) is no character at all: it becomes U+FFFD, the
# replacement character, as undecodable input does everywhere else.
_SURROGATE = re.compile("[\ud800-\udfff]")
# What a query must contain after cleaning: one character that is neither a space nor a control.
# The OpenAPI schema states the same pattern, so generated clients and fuzzers agree with the server.
QUERY_PATTERN = r"[^\s\x00-\x1f\x7f-\x9f]"
_TEXT = re.compile(QUERY_PATTERN)


def _json_integer(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


# JSON Schema's integer: 5 and 5.0 are integers; `true` and "5" are not (the models are strict). The
# bounds go before the validator, or pydantic leaves them out of the schema's `anyOf` branch.
_JSON_INTEGER = BeforeValidator(_json_integer)
TopK = Annotated[int, Field(ge=1, le=100), _JSON_INTEGER]
TimeoutMs = Annotated[int, Field(ge=1, le=600_000), _JSON_INTEGER]
RRFConstant = Annotated[int, Field(ge=1, le=10_000), _JSON_INTEGER]


def clean_query(text: str) -> str:
    """`text` with each control character (less tab and newlines) a space, and each lone surrogate U+FFFD."""
    return _SURROGATE.sub("\ufffd", _CONTROL.sub(" ", text))


# Strict, as the OpenAPI schema is: a JSON `true` is not the number 1, nor `"5"` the integer 5.
class FusionOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    method: FusionMethod | None = Field(None, description="null: the configured method")
    k: RRFConstant | None = Field(None, description="RRF constant; null: the configured k")
    weights: dict[str, Annotated[float, Field(ge=0, le=1e6)]] | None = Field(
        None, description="per-retriever weights (0 to 1e6), overriding the config"
    )


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)

    query: str = Field(
        description="the question or keywords. Control characters (other than tab and newlines) are searched as "
        "spaces; what is left must not be blank",
        json_schema_extra={"pattern": QUERY_PATTERN},
    )
    top_k: TopK = Field(10, description="number of fused results")
    retrievers: list[str] | None = Field(None, min_length=1, description="retrievers to ask; null asks all")
    filters: dict[str, FilterValue] | None = Field(None, description="exact-match metadata filters")
    timeout_ms: TimeoutMs | None = Field(None, description="lowers every retriever's deadline")
    fusion: FusionOptions | None = Field(None, description="fusion method, k and weights for this request")
    cache: bool = Field(True, description="false: neither read nor fill the result cache for this request")
    include: list[Include] | None = Field(
        None, description="what each result carries besides id, score and sources; null: text and metadata, "
        "[]: neither"
    )

    @field_validator("query")
    @classmethod
    def _clean(cls, v: str) -> str:
        if not _TEXT.search(v):
            raise ValueError("query must contain text: it is empty, or only spaces and control characters")
        return clean_query(v)


class Source(BaseModel):
    retriever: str
    rank: int = Field(description="1-based rank in that retriever's answer")
    score: float = Field(description="that retriever's own score")


def _absent(value: Any) -> bool:
    return value is None


class Result(BaseModel):
    # `text` and `metadata` are left out of the JSON when the request's `include` leaves them out,
    # never sent as null: the schema says string and object, not required.
    id: str
    text: str | SkipJsonSchema[None] = Field(None, exclude_if=_absent, description="when `include` asks for it")
    score: float = Field(description="fused score")
    sources: list[Source]
    metadata: dict[str, str] | SkipJsonSchema[None] = Field(
        None, exclude_if=_absent, description="when `include` asks for it"
    )


class RetrieverStatus(BaseModel):
    status: Status
    latency_ms: float | None = None
    num_hits: int = 0
    error: str | None = None
    coverage: float | None = Field(
        None, description="a sharded retriever: the fraction of its shards that answered (below 1: degraded)"
    )
    cached: bool = Field(False, description="the hits came from the result cache")
    cache: CacheState | None = Field(
        None, description="the result cache for this retriever: hit, miss, bypass (the cache could not answer: "
        "searched uncached), off (no cache, or the request said cache: false); null: not asked"
    )
    version: str | None = Field(
        None, description="the index version that answered (a sharded retriever: each shard's, joined by '|'); "
        "null: not known"
    )


class SearchResponse(BaseModel):
    query: str
    results: list[Result]
    retrievers: dict[str, RetrieverStatus]
    degraded: bool
    latency_ms: float


class ErrorResponse(BaseModel):
    detail: Any = Field(description="what was wrong: a message, or for 503 the reason of each retriever")


# -- batch queries: POST /v1/search/batch ----------------------------------------------------------
class BatchSearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    # Each item is checked on its own (a bad one is answered 422 in its place), so the body itself
    # only needs a list here; the OpenAPI schema states each item as a SearchRequest (serve_app/http.py).
    searches: list[Any] = Field(
        min_length=1, description="SearchRequests, answered in this order; at most gateway.max_batch_searches"
    )


class BatchSearchResult(SearchResponse):
    """One search of a batch that answered: the whole SearchResponse, and its status."""

    status: Literal[200] = 200


class BatchSearchError(BaseModel):
    """One search of a batch that did not: the status and the error body a single search would get."""

    status: Literal[422, 503] = Field(description="422: this search is invalid; 503: no retriever it selects answered")
    error: ErrorResponse
    retry_after_s: int | None = Field(None, description="a 503's Retry-After: when to send this search again")


BatchItem = Annotated[BatchSearchResult | BatchSearchError, Field(discriminator="status")]


class BatchSearchResponse(BaseModel):
    responses: list[BatchItem] = Field(description="one per search, in the request's order")
    latency_ms: float


class RetrieverInfo(BaseModel):
    name: str
    kind: str
    config: dict[str, Any]
    healthy: bool
    detail: dict[str, Any] | None = Field(None, description="what the replica reports: doc count, model, ...")
    error: str | None = Field(None, description="why it is unhealthy: failed to start, no answer, ...")
    circuit: dict[str, Any] | None = Field(
        None, description="this gateway replica's circuit breaker: state (closed, open, half_open), "
        "consecutive_failures, retry_in_s"
    )
    in_flight: int = Field(0, description="calls this gateway replica has outstanding to the retriever")
    version: str | None = Field(None, description="the version pinned for it: every replica serves it, or "
                                "is opening it (a sharded retriever: each shard's, joined by '|')")
    replicas: list[ReplicaVersion] = Field([], description="each live replica and the version it serves")


class ReplicaVersion(BaseModel):
    replica: str = Field(description="the replica's id, as Serve names it")
    deployment: str = Field(description="the retriever's deployment, or the shard's (`corpus-shard0`)")
    version: str | None = Field(description="the version it serves; null: it has not reported one")
    failed: str | None = Field(None, description="a pinned version it could not open, and why")
    opening: bool = Field(False, description="it is still starting, and opens the pinned version")


class ReloadRequest(BaseModel):
    """Which retriever to reload: the path's {name} over HTTP, this body through a handle."""

    name: str


class ReloadResponse(BaseModel):
    """What POST /v1/retrievers/{name}/reload answers once every replica serves the new version."""

    name: str
    version_before: str | None = Field(description="the version pinned before (shards: joined by '|')")
    version: str = Field(description="the version every replica serves now")
    replicas: list[ReplicaVersion]
    seconds: float = Field(description="how long the reload took, verification included")


class WriteDocument(BaseModel):
    """One document to add, or to replace by id, in every named retriever."""

    model_config = ConfigDict(extra="forbid", strict=True)

    id: str = Field(min_length=1, max_length=512, description="the document's id; a write to an id replaces it, and "
                    "every chunk `ragfan ingest` cut from it", json_schema_extra={"pattern": QUERY_PATTERN})
    text: str = Field(description="what is searched. Control characters are kept as spaces; it must not be blank",
                      json_schema_extra={"pattern": QUERY_PATTERN})
    metadata: dict[str, FilterValue] = Field({}, description="exact-match filter values (stored as text)")

    @field_validator("text")
    @classmethod
    def _clean(cls, v: str) -> str:
        if not _TEXT.search(v):
            raise ValueError("text must contain text: it is empty, or only spaces and control characters")
        return clean_query(v)

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not _TEXT.search(v):
            raise ValueError("id must not be blank")
        return clean_query(v)


class UpsertRequest(BaseModel):
    """POST /v1/documents: add or replace documents."""

    model_config = ConfigDict(extra="forbid", strict=True)

    retrievers: list[str] | None = Field(None, min_length=1, description="retrievers to write to; null: every "
                                         "retriever that takes writes")
    documents: list[WriteDocument] = Field(min_length=1, description="applied in order: a later one with the same "
                                           "id wins")
    wait: bool = Field(False, description="answer only once every replica of every named retriever searches them")


class DeleteRequest(BaseModel):
    """POST /v1/documents/delete: remove documents by id."""

    model_config = ConfigDict(extra="forbid", strict=True)

    retrievers: list[str] | None = Field(None, min_length=1, description="retrievers to delete from; null: every "
                                         "retriever that takes writes")
    ids: list[Annotated[str, Field(min_length=1, max_length=512, pattern=QUERY_PATTERN)]] = Field(
        min_length=1, description="an id that is not there is no error: it stays absent")
    wait: bool = Field(False, description="answer only once every replica of every named retriever has applied it")


class WriteResponse(BaseModel):
    accepted: int = Field(description="the documents (or ids) written, each in the write-ahead log, on disk")
    sequence: int = Field(description="the log sequence number of the last of them: later writes have higher ones")
    retrievers: list[str] = Field(description="the retrievers written to")
    visible: bool = Field(description="true: every replica of every one of them searches this write now (`wait`); "
                          "false: it will within seconds")


class EncoderInfo(BaseModel):
    name: str = Field(description="the encoder deployment (`encoder` for the default model), or `gateway` "
                      "where gateway replicas encode (encoder.placement: gateway)")
    model: str
    healthy: bool
    detail: dict[str, Any] | None = Field(None, description="what the replica reports: model, dim, device")
    error: str | None = None
    used_by: list[str] = Field(description="the retrievers whose queries it encodes")


class RetrieversResponse(BaseModel):
    enabled: bool
    retrievers: list[RetrieverInfo]
    encoders: list[EncoderInfo] = []


# -- GET /v1/stats: the dashboard's figures. Every list has one entry per bucket, aligned with `times`;
# null where the bucket has nothing to measure (no search, no lookup).
Series = list[float | None]


class SearchSeries(BaseModel):
    qps: list[float]
    p50_ms: Series
    p99_ms: Series
    degraded_rate: Series = Field(description="share of the bucket's searches answered degraded")
    failed_rate: Series = Field(description="share of the bucket's searches that no retriever answered (503)")


class CacheSeries(BaseModel):
    hit_rate: Series = Field(description="share of the bucket's result-cache lookups that hit")


class RetrieverHealth(BaseModel):
    state: Literal["ok", "failing", "down"] = Field(
        description="down: its replicas do not answer a health check; failing: a gateway replica's circuit for it "
        "is not closed, or most of its outcomes in the last minute were not ok")
    healthy: bool = Field(description="its replicas answer a health check and its index loaded")
    circuit: Literal["closed", "half_open", "open"] = Field(description="the worst over the gateway replicas")
    in_flight: int = Field(description="calls in flight to it, summed over the gateway replicas")
    error: str | None = None


class RetrieverSeries(BaseModel):
    p50_ms: Series
    p99_ms: Series
    status: dict[str, list[int]] = Field(description="outcomes per bucket, per status: ok, timeout, error, "
                                         "skipped, circuit_open")
    totals: dict[str, int] = Field(description="outcomes over the window, per status")
    health: RetrieverHealth


class StatsTotals(BaseModel):
    searches: int
    degraded: int
    failed: int
    cache_hits: int
    cache_lookups: int


class StatsResponse(BaseModel):
    window_s: int = Field(description="the stretch covered: the last 15 minutes")
    bucket_s: int = Field(description="seconds per point")
    now: float = Field(description="the hub's clock, unix seconds")
    gateways: int = Field(description="gateway replicas that reported in the last 10 s")
    times: list[int] = Field(description="each bucket's start, unix seconds, oldest first")
    searches: SearchSeries
    cache: CacheSeries
    retrievers: dict[str, RetrieverSeries]
    totals: StatsTotals


RetrieverInfo.model_rebuild()
