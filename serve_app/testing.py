"""Test doubles that ship with ragfan, as httpx ships `MockTransport`.

`FakeHandle` stands in for a Serve deployment handle: `handle.method.remote(*args)` runs
`target.method(*args)` as an asyncio task and returns a `FakeResponse`, which is awaitable and has
`cancel()`, like Serve's `DeploymentResponse`. The lanes and the gateway only ever use that surface,
so they run in a test, or a notebook, without Ray:

    from serve_app.gateway import Gateway
    from serve_app.testing import FakeHandle

    gateway = Gateway(config, {"dense": [FakeHandle(my_dense_replica)]})
    await gateway.search({"query": "vitamin d"})

`FakeHandle.kill()` makes it behave like the handle of a dead replica: every later call raises
`ReplicaDied`. `calls` and `responses` record what happened, so a test checks batching and
cancellation by what happened, not by timing.
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Any


class ReplicaDied(RuntimeError):
    """What a call to a killed `FakeHandle` raises; Ray raises ActorDiedError in its place."""


class FakeResponse:
    """Awaitable like Serve's DeploymentResponse, with the same `cancel()`."""

    def __init__(self, coro: Any) -> None:
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

    def remote(self, *args: Any, **kwargs: Any) -> FakeResponse:
        handle = self.handle
        handle.calls.append((self.name, args))
        method = getattr(handle.target, self.name)

        async def run() -> Any:  # a replica's method may be sync or async; the response is awaitable either way
            if handle.dead:
                raise ReplicaDied(f"the replica behind this handle died (calling {self.name})")
            result = method(*args, **kwargs)
            return await result if inspect.isawaitable(result) else result

        response = FakeResponse(run())
        handle.responses.append(response)
        return response


class FakeHandle:
    """A deployment handle without Ray: `handle.method.remote(...)` runs `target.method(...)` as a task."""

    def __init__(self, target: Any) -> None:
        self.target = target
        self.dead = False
        self.calls: list[tuple[str, tuple]] = []
        self.responses: list[FakeResponse] = []

    def kill(self) -> None:
        """From now on, every call fails as a call to a dead replica does."""
        self.dead = True

    def __getattr__(self, name: str) -> _Method:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Method(self, name)
