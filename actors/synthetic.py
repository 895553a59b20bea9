"""A retriever with a controlled latency and failure mode, for tests and benchmarks.

It ranks its documents by word overlap with the query (a real, if simple, ranking), after sleeping
`delay_ms` per batch, the way a remote or slow backend would. `fail: always` makes every batch
raise, to exercise degraded answers. It reproduces the latency profile of the design ragfan
replaces (`ragfan bench --profile seed`) and is never part of the default config.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import Any, Literal

from actors.errors import RetrieverFailed
from actors.types import Document, Hit, Query, matches

_WORD = re.compile(r"\w+")


class SyntheticRetriever:
    kind = "synthetic"

    def __init__(
        self,
        *,
        name: str,
        documents: Sequence[Document],
        delay_ms: float = 0.0,
        fail: Literal["never", "always"] = "never",
    ) -> None:
        self.name = name
        self.documents = list(documents)
        self.delay_ms = delay_ms
        self.fail = fail
        self._words = [frozenset(_WORD.findall(d.text.lower())) for d in self.documents]

    def search(self, queries: Sequence[Query]) -> list[list[Hit]]:
        if self.delay_ms:
            time.sleep(self.delay_ms / 1000)
        if self.fail == "always":
            raise RetrieverFailed(f"{self.name}: configured to fail (fail: always)")
        results = []
        for q in queries:
            words = frozenset(_WORD.findall(q.text.lower()))
            scored = [
                (len(words & self._words[i]) / (len(words | self._words[i]) or 1), i)
                for i, d in enumerate(self.documents)
                if matches(d.metadata, q.filters)
            ]
            scored = sorted((s for s in scored if s[0] > 0), key=lambda s: (-s[0], s[1]))[: q.top_k]
            results.append([self.documents[i].hit(score) for score, i in scored])
        return results


    def describe(self) -> dict[str, Any]:
        return {"num_docs": len(self.documents), "delay_ms": self.delay_ms, "fail": self.fail}

    def check(self) -> None:
        if not self.documents:
            raise RetrieverFailed(f"{self.name}: no documents")
