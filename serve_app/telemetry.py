"""What the gateway records about each search: Prometheus metrics, and the window behind /v1/stats.

Two consumers, one recording point, `Telemetry.searched`: called once for each search the retrievers
were asked, alone or in a batch, whether its answer is complete, degraded, or failed (503); not for an
invalid one (422), nor while the app is disabled.

- **Prometheus**, through Ray's metrics system: `ray.serve.metrics` instruments (METRICS below), which
  Serve tags with `deployment`, `replica` and `application`, and Ray exports from every node (with
  its `ray_` prefix: `ragfan_searches_total` is scraped as `ray_ragfan_searches_total`). Rates and
  quantiles are Prometheus's job: cluster_configs/prometheus/ and cluster_configs/grafana/.
- **The /dashboard page**, which has no Prometheus behind it: counts per 5-second bucket over the
  last 15 minutes (`Window`). Every gateway replica pushes what it counted to one `StatsHub`
  (a deployment of its own, serve_app/app.py) every PUSH_INTERVAL_S, and /v1/stats reads the hub's
  merged window, so the figures cover every replica, not just the one that answered. Counts add up
  across replicas; latencies are kept as log-spaced histograms (LATENCY_RATIO apart), which add up
  too, so a merged p99 is as exact as one replica's: within about 8%.

Without Ray (unit tests, `Gateway` on its own) the instruments are `NO_INSTRUMENTS` or a test's
own, and the hub is a plain `StatsHub` in the same process.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from actors.metrics import NO_INSTRUMENTS, Instrument
from serve_app.breaker import CIRCUIT_OPEN
from serve_app.outcome import Outcome

if TYPE_CHECKING:
    from serve_app.config import AppConfig

WINDOW_S = 15 * 60  # what /v1/stats covers
BUCKET_S = 5  # one point of the dashboard's charts
PUSH_INTERVAL_S = 2.0  # how often a gateway replica sends its counts to the hub
REPORTING_S = 10.0  # a gateway replica not heard from for this long no longer counts as up
RECENT_S = 60  # "failing": most outcomes not ok over this last stretch
# Latency histograms for the window: bucket i holds latencies up to LATENCY_BASE_MS * LATENCY_RATIO**i.
LATENCY_BASE_MS, LATENCY_RATIO = 0.1, 1.16

STATUSES = ("ok", "timeout", "error", "skipped", "circuit_open")
Answer = Literal["complete", "degraded", "failed"]
BREAKER_LEVEL = {"closed": 0, "half_open": 1, "open": 2}  # ragfan_breaker_state

def status_of(outcome: Outcome) -> str:
    """An outcome's status as the metrics name it: a skip by an open breaker is `circuit_open`."""
    return "circuit_open" if outcome.status == "skipped" and outcome.error == CIRCUIT_OPEN else outcome.status


def latency_bucket(ms: float) -> int:
    return max(0, math.ceil(math.log(max(ms, LATENCY_BASE_MS) / LATENCY_BASE_MS, LATENCY_RATIO)))


def quantile(histogram: Mapping[int, int], q: float) -> float | None:
    """The q-quantile, in ms, of a latency histogram: the geometric middle of the bucket it falls in."""
    total = sum(histogram.values())
    if not total:
        return None
    rank, seen = q * total, 0
    for i in sorted(histogram):
        seen += histogram[i]
        if seen >= rank:
            upper = LATENCY_BASE_MS * LATENCY_RATIO**i
            return round(upper / math.sqrt(LATENCY_RATIO) if i else upper, 2)
    raise AssertionError("unreachable: the ranks add up to the total")


# -- the window ---------------------------------------------------------------------------------------
@dataclass
class Bucket:
    """What was counted in one BUCKET_S stretch: plain counters, so buckets merge by adding."""

    answers: Counter[str] = field(default_factory=Counter)  # complete / degraded / failed
    latency: Counter[int] = field(default_factory=Counter)  # whole searches, by latency_bucket
    cache: Counter[str] = field(default_factory=Counter)  # hit / miss / bypass, over all retrievers
    statuses: dict[str, Counter[str]] = field(default_factory=dict)  # per retriever
    latencies: dict[str, Counter[int]] = field(default_factory=dict)  # per retriever, by latency_bucket

    def add(self, other: Bucket) -> None:
        self.answers.update(other.answers)
        self.latency.update(other.latency)
        self.cache.update(other.cache)
        for name, statuses in other.statuses.items():
            self.statuses.setdefault(name, Counter()).update(statuses)
        for name, latencies in other.latencies.items():
            self.latencies.setdefault(name, Counter()).update(latencies)


