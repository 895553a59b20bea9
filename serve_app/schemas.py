"""Request and response models of the HTTP API and the Python client (one set for both)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

FilterValue = str | int | float | bool
# C0 and C1 control characters, less tab and newlines: never meaningful in a query
_CONTROL = frozenset(chr(c) for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)]) - {"\t", "\n", "\r"}
Status = Literal["ok", "timeout", "error", "skipped"]


class FusionOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Literal["rrf", "minmax", "dbsf"] | None = Field(None, description="null: the configured method")
    k: int | None = Field(None, ge=1, le=10_000, description="RRF constant; null: the configured k")
    weights: dict[str, float] | None = Field(None, description="per-retriever weights, overriding the config")

    @field_validator("weights")
    @classmethod
    def _weights(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is not None and any(not 0 <= w <= 1e6 for w in v.values()):
            raise ValueError("weights must be between 0 and 1e6")
        return v


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    query: str = Field(description="the question or keywords; not empty")
    top_k: int = Field(10, ge=1, le=100, description="number of fused results")
    retrievers: list[str] | None = Field(None, min_length=1, description="retrievers to ask; null asks all")
    filters: dict[str, FilterValue] | None = Field(None, description="exact-match metadata filters")
    timeout_ms: int | None = Field(None, ge=1, le=600_000, description="lowers every retriever's deadline")
    fusion: FusionOptions | None = Field(None, description="fusion method, k and weights for this request")

    @field_validator("query")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("query must not be empty or whitespace")
        bad = next((i for i, ch in enumerate(v) if ch in _CONTROL), None)
        if bad is not None:
            raise ValueError(f"query contains control character U+{ord(v[bad]):04X} at position {bad}")
        return v


class Source(BaseModel):
    retriever: str
    rank: int = Field(description="1-based rank in that retriever's answer")
    score: float = Field(description="that retriever's own score")


class Result(BaseModel):
    id: str
    text: str
    score: float = Field(description="fused score")
    sources: list[Source]
    metadata: dict[str, str]


class RetrieverStatus(BaseModel):
    status: Status
    latency_ms: float | None = None
    num_hits: int = 0
    error: str | None = None
    coverage: float | None = Field(
        None, description="a sharded retriever: the fraction of its shards that answered (below 1: degraded)"
    )


class SearchResponse(BaseModel):
    query: str
    results: list[Result]
    retrievers: dict[str, RetrieverStatus]
    degraded: bool
    latency_ms: float


class ErrorResponse(BaseModel):
    detail: Any = Field(description="what was wrong: a message, or for 503 the reason of each retriever")


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


class EncoderInfo(BaseModel):
    name: str = Field(description="the encoder deployment: `encoder` for the default model")
    model: str
    healthy: bool
    detail: dict[str, Any] | None = Field(None, description="what the replica reports: model, dim, device")
    error: str | None = None
    used_by: list[str] = Field(description="the retrievers whose queries it encodes")


class RetrieversResponse(BaseModel):
    enabled: bool
    retrievers: list[RetrieverInfo]
    encoders: list[EncoderInfo] = []
