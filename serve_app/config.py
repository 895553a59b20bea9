"""The one YAML file that declares the app and its retrievers, validated once with pydantic.

Relative paths in the file are resolved against the file's own directory. `RAGFAN_DISABLED=true`
overrides `enabled`. An invalid file raises ConfigError naming the file and the bad key, e.g.
`retrievers.1.timeout_ms: Input should be greater than or equal to 1`, or, for a key of another
kind, "retrievers.0.hops: `hops` applies to kind 'graph' only, not 'dense'".

A retriever's config is one model per kind, tagged by `kind`: the kind's options (actors/spec.py,
where their fields and defaults live) plus what every retriever has (`_RetrieverBase`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from actors.encoder_backend import DEFAULT_ENCODER_BACKEND, EncoderBackend
from actors.errors import ConfigError
from actors.index import default_cache_dir
from actors.shards import shard_dir
from actors.spec import (
    KINDS,
    OPTIONS,
    WRITE_KINDS,
    DenseOptions,
    GraphOptions,
    KeywordOptions,
    Kind,
    KindOptions,
    ModelOptions,
    RetrieverSpec,
    SyntheticOptions,
    kinds_with,
)
from serve_app.types import FusionMethod

DEFAULT_CONFIG = Path(__file__).parent / "demo" / "config.yaml"

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30}


def parse_bytes(value: int | float | str) -> int:
    """`1073741824`, `"1GiB"`, `"512 MiB"` -> bytes."""
    if isinstance(value, int | float):
        return int(value)
    match = re.fullmatch(r"\s*([\d.]+)\s*([a-zA-Z]*)\s*", value)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"expected bytes such as 1073741824 or '1GiB', got {value!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


# Ray names these itself; a replica asks for them through num_cpus / num_gpus / memory instead.
_BUILTIN_RESOURCES = {"CPU", "GPU", "memory", "object_store_memory"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ActorOptions(_Strict):
    """Resources each replica declares to Ray; the scheduler places replicas by them."""

    num_cpus: float = Field(0.5, gt=0, description="CPUs per replica; torch/FAISS threads follow it")
    memory: int | None = Field(None, ge=0, description="memory reserved per replica, bytes or '1GiB'")
    num_gpus: float = Field(0, ge=0, description="GPUs per replica")
    resources: dict[str, float] | None = Field(
        None, description="custom Ray resources per replica, e.g. {dense: 1} to land on nodes that advertise it"
    )

    @field_validator("memory", mode="before")
    @classmethod
    def _memory(cls, v: Any) -> Any:
        return None if v is None else parse_bytes(v)

    @field_validator("resources")
    @classmethod
    def _resources(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for name, amount in (v or {}).items():
            if not name or name in _BUILTIN_RESOURCES:
                raise ValueError(f"{name!r} is not a custom resource; use num_cpus, num_gpus or memory")
            if amount < 0:
                raise ValueError(f"resources.{name} must be >= 0, got {amount}")
        return v

    def to_ray(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class BatchConfig(_Strict):
    """How the gateway groups concurrent requests into one call per retriever (serve_app/lanes.py)."""

    max_batch_size: int = Field(32, ge=1, le=512, description="queries in one call at most")
    batch_wait_timeout_s: float = Field(
        0.01, ge=0, le=1, description="how long a batch waits to fill while another batch is in flight; "
        "a lone request never waits"
    )
    max_concurrent_batches: int = Field(
        1, ge=1, le=64, description="batches a replica runs at once; >1 pays off for I/O-bound retrievers"
    )


class CircuitBreakerConfig(_Strict):
    failures: int = Field(5, ge=1, description="consecutive failures or timeouts that open the circuit")
    cooldown_s: float = Field(5.0, ge=0, description="how long an open circuit skips the retriever before a probe")


class ReloadConfig(_Strict):
    """Rolling a new index version into the running app (serve_app/reload.py)."""

    watch_s: float | None = Field(
        None, gt=0, description="check the artifacts link every N seconds and reload when it moves; null: only "
        "on POST /v1/retrievers/{name}/reload or `ragfan reload`"
    )


class ScalingConfig(_Strict):
    num_replicas: int | None = Field(1, ge=1, description="fixed replica count (ignored with autoscaling)")
    autoscaling_config: dict[str, Any] | None = Field(None, description="Serve autoscaling_config")
    max_ongoing_requests: int = Field(32, ge=1, description="concurrent requests per replica")
    max_queued_requests: int = Field(
        -1, ge=-1, description="requests callers may queue for this deployment before Serve rejects them; -1: no limit"
    )

    # A subclass that declares one of these fields again (for another default) must repeat its bounds:
    # tests/unit/test_config.py checks that none is dropped, and that Serve takes whatever passes here.
    @field_validator("max_queued_requests")
    @classmethod
    def _queue_limit(cls, v: int) -> int:
        if v == 0:
            raise ValueError("Input should be -1 (no limit) or at least 1")
        return v

    @field_validator("autoscaling_config")
    @classmethod
    def _autoscaling(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is None:
            return v
        # Serve's own model, imported only when there is one to check: what it would refuse once the
        # cluster is up is refused now, naming the key.
        from ray.serve.config import AutoscalingConfig

        try:
            AutoscalingConfig.model_validate(v)
        except ValidationError as exc:
            problems = [(".".join(str(p) for p in e["loc"]), e["msg"].removeprefix("Value error, "))
                        for e in exc.errors()]
            raise ValueError("; ".join(f"{key}: {msg}" if key else msg for key, msg in problems)) from None
        return v

    @property
    def most_replicas(self) -> int:
        """The replicas this deployment may have: its fixed count, or its autoscaling maximum."""
        return (self.autoscaling_config or {}).get("max_replicas", self.num_replicas or 1)

    def serve_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
        }
        if self.autoscaling_config:
            options["autoscaling_config"] = self.autoscaling_config
        else:
            options["num_replicas"] = self.num_replicas
        return options


class _RetrieverBase(ScalingConfig):
    """What every retriever's config has: its deployment, its part in a search, where its data is.

    A kind's own keys come from its options model in actors/spec.py; each `*RetrieverConfig`
    below is that model plus these, so a key of another kind is an unknown key. Like the options,
    a retriever's config is frozen once validated.
    """

    name: str = Field(pattern=r"^[a-z][a-z0-9_-]{0,39}$", description="deployment name and API name")
    data: Path | None = Field(None, description="documents (JSONL) or, for graph, triples (JSONL or TSV)")
    artifacts: Path | None = Field(None, description="an index directory written by `ragfan ingest` (instead of data)")
    top_k: int = Field(20, ge=1, le=1000, description="hits this retriever contributes to fusion")
    timeout_ms: int = Field(1000, ge=1, le=600_000, description="deadline for this retriever's answer")
    weight: float = Field(1.0, ge=0, description="weight in fusion")
    filter_keys: list[str] = Field([], description="metadata keys this retriever filters on")
    max_in_flight: int = Field(
        64, ge=1, description="calls each gateway replica may have outstanding to this retriever; more are skipped"
    )
    circuit_breaker: CircuitBreakerConfig = CircuitBreakerConfig()
    shards: int = Field(
        1, ge=1, le=64, description="dense only: split the index by document over N deployments, queried together"
    )
    ray_actor_options: ActorOptions = ActorOptions()
    batch: BatchConfig = BatchConfig()
    reload: ReloadConfig = ReloadConfig()

    shown: ClassVar[tuple[str, ...]] = ()  # the kind's options that /v1/retrievers shows

    if TYPE_CHECKING:  # the field comes from the kind's options, a Literal of one kind each

        @property
        def kind(self) -> Kind: ...

    @model_validator(mode="after")
    def _sources_and_shards(self) -> _RetrieverBase:
        if (self.data is None) == (self.artifacts is None):
            raise ValueError("give exactly one of `data` (a collection) and `artifacts` (from `ragfan ingest`)")
        if self.reload.watch_s is not None and self.kind == "synthetic":
            raise ValueError("`reload.watch_s`: a synthetic retriever holds no index to reload")
        if self.shards > 1 and self.kind != "dense":
            raise ValueError(f"`shards` applies to kind 'dense' only, not {self.kind!r} (BM25 scores depend on "
                             "corpus statistics, so shards of a keyword index would not merge exactly)")
        return self

    @property
    def shared_encoder(self) -> bool:
        return isinstance(self, ModelOptions) and self.encoder == "shared"

    @property
    def encoder_model(self) -> str | None:
        """The model whose shared encoder encodes this retriever's queries; None when none does."""
        return self.model if isinstance(self, ModelOptions) and self.encoder == "shared" else None

    def options(self) -> KindOptions:
        """This retriever's kind options, as a replica receives them."""
        options = OPTIONS[self.kind]
        return options.model_validate(self.model_dump(include=set(options.model_fields)))

    def spec(self, cache_dir: Path | None, shard: tuple[int, int] | None = None,
             writes_dir: Path | None = None) -> RetrieverSpec:
        return RetrieverSpec(
            name=self.name, options=self.options(), data=self.data, artifacts=self.artifacts,
            cache_dir=cache_dir, shard=shard, writes_dir=writes_dir,
        )

    def specs(self, cache_dir: Path | None, writes_dir: Path | None = None) -> list[RetrieverSpec]:
        """One spec per deployment: the retriever, or each of its shards."""
        if self.shards == 1:
            return [self.spec(cache_dir, writes_dir=writes_dir)]
        return [self.spec(cache_dir, (i, self.shards), writes_dir) for i in range(self.shards)]

    def deployment_names(self) -> list[str]:
        return [self.name] if self.shards == 1 else [f"{self.name}-shard{i}" for i in range(self.shards)]

    def summary(self) -> dict[str, Any]:
        """What `/v1/retrievers` shows of the config."""
        return {
            "data": self.data.name if self.data else None,
            "artifacts": str(self.artifacts) if self.artifacts else None,
            "top_k": self.top_k,
            "timeout_ms": self.timeout_ms,
            "weight": self.weight,
            "filter_keys": self.filter_keys,
            **{k: getattr(self, k) for k in sorted(self.shown)},
            "shards": self.shards,
            "num_replicas": None if self.autoscaling_config else self.num_replicas,
            "autoscaling": bool(self.autoscaling_config),
            **self.ray_actor_options.to_ray(),
        }


