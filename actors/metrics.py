"""ragfan's Prometheus metrics: one table, and the instruments made from it.

Recorded through Ray's metrics system (`ray.serve.metrics`), so Serve tags every series with
`deployment`, `replica` and `application`, and Ray exports them from every node's metrics port,
prefixed `ray_` (`ragfan_searches_total` is scraped as `ray_ragfan_searches_total`). The gateway
records most of them (serve_app/telemetry.py); the encoder replicas record their batch sizes.
docs/MONITORING.md has this table for operators; a unit test keeps the two in step.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

# Boundaries of the Prometheus histograms, in their units.
FAST_SECONDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05)  # fusion
SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
RATIOS = (0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: Literal["counter", "histogram", "gauge"]
    description: str
    tags: tuple[str, ...] = ()
    boundaries: tuple[float, ...] = ()


METRICS = (
    MetricSpec("ragfan_searches_total", "counter",
               "Searches answered, by answer: complete, degraded (a retriever failed or a shard was missing), "
               "failed (no retriever answered: 503). Each search of a batch counts.", ("answer",)),
    MetricSpec("ragfan_search_seconds", "histogram", "Whole-search latency at the gateway.", (), SECONDS),
    MetricSpec("ragfan_fusion_seconds", "histogram", "Time to fuse one search's ranked lists.", (), FAST_SECONDS),
    MetricSpec("ragfan_retriever_seconds", "histogram", "One retriever's latency per search as the gateway saw it, "
               "by status.", ("retriever", "status"), SECONDS),
    MetricSpec("ragfan_retriever_outcomes_total", "counter",
               "Each retriever's outcome per search: ok, timeout, error, skipped (in-flight bound), circuit_open.",
               ("retriever", "status")),
    MetricSpec("ragfan_retriever_deadline_ratio", "histogram",
               "An answered (ok) search's retriever latency over that retriever's deadline: near 1 is close to "
               "timing out.", ("retriever",), RATIOS),
    MetricSpec("ragfan_cache_lookups_total", "counter", "Result-cache lookups per retriever: hit, miss, bypass "
               "(the cache was unreachable).", ("retriever", "result")),
    MetricSpec("ragfan_gateway_batch_size", "histogram", "Queries per call the gateway sends downstream; lane is a "
               "retriever's name or encoder:<model>.", ("lane",), SIZES),
    MetricSpec("ragfan_encoder_batch_size", "histogram", "Texts per forward pass in an encoder replica.", ("model",),
               SIZES),
    MetricSpec("ragfan_retriever_in_flight", "gauge", "Calls in flight from this gateway replica to a retriever.",
               ("retriever",)),
    MetricSpec("ragfan_breaker_state", "gauge", "A gateway replica's circuit breaker for a retriever: 0 closed, "
               "1 half-open, 2 open.", ("retriever",)),
    MetricSpec("ragfan_shard_coverage_ratio", "histogram", "Share of a sharded retriever's shards that answered, "
               "per search.", ("retriever",), RATIOS),
)


class Instrument(Protocol):
    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None: ...
    def observe(self, value: float, tags: dict[str, str] | None = None) -> None: ...
    def set(self, value: float, tags: dict[str, str] | None = None) -> None: ...


class _Ignored:
    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        pass

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
        pass

    def set(self, value: float, tags: dict[str, str] | None = None) -> None:
        pass


NO_INSTRUMENTS: Mapping[str, Instrument] = {spec.name: _Ignored() for spec in METRICS}




def ray_instruments(names: tuple[str, ...] | None = None) -> dict[str, Instrument]:
    """METRICS (or those named) as `ray.serve.metrics` instruments. Made inside a replica, they
    carry its deployment, replica and application tags."""
    from ray.serve import metrics

    made: dict[str, Any] = {}
    for spec in METRICS:
        if names is None or spec.name in names:
            options: dict[str, Any] = {"description": spec.description, "tag_keys": spec.tags}
            if spec.kind == "histogram":
                options["boundaries"] = list(spec.boundaries)
            kind = {"counter": metrics.Counter, "gauge": metrics.Gauge, "histogram": metrics.Histogram}[spec.kind]
            made[spec.name] = kind(spec.name, **options)
    return made
