"""Test doubles of our own, so unit tests need no model and no Ray.

`HashingEmbedder` stands in for sentence-transformers: each word hashes to a signed bucket, and a
text is the normalised sum of its words. Texts that share words are similar, texts that share none
are (nearly) orthogonal: enough to test ranking logic. The fake deployment handle ships with
ragfan itself (`serve_app.testing.FakeHandle`); the replica stand-ins for it are here.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Sequence

import numpy as np

from serve_app.testing import FakeHandle, FakeResponse  # noqa: F401  (shipped with ragfan)


class HashingEmbedder:
    def __init__(self, dim: int = 256, name: str = "fake-hashing") -> None:
        self.dim = dim
        self.name = name
        self.calls: list[int] = []  # batch sizes seen, to check batching

    def _vector(self, text: str) -> np.ndarray:
        v = np.zeros(self.dim, dtype=np.float32)
        for word in re.findall(r"\w+", text.lower()):
            h = int.from_bytes(hashlib.sha256(word.encode()).digest()[:8], "little")
            v[h % self.dim] += 1.0 if (h >> 32) & 1 else -1.0
        norm = np.linalg.norm(v)
        return v / norm if norm else v

    def encode(self, texts: Sequence[str], *, batch_size: int = 32) -> np.ndarray:
        self.calls.append(len(texts))
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([self._vector(t) for t in texts])


class GatedRetriever:
    """A retriever deployment stand-in whose calls wait until the test opens `gate`."""

    def __init__(self, retriever) -> None:
        self.retriever = retriever
        self.gate = asyncio.Event()
        self.started = 0

    async def search(self, queries):
        self.started += 1
        await self.gate.wait()
        return self.retriever.search(queries)


class FakeEncoder:
    """An encoder deployment stand-in over the hashing embedder; `fail` makes every call raise."""

    def __init__(self, embedder) -> None:
        self.embedder = embedder
        self.fail: Exception | None = None

    async def encode(self, texts):
        await asyncio.sleep(0)
        if self.fail is not None:
            raise self.fail
        return self.embedder.encode(texts)


class Clock:
    """A clock a test moves by hand (`clock.now = 5.0`), for code that takes `clock=`."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
