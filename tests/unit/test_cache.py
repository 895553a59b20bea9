"""The result cache's backends and keys, without Ray: an injected clock, and fakeredis for Redis.

The real Redis, killed and restarted under traffic, is in tests/integration/test_cache.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

import fakeredis
import pytest

from actors.types import Hit
from serve_app.breaker import CircuitBreaker
from serve_app.cache import MemoryCache, RedisCache, cache_key, decode_hits, encode_hits
from tests.unit.fakes import Clock

HITS = [Hit("d1", 0.9, "Vitamin D deficiency", {"domain": "neuro"}), Hit("d2", 0.5, "p53 — mutated", {})]


def test_keys_normalise_the_query_and_name_everything_that_changes_the_answer():
    key = cache_key("corpus", "f1", "vitamin  D\n deficiency ", 20, {"domain": "neuro"})
    assert key == cache_key("corpus", "f1", "vitamin D deficiency", 20, {"domain": "neuro"})
    assert key.startswith("ragfan:v1:corpus:f1:")
    others = [
        cache_key("keyword", "f1", "vitamin D deficiency", 20, {"domain": "neuro"}),  # another retriever
        cache_key("corpus", "f2", "vitamin D deficiency", 20, {"domain": "neuro"}),  # another index
        cache_key("corpus", "f1", "Vitamin D deficiency", 20, {"domain": "neuro"}),  # case is kept
        cache_key("corpus", "f1", "vitamin D deficiency", 10, {"domain": "neuro"}),  # another top_k
        cache_key("corpus", "f1", "vitamin D deficiency", 20, None),  # no filter
        cache_key("corpus", "f1", "vitamin D deficiency", 20, {"domain": "onco"}),
    ]
    assert len({key, *others}) == 7


def test_hits_round_trip_through_bytes():
    assert decode_hits(encode_hits(HITS)) == HITS


async def test_memory_cache_keeps_the_most_recent_and_expires_entries():
    clock = Clock()
    cache = MemoryCache(max_entries=2, ttl_s=10, clock=clock)
    await cache.set_many({"a": HITS, "b": HITS[:1]})
    assert await cache.get_many(["a", "b", "c"]) == [HITS, HITS[:1], None]
    await cache.get_many(["a"])  # a is now the most recent
    await cache.set_many({"c": []})
    assert await cache.get_many(["a", "b", "c"]) == [HITS, None, []]  # b, the least recent, went
    clock.now = 10.0
    assert await cache.get_many(["a", "c"]) == [None, None]  # expired at ttl_s
    assert cache.describe()["entries"] == 0


async def test_redis_cache_stores_reads_and_expires_with_redis_ttl():
    server = fakeredis.FakeServer()
    cache = RedisCache("redis://fake", ttl_s=5, client=fakeredis.FakeAsyncRedis(server=server))
    assert await cache.get_many(["k1", "k2"]) == [None, None]
    await cache.set_many({"k1": HITS})
    assert await cache.get_many(["k1", "k2"]) == [HITS, None]
    ttl_ms = await fakeredis.FakeAsyncRedis(server=server).pttl("k1")
    assert 0 < ttl_ms <= 5000


class DownRedis:
    """A Redis client whose every call fails as a connection to a dead server does."""

    def __init__(self) -> None:
        self.calls = 0

    async def mget(self, keys):
        self.calls += 1
        raise ConnectionError("Error 111 connecting to localhost:6390. Connection refused.")

    def pipeline(self, transaction=True):
        self.calls += 1
        raise ConnectionError("Error 111 connecting to localhost:6390. Connection refused.")


async def test_a_dead_redis_is_a_bypass_logged_once_and_the_breaker_stops_asking(caplog):
    clock = Clock()
    down = DownRedis()
    cache = RedisCache("redis://:secret@localhost:6390/0", client=down,
                       breaker=CircuitBreaker(failures=2, cooldown_s=5, clock=clock))
    with caplog.at_level(logging.WARNING, logger="ray.serve"):
        assert await cache.get_many(["k"]) is None
        await cache.set_many({"k": HITS})  # dropped, not raised
        assert await cache.get_many(["k"]) is None  # the circuit is open now: Redis is not asked
    assert down.calls == 2
    warnings = [r.getMessage() for r in caplog.records if "result cache" in r.getMessage()]
    assert len(warnings) == 1 and "secret" not in warnings[0] and "redis://***@localhost:6390/0" in warnings[0]
    assert cache.describe()["circuit"]["state"] == "open" and "Connection refused" in cache.describe()["trouble"]


async def test_redis_back_after_the_cooldown_is_used_again(caplog):
    clock = Clock()
    breaker = CircuitBreaker(failures=1, cooldown_s=5, clock=clock)
    cache = RedisCache("redis://fake", client=DownRedis(), breaker=breaker)
    assert await cache.get_many(["k"]) is None
    cache._redis = fakeredis.FakeAsyncRedis()  # Redis is back
    assert await cache.get_many(["k"]) is None  # still inside the cooldown: not asked
    clock.now = 5.0
    with caplog.at_level(logging.INFO, logger="ray.serve"):
        assert await cache.get_many(["k"]) == [None]  # the probe: a miss, answered
    assert cache.describe()["circuit"]["state"] == "closed" and cache.describe()["trouble"] is None
    assert any("answers again" in r.getMessage() for r in caplog.records)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        MemoryCache(max_entries=0)


# -- through the gateway's lanes, on fake handles -------------------------------------------------
class Replica:
    """A replica stand-in over the synthetic retriever that reports an index fingerprint and counts searches."""

    def __init__(self, retriever, fingerprint: str = "index-v1") -> None:
        self.retriever = retriever
        self.fingerprint = fingerprint
        self.searched: list[str] = []
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()
        self.fail = False

    async def search(self, queries):
        self.searched += [q.text for q in queries]
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise RuntimeError("index file is corrupt")
        return self.retriever.search(queries)

    def describe(self):
        return {**self.retriever.describe(), "fingerprint": self.fingerprint}


@pytest.fixture
def cached_gateway(docs, embedder):
    from actors.synthetic import SyntheticRetriever
    from serve_app.config import parse_config
    from serve_app.gateway import Gateway
    from serve_app.testing import FakeHandle
    from tests.unit.fakes import FakeEncoder

    config = parse_config({"retrievers": [
        {"name": "a", "kind": "synthetic", "data": "x.jsonl", "timeout_ms": 2000},
        {"name": "d", "kind": "dense", "data": "x.jsonl", "timeout_ms": 2000},
    ]}, base_dir=Path("."))
    replicas = {name: Replica(SyntheticRetriever(name=name, documents=docs)) for name in ("a", "d")}
    encoder = FakeHandle(FakeEncoder(embedder))
    gateway = Gateway(config, {n: [FakeHandle(r)] for n, r in replicas.items()}, {"default": encoder})
    return gateway, replicas, encoder


def states(response) -> dict[str, tuple]:
    return {n: (s.cache, s.cached) for n, s in response.retrievers.items()}


async def test_a_repeated_query_is_answered_from_the_cache_without_the_encoder_or_the_retrievers(cached_gateway):
    gateway, replicas, encoder = cached_gateway
    first = await gateway.search({"query": "risk of cancers"})
    assert states(first) == {"a": ("miss", False), "d": ("miss", False)}
    again = await gateway.search({"query": "risk  of cancers "})
    assert states(again) == {"a": ("hit", True), "d": ("hit", True)}
    assert again.results == first.results
    assert [r.searched for r in replicas.values()] == [["risk of cancers"]] * 2  # searched once each
    assert [m for m, _ in encoder.calls] == ["encode"]  # and encoded once: the hit needs no vector
    off = await gateway.search({"query": "risk of cancers", "cache": False})
    assert states(off) == {"a": ("off", False), "d": ("off", False)} and len(replicas["a"].searched) == 2


async def test_concurrent_identical_misses_share_one_retrieval(cached_gateway):
    gateway, replicas, _ = cached_gateway
    replicas["a"].gate = asyncio.Event()
    first = asyncio.ensure_future(gateway.search({"query": "aspirin", "retrievers": ["a"]}))
    await replicas["a"].entered.wait()  # the first is at the retriever
    second = asyncio.ensure_future(gateway.search({"query": "aspirin", "retrievers": ["a"]}))
    for _ in range(10):
        await asyncio.sleep(0)
    replicas["a"].gate.set()
    one, two = await first, await second
    assert replicas["a"].searched == ["aspirin"]  # the second waited for the first's answer
    assert one.results == two.results and states(two)["a"] == ("miss", False)


async def test_failures_and_timeouts_are_never_cached(cached_gateway):
    gateway, replicas, _ = cached_gateway
    replicas["a"].fail = True
    assert (await gateway.search({"query": "aspirin", "retrievers": ["a", "d"]})).retrievers["a"].status == "error"
    replicas["a"].fail = False
    assert states(await gateway.search({"query": "aspirin", "retrievers": ["a"]}))["a"] == ("miss", False)
    replicas["a"].gate = asyncio.Event()  # hangs past the request's own deadline
    late = await gateway.search({"query": "metformin", "retrievers": ["a", "d"], "timeout_ms": 20})
    assert late.retrievers["a"].status == "timeout"
    replicas["a"].gate.set()
    assert states(await gateway.search({"query": "metformin", "retrievers": ["a"]}))["a"] == ("miss", False)


async def test_a_new_index_fingerprint_is_never_answered_from_the_old_one(cached_gateway, monkeypatch):
    from serve_app import lanes

    gateway, replicas, _ = cached_gateway
    monkeypatch.setattr(lanes, "FINGERPRINT_TTL_S", 0.0)  # ask the replicas every time
    await gateway.search({"query": "aspirin", "retrievers": ["a"]})
    assert states(await gateway.search({"query": "aspirin", "retrievers": ["a"]}))["a"] == ("hit", True)
    replicas["a"].fingerprint = "index-v2"  # a re-ingest, redeployed
    assert states(await gateway.search({"query": "aspirin", "retrievers": ["a"]}))["a"] == ("miss", False)


async def test_a_dead_redis_serves_every_search_uncached(cached_gateway):
    gateway, replicas, _ = cached_gateway
    down = RedisCache("redis://localhost:6390", client=DownRedis())
    for lane in gateway.lanes.values():
        lane.cache = down
    r = await gateway.search({"query": "aspirin"})
    assert r.results and states(r) == {"a": ("bypass", False), "d": ("bypass", False)}


# -- a fill that ends without an answer hands its waiters back, at once ---------------------------------
async def until(condition, tries: int = 200) -> None:
    for _ in range(tries):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("the condition never held")


def resolved(value):
    future = asyncio.get_running_loop().create_future()
    future.set_result(value)
    return future


@pytest.mark.parametrize("how", ["encoder fails", "encoder times out", "cancelled waiting for the encoder",
                                 "cancelled at the retriever"])
async def test_an_identical_request_parked_on_a_fill_that_ends_without_an_answer_fetches_its_own(docs, how):
    """Every way `_fetch` can end without an answer wakes the requests parked on its key: each then
    asks on its own and answers, instead of waiting out its deadline and reporting a timeout."""
    import numpy as np

    from actors.errors import RetrieverFailed
    from actors.synthetic import SyntheticRetriever
    from serve_app.cache import MemoryCache
    from serve_app.lanes import Ask, RetrieverLane
    from serve_app.testing import FakeHandle

    replica = Replica(SyntheticRetriever(name="d", documents=docs))
    lane = RetrieverLane("d", [FakeHandle(replica)], top_k=3, timeout_ms=60_000, cache=MemoryCache())
    vector = {"aspirin": np.zeros(4, dtype=np.float32)}  # each text's vector, as EncoderLane.encode_many answers
    first_vectors = asyncio.get_running_loop().create_future()
    if how == "cancelled at the retriever":
        first_vectors.set_result(vector)
        replica.gate = asyncio.Event()
    own_ms = 20 if how == "encoder times out" else None
    first = asyncio.ensure_future(lane.search_many([Ask("aspirin", 3, timeout_ms=own_ms)], first_vectors))
    await until(lambda: lane._filling)  # the first is filling the key
    if how == "cancelled at the retriever":
        await replica.entered.wait()
    second = asyncio.ensure_future(lane.search_many([Ask("aspirin", 3)], resolved(vector)))
    await settle_many()
    assert not second.done() and replica.searched in ([], ["aspirin"])  # parked on the first's fill
    try:
        if how == "encoder fails":
            first_vectors.set_exception(RetrieverFailed("encoder for default: replica died"))
        elif how.startswith("cancelled"):
            first.cancel()
        if how == "cancelled at the retriever":
            replica.gate.set()
        with contextlib.suppress(asyncio.CancelledError):
            await first
        await until(second.done)  # not after its 60 s deadline
        [outcome] = second.result()
        assert outcome.status == "ok" and outcome.value and not lane._filling
    finally:
        second.cancel()


async def settle_many() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_a_batch_with_a_cached_query_still_opens_the_circuit_of_a_dead_retriever(cached_gateway):
    """The breaker records the outcome of the call the retriever got, never a cached answer's."""
    from serve_app.breaker import CircuitBreaker

    gateway, replicas, _ = cached_gateway
    lane = gateway.lanes["a"]
    lane.breaker = CircuitBreaker(failures=2, cooldown_s=60)
    await gateway.search({"query": "aspirin", "retrievers": ["a"]})  # cached from now on
    replicas["a"].fail = True  # the retriever dies
    for fresh in ("metformin", "p53 cancers"):
        r = await gateway.search_batch({"searches": [{"query": "aspirin", "retrievers": ["a"]},
                                                     {"query": fresh, "retrievers": ["a"]}]})
        cached, failed = r.responses
        assert states(cached)["a"] == ("hit", True) and failed.status == 503  # the fresh one reached the dead retriever
    assert lane.breaker.state == "open" and lane.breaker.consecutive_failures == 2


