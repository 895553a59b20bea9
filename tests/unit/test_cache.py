"""The result cache's backends and keys, without Ray: an injected clock, and fakeredis for Redis.

The real Redis, killed and restarted under traffic, is in tests/integration/test_cache.py.
"""

from __future__ import annotations

import logging

import fakeredis
import pytest

from actors.types import Hit
from serve_app.breaker import CircuitBreaker
from serve_app.cache import MemoryCache, RedisCache, cache_key, decode_hits, encode_hits

HITS = [Hit("d1", 0.9, "Vitamin D deficiency", {"domain": "neuro"}), Hit("d2", 0.5, "p53 — mutated", {})]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


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
    cache = RedisCache("redis://fake", client=DownRedis(), breaker=CircuitBreaker(failures=1, cooldown_s=5, clock=clock))
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
