"""A circuit breaker per retriever, kept by each gateway replica.

    closed ──(N consecutive failures or timeouts)──► open ──(cool-down over)──► half-open
      ▲                                               ▲                           │
      └──────────────(the probe answers)──────────────┼───────────────────────────┤
                                                      └──────(the probe fails)────┘

While open, the gateway does not call the retriever at all: its status is `skipped` with
`error: "circuit open"`, and the request costs nothing waiting for it. After the cool-down one
request is let through as a probe; the others keep skipping until the probe has answered.
Each gateway replica keeps its own breakers, so with R gateway replicas a dead retriever is
probed at most R times per cool-down.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Literal

State = Literal["closed", "open", "half_open"]
CIRCUIT_OPEN = "circuit open"  # the `error` of a retriever skipped while its breaker is open


class CircuitBreaker:
    def __init__(self, *, failures: int = 5, cooldown_s: float = 5.0, clock: Callable[[], float] = time.monotonic):
        if failures < 1:
            raise ValueError(f"failures must be >= 1, got {failures}")
        if cooldown_s < 0:
            raise ValueError(f"cooldown_s must be >= 0, got {cooldown_s}")
        self.failures = failures
        self.cooldown_s = cooldown_s
        self._clock = clock
        self.state: State = "closed"
        self.consecutive_failures = 0
        self.opened_at: float | None = None
        self._probe_out = False

    def allow(self) -> bool:
        """May this request call the retriever? In half-open, only the one probe may."""
        if self.state == "closed":
            return True
        if self.state == "open":
            if self._clock() - (self.opened_at or 0.0) < self.cooldown_s:
                return False
            self.state = "half_open"
            self._probe_out = False
        if self._probe_out:
            return False
        self._probe_out = True
        return True

    def record(self, ok: bool) -> None:
        """The outcome of a call that `allow` let through."""
        self._probe_out = False
        if ok:
            self.state, self.consecutive_failures, self.opened_at = "closed", 0, None
            return
        self.consecutive_failures += 1
        if self.state == "half_open" or self.consecutive_failures >= self.failures:
            self.state, self.opened_at = "open", self._clock()

    def release(self) -> None:
        """A let-through call ended without an outcome (the whole request was cancelled)."""
        self._probe_out = False

    def retry_in_s(self) -> float:
        """Seconds until the next probe may go; 0 unless open."""
        if self.state != "open" or self.opened_at is None:
            return 0.0
        return max(0.0, self.cooldown_s - (self._clock() - self.opened_at))

    def snapshot(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "consecutive_failures": self.consecutive_failures,
            "retry_in_s": round(self.retry_in_s(), 2),
        }
