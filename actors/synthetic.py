"""A retriever with a controlled latency and failure mode, for tests and benchmarks.

It ranks its documents by word overlap with the query (a real, if simple, ranking) and answers
`delay_ms` after the batch arrived: it sleeps whatever the ranking left of that time, the way a
remote or slow backend costs about the same for one query as for several. `fail: always` makes every batch
raise, to exercise degraded answers. Its wait ends early, and it stops between queries, when the
caller cancels the call (`cancel`, see actors/base.py). `describe()` lists when its recent calls
started and ended (`time.monotonic()`, one clock for every process of a machine), so a test can
show calls overlapping by their order, not by their timing.

`hold` (tests) turns time windows into events: while that file exists, every search waits before it
ranks, and leaves a file `<hold>.<id>.inside` for as long as it waits. A test creates the hold, counts
the calls held inside the replicas (the files, so it needs no call into a busy replica), and then
deletes the hold to let them go. A held search still ends when its caller cancels it.

It reproduces the latency profile of the design ragfan replaces (`ragfan bench --profile seed`) and
is never part of the default config.
"""

from __future__ import annotations

import re
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from actors.errors import RetrieverFailed
from actors.types import CancelToken, Document, Hit, Query, matches

_WORD = re.compile(r"\w+")
HOLD_POLL_S = 0.01  # how often a held search looks whether its hold file is gone


class SyntheticRetriever:
    kind = "synthetic"

    def __init__(
        self,
        *,
        name: str,
        documents: Sequence[Document],
        delay_ms: float = 0.0,
        fail: Literal["never", "always"] = "never",
        hold: Path | None = None,
    ) -> None:
        self.name = name
        self.documents = list(documents)
        self.delay_ms = delay_ms
        self.fail = fail
        self.hold = hold
        self._words = [frozenset(_WORD.findall(d.text.lower())) for d in self.documents]
        self._postings: dict[str, list[int]] = defaultdict(list)  # word -> documents that contain it
        self.recent_calls: deque[tuple[float, float]] = deque(maxlen=64)  # (started, ended), oldest first
        for i, words in enumerate(self._words):
            for word in words:
                self._postings[word].append(i)

    def search(self, queries: Sequence[Query], *, cancel: CancelToken | None = None) -> list[list[Hit]]:
        cancel = cancel or CancelToken()
        started, started_at = time.perf_counter(), time.monotonic()
        try:
            if self.hold is not None:
                self._wait_for_hold(cancel)
            return self._rank(queries, cancel)
        finally:
            try:
                # The service time is delay_ms per batch, ranking included, whether it succeeds or
                # fails; a cancelled call stops waiting at once (Cancelled).
                cancel.wait(self.delay_ms / 1000 - (time.perf_counter() - started))
            finally:
                self.recent_calls.append((started_at, time.monotonic()))

    def _wait_for_hold(self, cancel: CancelToken) -> None:
        """Wait while the hold file exists, marked by a file of this call's own (see the module docstring)."""
        assert self.hold is not None
        inside = self.hold.with_name(f"{self.hold.name}.{uuid.uuid4().hex}.inside")
        inside.touch()
        try:
            while self.hold.exists():
                cancel.wait(HOLD_POLL_S)  # raises Cancelled as soon as the caller gives up
        finally:
            inside.unlink(missing_ok=True)

    def _rank(self, queries: Sequence[Query], cancel: CancelToken) -> list[list[Hit]]:
        if self.fail == "always":
            raise RetrieverFailed(f"{self.name}: configured to fail (fail: always)")
        results = []
        for q in queries:
            cancel.check()
            words = frozenset(_WORD.findall(q.text.lower()))
            # Only documents sharing a word can score above 0: visit those, not the whole collection.
            candidates = {i for word in words for i in self._postings.get(word, ())}
            scored = []
            for i in candidates:
                if matches(self.documents[i].metadata, q.filters):
                    shared = len(words & self._words[i])  # Jaccard: shared / (|a| + |b| - shared)
                    scored.append((shared / (len(words) + len(self._words[i]) - shared), i))
            scored = sorted(scored, key=lambda s: (-s[0], s[1]))[: q.top_k]
            results.append([self.documents[i].hit(score) for score, i in scored])
        return results

    def describe(self) -> dict[str, Any]:
        return {
            "num_docs": len(self.documents),
            "delay_ms": self.delay_ms,
            "fail": self.fail,
            "hold": str(self.hold) if self.hold else None,
            "recent_calls": [{"started": s, "ended": e} for s, e in self.recent_calls],
        }

    def check(self) -> None:
        if not self.documents:
            raise RetrieverFailed(f"{self.name}: no documents")