class Window:
    """Buckets by start time (whole multiples of BUCKET_S, unix seconds), the last WINDOW_S of them."""

    def __init__(self) -> None:
        self.buckets: dict[int, Bucket] = {}

    def at(self, t: float) -> Bucket:
        start = int(t // BUCKET_S * BUCKET_S)
        bucket = self.buckets.get(start)
        if bucket is None:
            bucket = self.buckets[start] = Bucket()
        return bucket

    def merge(self, buckets: Mapping[int, Bucket], now: float) -> None:
        for start, bucket in buckets.items():
            if start > now - WINDOW_S - BUCKET_S:
                self.buckets.setdefault(start, Bucket()).add(bucket)
        self.prune(now)

    def prune(self, now: float) -> None:
        for start in [s for s in self.buckets if s <= now - WINDOW_S - BUCKET_S]:
            del self.buckets[start]


# -- recording ----------------------------------------------------------------------------------------
class Telemetry:
    """One gateway replica's recorder: Prometheus instruments now, counts for the hub on `take`."""

    def __init__(self, deadlines_s: Mapping[str, float], *, sharded: set[str] | frozenset[str] = frozenset(),
                 instruments: Mapping[str, Instrument] = NO_INSTRUMENTS, clock: Any = time.time) -> None:
        self.deadlines_s = dict(deadlines_s)
        self.sharded = set(sharded)
        self.metric = instruments
        self.clock = clock
        self.pending = Window()  # counted since the last `take`

    @classmethod
    def of(cls, config: AppConfig, **options: Any) -> Telemetry:
        """A recorder for `config`'s retrievers: their deadlines, and which of them are sharded."""
        telemetry = cls({}, **options)
        telemetry.follow(config)
        return telemetry

    def follow(self, config: AppConfig) -> None:
        """Record for `config`'s retrievers from now on (a changed config applied to the running app)."""
        self.deadlines_s = {r.name: r.timeout_ms / 1000 for r in config.retrievers}
        self.sharded = {r.name for r in config.retrievers if r.shards > 1}

    def searched(self, outcomes: Mapping[str, Outcome], answer: Answer, latency_s: float,
                 fusion_s: float | None = None) -> None:
        """One search, answered (or failed) with these outcomes per selected retriever."""
        metric, bucket = self.metric, self.pending.at(self.clock())
        metric["ragfan_searches_total"].inc(tags={"answer": answer})
        metric["ragfan_search_seconds"].observe(latency_s)
        if fusion_s is not None:
            metric["ragfan_fusion_seconds"].observe(fusion_s)
        bucket.answers[answer] += 1
        bucket.latency[latency_bucket(latency_s * 1000)] += 1
        for name, o in outcomes.items():
            status, latency_ms = status_of(o), o.latency_ms or 0.0
            tags = {"retriever": name, "status": status}
            metric["ragfan_retriever_outcomes_total"].inc(tags=tags)
            bucket.statuses.setdefault(name, Counter())[status] += 1
            if status not in ("skipped", "circuit_open"):  # a skipped retriever took no time
                metric["ragfan_retriever_seconds"].observe(latency_ms / 1000, tags=tags)
                bucket.latencies.setdefault(name, Counter())[latency_bucket(latency_ms)] += 1
            if status == "ok" and name in self.deadlines_s:
                metric["ragfan_retriever_deadline_ratio"].observe(
                    latency_ms / 1000 / self.deadlines_s[name], tags={"retriever": name})
            if o.cache in ("hit", "miss", "bypass"):
                metric["ragfan_cache_lookups_total"].inc(tags={"retriever": name, "result": o.cache})
                bucket.cache[o.cache] += 1
            if name in self.sharded and o.coverage is not None:
                metric["ragfan_shard_coverage_ratio"].observe(o.coverage, tags={"retriever": name})

    def batch_sent(self, lane: str, size: int) -> None:
        self.metric["ragfan_gateway_batch_size"].observe(size, tags={"lane": lane})

    def lanes_now(self, lanes: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        """Each lane's breaker and calls in flight: set as gauges, and returned for the hub."""
        now = {}
        for name, lane in lanes.items():
            state = lane.breaker.state
            self.metric["ragfan_breaker_state"].set(BREAKER_LEVEL[state], tags={"retriever": name})
            self.metric["ragfan_retriever_in_flight"].set(lane.in_flight, tags={"retriever": name})
            now[name] = {"circuit": state, "in_flight": lane.in_flight}
        return now

    def take(self) -> dict[int, Bucket]:
        """What was counted since the last take, handed over (to the hub)."""
        taken, self.pending = self.pending.buckets, Window()
        return taken

    def give_back(self, buckets: Mapping[int, Bucket]) -> None:
        """Counts that did not reach the hub: they go with the next push."""
        self.pending.merge(buckets, self.clock())


# -- the hub ------------------------------------------------------------------------------------------
class StatsHub:
    """Every gateway replica's counts, merged: the figures /v1/stats serves, for the whole app."""

    def __init__(self, clock: Any = time.time) -> None:
        self.clock = clock
        self.window = Window()
        self.replicas: dict[str, tuple[float, dict[str, dict[str, Any]]]] = {}  # replica -> (when, its lanes now)

    def push(self, replica: str, buckets: Mapping[int, Bucket], lanes: dict[str, dict[str, Any]]) -> None:
        now = self.clock()
        self.window.merge(buckets, now)
        self.replicas[replica] = (now, lanes)

    def summary(self, names: list[str]) -> dict[str, Any]:
        """The window as the dashboard draws it: one point per bucket, and each retriever's state now."""
        now = self.clock()
        self.window.prune(now)
        alive = {r: lanes for r, (at, lanes) in self.replicas.items() if now - at <= REPORTING_S}
        last = int(now // BUCKET_S * BUCKET_S)
        times = list(range(last - WINDOW_S + BUCKET_S, last + BUCKET_S, BUCKET_S))
        empty = Bucket()
        buckets = [self.window.buckets.get(t, empty) for t in times]
        # the bucket still filling holds only the seconds gone by so far
        spans = [BUCKET_S] * (len(times) - 1) + [max(1.0, now - last)]
        searches = [sum(b.answers.values()) for b in buckets]
        recent = [b for t, b in zip(times, buckets, strict=True) if t > now - RECENT_S - BUCKET_S]
        total = Bucket()
        for b in buckets:
            total.add(b)
        return {
            "window_s": WINDOW_S, "bucket_s": BUCKET_S, "now": round(now, 3), "gateways": len(alive),
            "times": times,
            "searches": {
                "qps": [round(n / s, 3) for n, s in zip(searches, spans, strict=True)],
                "p50_ms": [quantile(b.latency, 0.5) for b in buckets],
                "p99_ms": [quantile(b.latency, 0.99) for b in buckets],
                "degraded_rate": [_rate(b.answers["degraded"], n) for b, n in zip(buckets, searches, strict=True)],
                "failed_rate": [_rate(b.answers["failed"], n) for b, n in zip(buckets, searches, strict=True)],
            },
            "cache": {"hit_rate": [_rate(b.cache["hit"], sum(b.cache.values())) for b in buckets]},
            "retrievers": {name: self._retriever(name, buckets, total, recent, alive) for name in names},
            "totals": {
                "searches": sum(searches), "degraded": total.answers["degraded"], "failed": total.answers["failed"],
                "cache_hits": total.cache["hit"], "cache_lookups": sum(total.cache.values()),
            },
        }

    @staticmethod
    def _retriever(name: str, buckets: list[Bucket], total: Bucket, recent: list[Bucket],
                   alive: Mapping[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
        latencies = [b.latencies.get(name, Counter()) for b in buckets]
        statuses = [b.statuses.get(name, Counter()) for b in buckets]
        lanes = [lanes[name] for lanes in alive.values() if name in lanes]
        circuit = max((lane["circuit"] for lane in lanes), key=BREAKER_LEVEL.__getitem__, default="closed")
        lately: Counter[str] = Counter()
        for b in recent:
            lately.update(b.statuses.get(name, Counter()))
        return {
            "p50_ms": [quantile(h, 0.5) for h in latencies],
            "p99_ms": [quantile(h, 0.99) for h in latencies],
            "status": {s: [c[s] for c in statuses] for s in STATUSES},
            "totals": {s: total.statuses.get(name, Counter())[s] for s in STATUSES},
            "health": {
                "circuit": circuit,
                "in_flight": sum(lane["in_flight"] for lane in lanes),
                # most of its outcomes in the last minute were not ok (skips included: it was not asked)
                "failing": circuit != "closed" or lately["ok"] * 2 < sum(lately.values()),
            },
        }


def _rate(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None
