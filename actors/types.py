"""Value types shared by every retriever kind.

Plain dataclasses with no Ray or torch imports, so the gateway, the tests and the client can use
them without loading a model.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from actors.errors import Cancelled

FilterValue = str | int | float | bool
Filters = Mapping[str, FilterValue]


@dataclass(frozen=True, slots=True)
class Document:
    """One unit of retrievable text: a passage, an abstract, a persona snippet."""

    doc_id: str
    text: str
    metadata: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.doc_id:
            raise ValueError("Document.doc_id must be a non-empty string")

    def hit(self, score: float) -> Hit:
        return Hit(doc_id=self.doc_id, score=score, text=self.text, metadata=self.metadata)


@dataclass(frozen=True, slots=True)
class Hit:
    """One ranked answer from one retriever."""

    doc_id: str
    score: float
    text: str
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Query:
    """One query as a retriever sees it inside a batch.

    `vector` is the query's embedding when a shared encoder already computed it (an L2-normalised
    float32 numpy array); a retriever with a model of its own encodes `text` when it is None. Typed
    `Any` so that this module needs no numpy, and left out of equality and repr.
    """

    text: str
    top_k: int = 10
    filters: Filters | None = None
    vector: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")


def matches(metadata: Mapping[str, str], filters: Filters | None) -> bool:
    """Exact match of every filter key against a document's metadata (values compared as text)."""
    if not filters:
        return True
    return all(metadata.get(key) == filter_text(value) for key, value in filters.items())


def filter_text(value: FilterValue) -> str:
    # JSON `true` should match metadata written as "true", not Python's "True".
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@dataclass(frozen=True, slots=True)
class Searched:
    """A replica's answer to a batch: one hit list per query, and the index version that answered them."""

    hits: list[list[Hit]]
    version: str | None = None
    seq: int | None = None  # with live writes: the last log record that changed what answered (actors/delta.py)


@dataclass(frozen=True, slots=True)
class Unavailable:
    """What a retriever that failed to start answers instead of hits: the reason."""

    reason: str


class CancelToken:
    """Tells a search running in a worker thread that its caller gave up.

    A coroutine cannot stop a thread, so the replica hands the search a token and sets it when the
    call is cancelled (at the gateway's deadline); the retriever checks it at each stage or batch
    boundary and stops there. `wait` is a sleep that ends early when the token is set.
    """

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        """Raise Cancelled if the caller gave up; call it between stages."""
        if self._event.is_set():
            raise Cancelled("the caller stopped waiting for this search")

    def wait(self, seconds: float) -> None:
        """Sleep up to `seconds`; raise Cancelled as soon as the caller gives up."""
        if self._event.wait(max(0.0, seconds)):
            raise Cancelled("the caller stopped waiting for this search")

