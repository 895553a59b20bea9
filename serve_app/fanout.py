"""Ask several replicas at once, each call with its own deadline: the lanes' health checks.

A lane's `describe` asks its replica, or every shard's at once, what it holds (health, the index
version and fingerprint the result cache keys by), and an encoder lane its encoder (serve_app/lanes.py).
`fan_out` never raises for a call's sake: each call ends as one `Outcome` (serve_app/outcome.py) whose
status is `ok`, `timeout` or `error`. A call still running at its deadline is cancelled, so a replica
that hangs costs its own answer and nothing more. Searches do not come through here: each lane
batches its own calls, with each request's deadline (serve_app/batcher.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from serve_app.outcome import Outcome, describe_error


@dataclass(frozen=True, slots=True)
class Call:
    """How to start one retriever's call, and how long to wait for it."""

    start: Callable[[], Awaitable[Any]]
    timeout_s: float


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