# Options first, so that their `kind` literal is the union's tag.
class DenseRetrieverConfig(DenseOptions, _RetrieverBase):
    shown = ("model", "index", "encoder")


class KeywordRetrieverConfig(KeywordOptions, _RetrieverBase):
    pass


class GraphRetrieverConfig(GraphOptions, _RetrieverBase):
    shown = ("model", "hops", "encoder")


class SyntheticRetrieverConfig(SyntheticOptions, _RetrieverBase):
    pass


RetrieverConfig = Annotated[
    DenseRetrieverConfig | KeywordRetrieverConfig | GraphRetrieverConfig | SyntheticRetrieverConfig,
    Field(discriminator="kind"),
]


class FusionConfig(_Strict):
    method: FusionMethod = Field("minmax", description="see serve_app/fusion.py, docs/QUALITY.md")
    k: int = Field(60, ge=1, description="RRF constant: score = sum(weight / (k + rank))")


class GatewayConfig(ScalingConfig):
    max_ongoing_requests: int = Field(200, ge=1, description="concurrent requests per replica")
    max_queued_requests: int = Field(200, ge=-1, description="beyond this many waiting, answer 503 at once")
    retry_after_s: int = Field(1, ge=0, description="the Retry-After of a 503 for overload")
    max_body_bytes: int = Field(64 * 1024, ge=1024, description="larger request bodies get a 413 (bytes or '64KiB')")
    api_keys_file: Path | None = Field(None, description="one API key per line; adds to RAGFAN_API_KEYS")
    max_batch_searches: int = Field(64, ge=1, description="searches in one POST /v1/search/batch; more get a 413")
    compress_min_bytes: int | None = Field(
        1024, ge=0, description="answers this large or larger are compressed as Accept-Encoding asks (zstd, br, "
        "gzip); null: never (bytes or '1KiB')"
    )
    metrics: bool = Field(
        True, description="record ragfan's Prometheus metrics and the /dashboard's window (GET /v1/stats); "
        "false: neither, and no stats deployment"
    )
    log_searches: bool = Field(
        False, description="log one INFO line per search (its latency and each retriever's status, never the "
        "query); off by default: it costs a flushed log record per request, and the metrics count searches"
    )
    ray_actor_options: ActorOptions = ActorOptions(num_cpus=0.25)

    @field_validator("max_body_bytes", "compress_min_bytes", mode="before")
    @classmethod
    def _body_bytes(cls, v: Any) -> Any:
        return v if v is None else parse_bytes(v)

    def serve_options(self) -> dict[str, Any]:
        backpressure = {"status_code": 503, "retry_after_s": self.retry_after_s}
        return {**super().serve_options(), "backpressure_config": backpressure}


