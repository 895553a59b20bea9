"""The contract every retriever kind meets."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from actors.types import CancelToken, Hit, Query


@runtime_checkable
class Retriever(Protocol):
    """Answers a batch of queries with one ranked hit list per query.

    Batched by nature: the gateway groups the requests that arrive together into one call per
    retriever (serve_app/batcher.py), the deployment hands that whole group to `search`, and a
    model encodes all of it at once (or the shared encoder already has, `Query.vector`).

    `cancel` is set when the caller stops waiting (the gateway's deadline passed): a search checks
    it between its stages and batches and raises `Cancelled` there, so work nobody waits for stops
    at the next boundary instead of running to the end in the replica's worker thread.
    """

    name: str
    kind: str

    def search(self, queries: Sequence[Query], *, cancel: CancelToken | None = None) -> list[list[Hit]]: ...

    def describe(self) -> dict[str, Any]:
        """A short summary for `/v1/retrievers`: doc count, model, index type."""
        ...

    def check(self) -> None:
        """Raise RetrieverFailed if the index is not loaded or is unusable."""
        ...
