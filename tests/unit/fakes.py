"""Test doubles of our own, so unit tests need no model and no Ray.

`HashingEmbedder` stands in for sentence-transformers: each word hashes to a signed bucket, and a
text is the normalised sum of its words. Texts that share words are similar, texts that share none
are (nearly) orthogonal: enough to test ranking logic. `FakeHandle` stands in for a Serve
deployment handle, with the same `.method.remote(...)` / awaitable-response surface.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import re
from collections.abc import Sequence

import numpy as np


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


class FakeResponse:
    """Awaitable like Serve's DeploymentResponse, with the same `cancel()`."""

    def __init__(self, coro) -> None:
        self._task = asyncio.ensure_future(coro)
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        self._task.cancel()

    def __await__(self):
        return self._task.__await__()


class _Method:
    def __init__(self, handle: FakeHandle, name: str) -> None:
        self.handle, self.name = handle, name

    def remote(self, *args):
        self.handle.calls.append((self.name, args))
        method = getattr(self.handle.target, self.name)

        async def run():  # a replica's method may be sync or async; the response is awaitable either way
            result = method(*args)
            return await result if inspect.isawaitable(result) else result

        response = FakeResponse(run())
        self.handle.responses.append(response)
        return response


class FakeHandle:
    """A deployment handle without Ray: `handle.method.remote(...)` runs `target.method(...)` as a task.

    `calls` records every call in order, `responses` what each returned, so tests check batching
    and cancellation by what happened, not by timing.
    """

    def __init__(self, target) -> None:
        self.target = target
        self.calls: list[tuple[str, tuple]] = []
        self.responses: list[FakeResponse] = []

    def __getattr__(self, name: str) -> _Method:
        return _Method(self, name)


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