class EncoderConfig(ScalingConfig):
    """The encoder deployment of each model that `encoder: shared` retrievers use (actors/encoder.py)."""

    ray_actor_options: ActorOptions = ActorOptions(num_cpus=0.5)
    max_ongoing_requests: int = Field(64, ge=1, description="concurrent requests per replica")
    batch: BatchConfig = BatchConfig(max_batch_size=256, batch_wait_timeout_s=0.0)
    # onnx by default: on the CPU a lone query costs 0.66x torch's CPU and a batch of 8 as much, for the
    # same vectors, with no torch in the replica (docs/BENCHMARKS.md and docs/QUALITY.md, "Encoder backends").
    backend: EncoderBackend = Field(
        DEFAULT_ENCODER_BACKEND, description="what runs the model on the CPU: onnx (onnxruntime, the model "
        "exported once and cached) or torch (sentence-transformers); a replica with num_gpus runs torch"
    )
    # gateway by default: on SciFact it cut a query's CPU by 17% and its c=1 p50 by 6 ms, with QPS at c=32
    # no lower, and one process (~170 MB) fewer (docs/BENCHMARKS.md, "Where the encoder runs").
    placement: Literal["deployment", "gateway"] = Field(
        "gateway", description="deployment: each model in replicas of its own, shared by every gateway "
        "replica; gateway: each gateway replica holds the model and encodes in-process (one hop and one "
        "process fewer; the gateway then declares this section's CPUs and memory on top of its own)"
    )


