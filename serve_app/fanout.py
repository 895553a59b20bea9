"""Fan-out: start every selected retriever's call at once and give each its own deadline.

`fan_out` never raises for a retriever's sake: each call ends as one `Outcome` whose status is
`ok`, `timeout` or `error`. A call still running at its deadline is cancelled, so a slow
retriever costs its own share of the answer and nothing more.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from serve_app.types import Status

MAX_ERROR_CHARS = 300


@dataclass(slots=True)
class Outcome:
    name: str
    status: Status
    latency_ms: float | None = None
    value: Any = None  # what the call returned: a hit list for a search
    error: str | None = None
    coverage: float | None = None  # a sharded retriever: the fraction of its shards that answered
    cache: str | None = None  # the result cache: hit, miss, bypass or off (serve_app/cache.py); None: not asked
    version: str | None = None  # the index version that answered (actors/versions.py); None: not known


@dataclass(frozen=True, slots=True)
class Call:
    """How to start one retriever's call, and how long to wait for it."""

    start: Callable[[], Awaitable[Any]]
    timeout_s: float


def describe_error(exc: BaseException) -> str:
    """A one-line reason: Ray wraps replica errors, so show the cause, not the traceback."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        exc = cause
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    return text[:MAX_ERROR_CHARS]


def _cancel(pending: Any) -> None:
    # A Serve DeploymentResponse cancels the request in the replica; a task cancels itself.
    cancel = getattr(pending, "cancel", None)
    if callable(cancel):
        cancel()


async def call_with_deadline(name: str, call: Call) -> Outcome:
    started = time.perf_counter()

    def elapsed() -> float:
        return round((time.perf_counter() - started) * 1000, 2)

    pending: Any = None
    try:
        pending = call.start()
        async with asyncio.timeout(call.timeout_s):
            value = await pending
    except TimeoutError:
        _cancel(pending)
        return Outcome(name, "timeout", elapsed(), error=f"no answer within {call.timeout_s * 1000:.0f} ms")
    except asyncio.CancelledError:
        _cancel(pending)  # the whole request was cancelled: do not leave work behind
        raise
    except Exception as exc:
        return Outcome(name, "error", elapsed(), error=describe_error(exc))
    return Outcome(name, "ok", elapsed(), value=value)


async def fan_out(calls: Mapping[str, Call]) -> dict[str, Outcome]:
    """Run every call concurrently; return one outcome per name, in the order given."""
    outcomes = await asyncio.gather(*(call_with_deadline(name, call) for name, call in calls.items()))
    return {o.name: o for o in outcomes}
