"""The result cache: one retriever's hits for one query, reused until its index changes or the entry expires.

Each retriever's answer is cached on its own, not the fused answer: fusion is cheap to redo, and a
request for another set of retrievers or another fusion method still reuses what it can. A key is

    ragfan:v1:<retriever>:<fingerprint>:<sha256 of the normalised query, top_k and the filters that reach it>

The fingerprint names the index the retriever's replicas have loaded (actors/factory.py), so a
re-ingest or another model makes new keys and never serves stale hits.

Two backends with one interface, both asynchronous:

- `MemoryCache`: an LRU of `max_entries` per gateway replica, entries expire after `ttl_s`.
- `RedisCache`: one Redis shared by every gateway replica and node. It fails open: when Redis is
  down, slow (past `timeout_s`) or full, `get_many` answers misses and `set_many` drops the write,
  the trouble is logged once, and a circuit breaker stops trying Redis on every request while it
  is out. `status` then says `bypass`. Losing Redis loses no search, only its speed. A value under
  the key prefix that does not decode is a miss (logged once), and the search writes it anew.

Only complete answers are stored: the lane never caches a timeout, an error or a partial shard answer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import unicodedata
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from actors.types import Filters, Hit
from serve_app.breaker import CircuitBreaker
from serve_app.config import MemoryCacheConfig, RedisCacheConfig

logger = logging.getLogger("ray.serve")
KEY_PREFIX = "ragfan:v1"


def normalise(text: str) -> str:
    """The query as the cache sees it: NFC, with runs of whitespace made one space, trimmed.

    Case is kept: a cased model or a case-sensitive filter could tell "US" from "us".
    """
    return " ".join(unicodedata.normalize("NFC", text).split())


def cache_key(retriever: str, fingerprint: str, text: str, top_k: int, filters: Filters | None) -> str:
    what = json.dumps([normalise(text), top_k, sorted((filters or {}).items())], ensure_ascii=False)
    return f"{KEY_PREFIX}:{retriever}:{fingerprint}:{hashlib.sha256(what.encode()).hexdigest()}"


def encode_hits(hits: Sequence[Hit]) -> bytes:
    return json.dumps([[h.doc_id, h.score, h.text, dict(h.metadata)] for h in hits], ensure_ascii=False).encode()


def decode_hits(raw: bytes | str) -> list[Hit]:
    return [Hit(doc_id, score, text, metadata) for doc_id, score, text, metadata in json.loads(raw)]


class Cache(Protocol):
    """Where the lanes keep answers. Never raises.

    `get_many` answers each key's hits or None (a miss), or None for the whole call when the cache
    cannot answer at all (bypass: search uncached).
    """

    async def get_many(self, keys: Sequence[str]) -> list[list[Hit] | None] | None: ...

    async def set_many(self, items: Mapping[str, Sequence[Hit]]) -> None: ...

    def describe(self) -> dict[str, Any]: ...


class MemoryCache:
    """An LRU of answers in this gateway replica, each kept at most `ttl_s` seconds."""

    def __init__(self, *, max_entries: int = 10_000, ttl_s: float = 300.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_entries < 1 or ttl_s <= 0:
            raise ValueError("max_entries must be >= 1 and ttl_s > 0")
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, list[Hit]]] = OrderedDict()  # key -> (expires, hits)

    async def get_many(self, keys: Sequence[str]) -> list[list[Hit] | None] | None:
        now, found = self._clock(), []
        for key in keys:
            entry = self._entries.get(key)
            if entry is not None and entry[0] <= now:
                del self._entries[key]
                entry = None
            if entry is not None:
                self._entries.move_to_end(key)
            found.append(entry[1] if entry is not None else None)
        return found

    async def set_many(self, items: Mapping[str, Sequence[Hit]]) -> None:
        expires = self._clock() + self.ttl_s
        for key, hits in items.items():
            self._entries[key] = (expires, list(hits))
            self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def describe(self) -> dict[str, Any]:
        return {"backend": "memory", "entries": len(self._entries), "max_entries": self.max_entries,
                "ttl_s": self.ttl_s}


class RedisCache:
    """Answers in a Redis shared by every gateway replica; fails open (see the module docstring)."""

    def __init__(self, url: str, *, ttl_s: float = 300.0, timeout_s: float = 0.05,
                 breaker: CircuitBreaker | None = None, client: Any = None) -> None:
        import redis.asyncio as redis  # only where a Redis cache is configured

        self.url = url
        self.ttl_s = ttl_s
        self.breaker = breaker or CircuitBreaker(failures=3, cooldown_s=5.0)
        self._redis = client or redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry_on_timeout=False,
        )
        self._trouble: str | None = None
        self._malformed_logged = False

    async def get_many(self, keys: Sequence[str]) -> list[list[Hit] | None] | None:
        if not keys:
            return []
        if not self.breaker.allow():
            return None  # Redis failed just now: do not wait on it again until the breaker probes
        try:
            raw = await self._redis.mget(list(keys))
        except Exception as exc:  # noqa: BLE001  fail open: any Redis trouble is a bypass
            self._failed("read", exc)
            return None
        self._ok()
        return [None if r is None else self._decoded(key, r) for key, r in zip(keys, raw, strict=True)]

    def _decoded(self, key: str, raw: bytes) -> list[Hit] | None:
        """The hits stored under `key`, or None (a miss) for a value ragfan did not write: another
        program's, or an older format's, under the key prefix. The search then fills it anew."""
        try:
            return decode_hits(raw)
        except Exception as exc:  # noqa: BLE001  one bad value must not fail the search
            if not self._malformed_logged:  # once per replica: a bad value is overwritten, not fixed by us
                logger.warning("result cache %s: malformed value at %s read as a miss (%s: %s); "
                               "later ones are not logged", _without_password(self.url), key,
                               type(exc).__name__, str(exc)[:200])
                self._malformed_logged = True
            return None

    async def set_many(self, items: Mapping[str, Sequence[Hit]]) -> None:
        if not items or not self.breaker.allow():
            return
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for key, hits in items.items():
                    pipe.set(key, encode_hits(hits), px=int(self.ttl_s * 1000))
                await pipe.execute()
        except Exception as exc:  # noqa: BLE001  a full or gone Redis drops the write, not the search
            self._failed("write", exc)
            return
        self._ok()

    def describe(self) -> dict[str, Any]:
        return {"backend": "redis", "url": _without_password(self.url), "ttl_s": self.ttl_s,
                "circuit": self.breaker.snapshot(), "trouble": self._trouble}

    def _failed(self, what: str, exc: Exception) -> None:
        self.breaker.record(False)
        trouble = f"{what}: {type(exc).__name__}: {exc}"[:300]
        if self._trouble is None:  # once per outage, not per request
            logger.warning("result cache %s unavailable, searching uncached: %s", _without_password(self.url), trouble)
        self._trouble = trouble

    def _ok(self) -> None:
        self.breaker.record(True)
        if self._trouble is not None:
            logger.info("result cache %s answers again", _without_password(self.url))
            self._trouble = None


def _without_password(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    return f"{scheme}{sep}{'***@' if at else ''}{host}" if sep else url


def make_cache(config: MemoryCacheConfig | RedisCacheConfig | None) -> Cache | None:
    """The cache a gateway replica uses, from the app config's `cache:`; None when it is off."""
    if config is None:
        return None
    if isinstance(config, RedisCacheConfig):
        return RedisCache(config.url, ttl_s=config.ttl_s, timeout_s=config.timeout_ms / 1000)
    return MemoryCache(max_entries=config.max_entries, ttl_s=config.ttl_s)