class MemoryCacheConfig(_Strict):
    """The result cache in each gateway replica: nothing to set up (serve_app/cache.py)."""

    backend: Literal["memory"] = "memory"
    max_entries: int = Field(10_000, ge=1, description="answers kept per gateway replica; the least recent go first")
    ttl_s: float = Field(300, gt=0, description="seconds an answer is reused at most")


class RedisCacheConfig(_Strict):
    """The result cache in one Redis that every gateway replica and node shares; it fails open."""

    backend: Literal["redis"]
    url: str = Field(pattern=r"^(redis|rediss|unix)://", description="e.g. redis://redis:6379/0")
    ttl_s: float = Field(300, gt=0, description="seconds an answer is reused at most")
    timeout_ms: int = Field(50, ge=1, le=10_000, description="a slower Redis is bypassed: the search goes uncached")


def _cache_backend(value: Any) -> Any:
    return value.get("backend", "memory") if isinstance(value, dict) else getattr(value, "backend", None)


# `backend` may be left out: `cache: {max_entries: 5000}` is the memory cache.
CacheConfig = Annotated[
    Annotated[MemoryCacheConfig, Tag("memory")] | Annotated[RedisCacheConfig, Tag("redis")],
    Discriminator(_cache_backend),
]
CACHE_BACKENDS = ("memory", "redis")


class MergeConfig(_Strict):
    """When a retriever's live writes are merged into a new version of its index (actors/writes.py)."""

    max_docs: int = Field(1000, ge=1, description="merge once a retriever has this many writes not yet merged")
    max_age_s: float = Field(300, gt=0, description="... or once the oldest of them is this many seconds old")


class WritesConfig(_Strict):
    """Live writes: POST /v1/documents and /v1/documents/delete (docs/WRITES.md)."""

    enabled: bool = Field(False, description="every dense and keyword retriever takes writes")
    dir: Path | None = Field(
        None, description="the write-ahead log and the versions merged from it; default "
        "<cache_dir>/<app_name>/writes. On a cluster: storage every node mounts, as durable as the writes"
    )
    merge: MergeConfig = MergeConfig()
    max_documents: int = Field(1000, ge=1, description="documents (or ids) in one write; more get a 413")
    max_body_bytes: int = Field(8 << 20, ge=1024, description="a larger write body gets a 413 (bytes or '8MiB')")
    wait_timeout_s: float = Field(30, gt=0, description="how long `wait: true` waits for every replica")

    @field_validator("max_body_bytes", mode="before")
    @classmethod
    def _body_bytes(cls, v: Any) -> Any:
        return parse_bytes(v)


