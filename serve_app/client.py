"""RagClient: search a running ragfan app from Python through its Serve DeploymentHandle.

    from serve_app.client import RagClient

    client = RagClient()                      # joins the running Ray cluster (address "auto")
    r = client.search("vitamin d and multiple sclerosis", top_k=5)
    r.results[0].id, r.retrievers["graph"].status, r.degraded

    r = await client.search_async("...")      # the same, from async code

Errors are the service's own: InvalidRequest (what HTTP answers with 422) and
NoRetrieverAvailable (503). A search is read-only, so when the gateway replica serving it dies
mid-call, the client sends it once more to another replica instead of raising.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from pydantic import ValidationError
from ray.exceptions import ActorUnavailableError, RayActorError

from actors.errors import RagError
from serve_app.errors import InvalidRequest
from serve_app.schemas import FilterValue, FusionOptions, SearchRequest, SearchResponse

T = TypeVar("T")
ATTEMPTS = 2  # a second try when the gateway replica died under the first


class RagClient:
    def __init__(self, app_name: str = "ragfan", *, address: str = "auto") -> None:
        import ray
        from ray import serve

        if not ray.is_initialized():
            ray.init(address=address, log_to_driver=False, logging_level="WARNING")
        self._handle = serve.get_app_handle(app_name)

    @classmethod
    def from_handle(cls, handle: Any) -> RagClient:
        """Wrap a handle you already hold, e.g. inside another Serve deployment."""
        client = cls.__new__(cls)
        client._handle = handle
        return client

    def search(
        self,
        query: str,
        *,
        top_k: int = 10,
        retrievers: list[str] | None = None,
        filters: Mapping[str, FilterValue] | None = None,
        timeout_ms: int | None = None,
        fusion: FusionOptions | dict[str, Any] | None = None,
    ) -> SearchResponse:
        request = _request(query, top_k, retrievers, filters, timeout_ms, fusion)
        return _reraise(lambda: self._handle.search.remote(request).result())

    async def search_async(
        self,
        query: str,
        *,
        top_k: int = 10,
        retrievers: list[str] | None = None,
        filters: Mapping[str, FilterValue] | None = None,
        timeout_ms: int | None = None,
        fusion: FusionOptions | dict[str, Any] | None = None,
    ) -> SearchResponse:
        request = _request(query, top_k, retrievers, filters, timeout_ms, fusion)
        return await _reraise_async(lambda: self._handle.search.remote(request))


def _request(query, top_k, retrievers, filters, timeout_ms, fusion) -> SearchRequest:
    try:
        return SearchRequest(
            query=query,
            top_k=top_k,
            retrievers=retrievers,
            filters=dict(filters) if filters is not None else None,
            timeout_ms=timeout_ms,
            fusion=fusion,
        )
    except ValidationError as exc:
        raise InvalidRequest.from_validation(exc) from None


def _cause(exc: Exception) -> BaseException:
    # Ray wraps an exception raised in a replica; surface ragfan's own error to the caller.
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, RagError) else exc


def _should_retry(exc: Exception, attempt: int) -> bool:
    """True to try again; otherwise raise ragfan's own error from inside Ray's wrapper, or `exc`."""
    if isinstance(exc, RayActorError | ActorUnavailableError) and attempt < ATTEMPTS:
        return True  # the gateway replica died under this search: another one will answer it
    cause = _cause(exc)
    if cause is exc:
        return False
    raise cause from None


def _reraise(call: Callable[[], T]) -> T:
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return call()
        except Exception as exc:
            if not _should_retry(exc, attempt):
                raise
    raise AssertionError("unreachable")


async def _reraise_async(call: Callable[[], Awaitable[T]]) -> T:
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return await call()
        except Exception as exc:
            if not _should_retry(exc, attempt):
                raise
    raise AssertionError("unreachable")