async def test_a_malformed_value_under_the_prefix_is_a_miss_logged_once(cached_gateway, caplog):
    """The issue's repro: one search, its Redis values overwritten with a plain string, the same search."""
    server = fakeredis.FakeServer()
    redis = fakeredis.FakeAsyncRedis(server=server)
    cache = RedisCache("redis://fake", client=redis)
    gateway, replicas, _ = cached_gateway
    for lane in gateway.lanes.values():
        lane.cache = cache
    first = await gateway.search({"query": "aspirin"})
    keys = await redis.keys("ragfan:v1:*")
    assert len(keys) == 2
    for key in keys:
        await redis.set(key, "not hits")
    with caplog.at_level(logging.WARNING, logger="ray.serve"):
        again = await gateway.search({"query": "aspirin"})
        assert again.results == first.results and states(again) == {"a": ("miss", False), "d": ("miss", False)}
        for key in keys:
            await redis.set(key, b"\xff[[")
        await gateway.search({"query": "aspirin"})
    assert [r.searched for r in replicas.values()] == [["aspirin"] * 3] * 2  # each malformed value: a miss
    warnings = [r.getMessage() for r in caplog.records if "malformed" in r.getMessage()]
    assert len(warnings) == 1 and "ragfan:v1:" in warnings[0]
    assert states(await gateway.search({"query": "aspirin"})) == {"a": ("hit", True), "d": ("hit", True)}  # rewritten