class AppConfig(_Strict):
    app_name: str = Field("ragfan", pattern=r"^[A-Za-z0-9_-]+$")
    enabled: bool = Field(True, description="false: answer every search at once, empty, loading nothing")
    cache_dir: Path | None = Field(None, description="index cache; default $RAGFAN_CACHE_DIR or ~/.cache/ragfan")
    max_query_chars: int = Field(8192, ge=1)
    fusion: FusionConfig = FusionConfig()
    gateway: GatewayConfig = GatewayConfig()
    encoder: EncoderConfig = EncoderConfig()
    cache: CacheConfig | None = Field(
        MemoryCacheConfig(), description="each retriever's answers, reused: memory (default), redis, or null: off"
    )
    writes: WritesConfig = WritesConfig()
    retrievers: list[RetrieverConfig] = Field(min_length=1)

    @field_validator("retrievers")
    @classmethod
    def _unique_names(cls, retrievers: list[RetrieverConfig]) -> list[RetrieverConfig]:
        names = [r.name for r in retrievers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"retriever names must be unique; repeated: {', '.join(dupes)}")
        for reserved, what in (("gateway", "the ingress deployment"), ("stats", "the stats deployment"),
                               ("versions", "the version hub deployment")):
            if reserved in names:
                raise ValueError(f"'{reserved}' is reserved for {what}")
        taken = sorted(n for n in names if n == "encoder" or n.startswith("encoder-"))
        if taken:
            raise ValueError(f"'encoder' and 'encoder-*' are reserved for encoder deployments: {', '.join(taken)}")
        return retrievers

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.retrievers]

    def retriever(self, name: str) -> RetrieverConfig:
        return next(r for r in self.retrievers if r.name == name)

    @property
    def writes_dir(self) -> Path | None:
        """Where the log and merged versions live; None when writes are off."""
        if not self.writes.enabled:
            return None
        return self.writes.dir or (self.cache_dir or default_cache_dir()) / self.app_name / "writes"

    @property
    def writers(self) -> list[str]:
        """The retrievers that take writes: keyword ones, and dense ones whose queries the shared encoder
        encodes (it embeds the writes too)."""
        return [r.name for r in self.retrievers if self.writes.enabled and r.kind in WRITE_KINDS
                and (r.kind != "dense" or r.shared_encoder)]

    def specs(self, r: RetrieverConfig) -> list[RetrieverSpec]:
        """What each deployment of `r` (each shard's) opens, with the writes directory if it takes writes."""
        return r.specs(self.cache_dir, self.writes_dir if r.name in self.writers else None)

    @property
    def shared_models(self) -> list[str]:
        """The models whose queries the gateway encodes once for every retriever that uses them (on
        their encoder deployment, or in the gateway replica), in the order retrievers name them."""
        return list(dict.fromkeys(r.encoder_model for r in self.retrievers if r.encoder_model))

    @property
    def encoder_deployments(self) -> list[str]:
        """The models that run an encoder deployment of their own (`encoder.placement: deployment`)."""
        return self.shared_models if self.encoder.placement == "deployment" else []

    def gateway_actor_options(self) -> ActorOptions:
        """What a gateway replica declares: its own resources, and with `encoder.placement: gateway`
        the encoder's for each model it holds."""
        own = self.gateway.ray_actor_options
        models = len(self.shared_models) if self.encoder.placement == "gateway" else 0
        if not models:
            return own
        enc = self.encoder.ray_actor_options
        memory = None if own.memory is None and enc.memory is None else (own.memory or 0) + models * (enc.memory or 0)
        return own.model_copy(update={"num_cpus": own.num_cpus + models * enc.num_cpus, "memory": memory,
                                      "num_gpus": own.num_gpus + models * enc.num_gpus})


def _quoted(kinds: list[str]) -> str:
    quoted = [repr(k) for k in kinds]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} and {quoted[-1]}"


def _error_line(err: ErrorDetails) -> str:
    """One error as `key.path: message`, with the retriever's kind tag taken out of the path."""
    loc: list[int | str] = list(err["loc"])
    msg, kind = err["msg"], None
    # pydantic puts a union's tag in the path (retrievers.1.dense.timeout_ms, cache.redis.url): take it out
    if len(loc) >= 3 and loc[0] == "retrievers" and loc[2] in KINDS:
        kind = loc.pop(2)
    if len(loc) >= 2 and loc[0] == "cache" and loc[1] in CACHE_BACKENDS:
        loc.pop(1)
    tag, valid = ("backend", CACHE_BACKENDS) if loc[:1] == ["cache"] else ("kind", KINDS)
    if err["type"] == "union_tag_invalid":
        loc, msg = [*loc, tag], f"unknown {tag} {err.get('ctx', {}).get('tag')!r}; valid {tag}s: {', '.join(valid)}"
    elif err["type"] == "union_tag_not_found":
        loc, msg = [*loc, tag], f"Field required; valid {tag}s: {', '.join(valid)}"
    elif err["type"] == "extra_forbidden" and kind is not None and len(loc) == 3:
        owners = kinds_with(str(loc[2]))  # empty for a key of no kind at all: pydantic's message stays
        if owners:
            msg = f"`{loc[2]}` applies to kind{'s' if len(owners) > 1 else ''} {_quoted(owners)} only, not {kind!r}"
    return f"{'.'.join(str(p) for p in loc) or '(top level)'}: {msg}"


