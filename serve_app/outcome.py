"""What one retriever's call came to: an `Outcome`, and the one-line reason when it failed.

The lanes make one Outcome per retriever per search (serve_app/lanes.py); the gateway fuses the
ones that are `ok` and reports every one's status in the answer (serve_app/gateway.py); telemetry
counts them (serve_app/telemetry.py). An Outcome is never raised: a retriever that fails, times
out or is skipped costs its own share of the answer and nothing more.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from serve_app.types import Status

MAX_ERROR_CHARS = 300  # an error reaches the answer and the logs as one short line


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


def describe_error(exc: BaseException) -> str:
    """A one-line reason: Ray wraps replica errors, so show the cause, not the traceback."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        exc = cause
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    return text[:MAX_ERROR_CHARS]
