"""The gateway's clock: every deadline in the gateway, its lanes and its batchers is a time on it.

`asyncio.timeout_at` reads the same clock through `loop.time()`, so a deadline taken from `now()`
can be handed to it as it is.
"""

from __future__ import annotations

import time


def now() -> float:
    """The event loop's clock, read fresh: deadlines are set on it.

    Ray Serve replicas run uvloop, whose `loop.time()` is the same monotonic clock cut to whole
    milliseconds and read once per loop iteration, so a deadline counted from it can fire a
    millisecond or more before its time has really passed. `time.monotonic()` is that clock unrounded.
    """
    return time.monotonic()