def _format(exc: ValidationError, source: str) -> str:
    return "\n".join([f"invalid config {source}:", *(f"  {_error_line(err)}" for err in exc.errors())])


def _resolved(r: RetrieverConfig, base_dir: Path) -> dict[str, Path]:
    """The retriever's paths, resolved against the config file's directory."""
    paths = {"data": r.data, "artifacts": r.artifacts, "aliases": r.aliases if isinstance(r, GraphOptions) else None}
    # abspath, not resolve: `ragfan ingest` output is a symlink swapped on each rebuild, and a
    # replica that starts later must open the link's version then, not the one seen at load.
    return {key: Path(os.path.abspath(base_dir / path)) for key, path in paths.items() if path is not None}


def parse_config(raw: Any, *, base_dir: Path, source: str = "<config>") -> AppConfig:
    """Validate a config mapping; relative paths resolve against `base_dir`."""
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid config {source}: expected a mapping at the top level")
    try:
        config = AppConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format(exc, source)) from None
    config.retrievers = [r.model_copy(update=_resolved(r, base_dir)) for r in config.retrievers]
    if config.cache_dir is not None:
        config.cache_dir = (base_dir / config.cache_dir.expanduser()).resolve()
    if config.writes.dir is not None:
        config.writes.dir = (base_dir / config.writes.dir.expanduser()).resolve()
    if config.gateway.api_keys_file is not None:
        config.gateway.api_keys_file = (base_dir / config.gateway.api_keys_file.expanduser()).resolve()
    if os.environ.get("RAGFAN_DISABLED", "").strip().lower() in {"1", "true", "yes", "on"}:
        config.enabled = False
    return config


def file_problems(config: AppConfig) -> dict[str, str]:
    """Retrievers whose data, aliases or artifacts are missing, and why; {} when all are there.

    `ragfan serve` warns about these and starts the rest: such a retriever stays unhealthy, with
    this reason, and answers are degraded without it.
    """
    if not config.enabled:
        return {}
    problems: dict[str, str] = {}
    for i, r in enumerate(config.retrievers):
        aliases = r.aliases if isinstance(r, GraphOptions) else None
        for key, path in (("data", r.data), ("aliases", aliases)):
            if path is not None and not path.is_file():
                problems.setdefault(r.name, f"retrievers.{i}.{key}: file not found: {path}")
        if r.artifacts is not None:
            dirs = [r.artifacts] if r.shards == 1 else [shard_dir(r.artifacts, s, r.shards) for s in range(r.shards)]
            missing = next((d for d in dirs if not (d / "manifest.json").is_file()), None)
            if missing is not None:
                build = "`ragfan ingest`" if r.shards == 1 else f"`ragfan ingest --shards {r.shards}`"
                problems.setdefault(
                    r.name, f"retrievers.{i}.artifacts: no manifest.json in {missing}; build it with {build}"
                )
    return problems


def check_startable(config: AppConfig) -> dict[str, str]:
    """`file_problems`, after raising ConfigError when no retriever at all could start.

    Some retrievers missing their files: the app starts degraded without them, and says so. All of
    them: nothing could answer, and a running service that only ever answers 503 helps nobody.
    """
    problems = file_problems(config)
    if problems and len(problems) == len(config.retrievers):
        raise ConfigError("no retriever can start:\n  " + "\n  ".join(problems.values()))
    return problems


def check_files(config: AppConfig) -> None:
    """Raise ConfigError naming every missing file (for tools that need the whole config)."""
    problems = file_problems(config)
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems.values()))


def load_config(path: str | Path | None = None) -> AppConfig:
    """Load and validate a config file; None means the embedded default."""
    path = Path(path) if path else DEFAULT_CONFIG
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    return parse_config(raw, base_dir=path.resolve().parent, source=str(path))
