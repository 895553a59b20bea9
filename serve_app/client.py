"""RagClient: search a running ragfan app from Python, over HTTP or through its Serve DeploymentHandle.

    from serve_app import RagClient

    # Over HTTP, from anywhere that reaches the service (one pooled connection, closed on exit):
    with RagClient(url="http://ragfan.internal:8000", api_key="...", timeout_s=60) as client:
        r = client.search("vitamin d and multiple sclerosis", top_k=5)
        r.results[0].id, r.retrievers["graph"].status, r.degraded

    # Inside the Ray cluster: on its first search, joins it (address "auto") and gets the app's handle.
    client = RagClient()
    r = await client.search_async("...")      # the same, from async code (`async with` closes it)

Several searches go in one request with `search_batch` (or `search_batch_async`): one call to
each retriever for all of them. It answers a list in the same order, each item the
`SearchResponse`, or the error that `search` would have raised for that search alone
(InvalidRequest, NoRetrieverAvailable), so one bad search fails no other:

    for r in client.search_batch(["vitamin d", "aspirin", {"query": "p53", "top_k": 3}], top_k=5):
        print(r.results[0].id if isinstance(r, SearchResponse) else f"failed: {r}")

Both ways answer with the same typed `SearchResponse` and raise the same errors (defined in
actors/errors.py, importable from `serve_app`):
InvalidRequest (HTTP 422, before anything is sent when the client can tell), MalformedRequest (400),
Unauthorized (401), PayloadTooLarge (413), NoRetrieverAvailable (503 with each retriever's reason)
and Overloaded (Serve's own 503); both carry `retry_after_s`.

A call lost on the way is sent again; any other answer raises at once:
- A search (or a batch) whose connection failed (an httpx connect, read, write or remote-protocol
  error: refused, reset, or dropped before an answer) is sent again and again, after 0.05 s, then
  twice as long each time up to 1 s, until `timeout_s` has passed since the call began; then
  httpx's own error raises. A search is read-only, so this is safe, and it rides out an HTTP
  ingress that is restarting (docs/RELIABILITY.md).
- Once more, and only once: a search whose gateway replica died under it (a handle's
  RayActorError), one the proxy answered with 500, 502 or 504 for a replica that died, and a write
  or reload lost in any of these ways. A 5xx that persists raises a RagError with the status and
  the start of the body.
- Timeouts are not retried: a slow service would only be asked to do the work twice.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ValidationError

from actors.errors import (
    Conflict,
    InvalidRequest,
    MalformedRequest,
    NoRetrieverAvailable,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    RagError,
    ServiceUnavailable,
    Unauthorized,
)
from actors.types import FilterValue
from serve_app import __version__
from serve_app.schemas import (
    BatchSearchError,
    BatchSearchRequest,
    BatchSearchResponse,
    DeleteRequest,
    FusionOptions,
    Include,
    ReloadRequest,
    ReloadResponse,
    SearchRequest,
    SearchResponse,
    UpsertRequest,
    WriteDocument,
    WriteResponse,
)

# What the proxy answers when the replica it sent a request to died, or cannot be reached.
RETRY_STATUSES = frozenset({500, 502, 504})
RETRY_NETWORK = (httpx.NetworkError, httpx.RemoteProtocolError)  # connect, read, write, a dropped connection
READ_ONLY = frozenset({"search", "search_batch"})  # retried on a failed connection until timeout_s
BACKOFF_FIRST_S, BACKOFF_MAX_S = 0.05, 1.0  # the wait before the second try, and the longest wait
SEARCH_PATH = "/v1/search"
# each gateway method's HTTP route; {field}: filled from the body's field of that name
PATHS = {"search": SEARCH_PATH, "search_batch": "/v1/search/batch", "reload": "/v1/retrievers/{name}/reload",
         "upsert": "/v1/documents", "delete": "/v1/documents/delete"}
M = TypeVar("M", bound=BaseModel)
# What the HTTP transport asks the gateway to compress with, in its order of preference (the gateway
# picks zstd, then br, then gzip). httpx decodes gzip itself, and zstd and br with `zstandard` and
# `brotli`, which ragfan depends on.
ACCEPT_ENCODING = "zstd, br, gzip"
_CONNECTING = threading.Lock()  # two threads' first searches on one handle client join the cluster once
_clock, _sleep = time.monotonic, time.sleep  # the retry loop's clock and waits (unit tests replace them)


async def _sleep_async(seconds: float) -> None:
    await asyncio.sleep(seconds)


class Transport(Protocol):
    """One way to reach the app. `send` calls one gateway method (`search`, `search_batch`) and
    returns the answer or the exception, so that the client decides in one place whether to send
    again; `answer` turns it into the method's response model or raises."""

    def send(self, method: str, body: BaseModel) -> Any: ...
    async def send_async(self, method: str, body: BaseModel) -> Any: ...
    def pause_before_retry(self, method: str, outcome: Any, tries: int, elapsed_s: float) -> float | None: ...
    def answer(self, outcome: Any, model: type[M]) -> M: ...
    def close(self) -> None: ...
    async def aclose(self) -> None: ...


class RagClient:
    def __init__(
        self,
        app_name: str = "ragfan",
        *,
        url: str | None = None,
        api_key: str | None = None,
        timeout_s: float = 60.0,
        address: str = "auto",
        transport: httpx.BaseTransport | httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """`url`: search over HTTP (with `api_key` if the service has keys; `timeout_s` bounds each try,
        and how long a search whose connection fails is tried again);
        `transport` replaces httpx's network transport, e.g. `httpx.MockTransport` in tests.
        Without `url`: search through app `app_name`'s handle, joining the Ray cluster at `address`.

        Nothing connects here: the first call opens the connection pool, or joins the cluster and
        gets the handle, so a client can be made where nothing may block (at import, in `__init__`)."""
        self._app_name, self._address = app_name, address
        if url is not None:
            self._transport: Transport | None = HTTPTransport(url, api_key=api_key, timeout_s=timeout_s,
                                                              transport=transport)
            return
        if api_key is not None or transport is not None:
            raise ValueError("api_key and transport are for HTTP: pass url= too (or neither, to use a handle)")
        self._transport = None  # `_connected` joins the cluster on the first call

    @classmethod
    def from_handle(cls, handle: Any) -> RagClient:
        """Wrap a handle you already hold, e.g. inside another Serve deployment."""
        client = cls.__new__(cls)
        client._transport = HandleTransport(handle)
        return client

    def _connected(self) -> Transport:
        """How this client reaches the app; without `url`, the first call joins the cluster and gets the handle."""
        if self._transport is None:
            with _CONNECTING:
                if self._transport is None:
                    self._transport = HandleTransport(app_handle(self._app_name, self._address))
        return self._transport

    def search(
        self,
        query: str,
        *,
        top_k: int = 10,
        retrievers: list[str] | None = None,
        filters: Mapping[str, FilterValue] | None = None,
        timeout_ms: int | None = None,
        fusion: FusionOptions | dict[str, Any] | None = None,
        include: Sequence[Include] | None = None,
    ) -> SearchResponse:
        return self._call("search", _request(query, top_k, retrievers, filters, timeout_ms, fusion, include),
                          SearchResponse)

    async def search_async(
        self,
        query: str,
        *,
        top_k: int = 10,
        retrievers: list[str] | None = None,
        filters: Mapping[str, FilterValue] | None = None,
        timeout_ms: int | None = None,
        fusion: FusionOptions | dict[str, Any] | None = None,
        include: Sequence[Include] | None = None,
    ) -> SearchResponse:
        return await self._call_async(
            "search", _request(query, top_k, retrievers, filters, timeout_ms, fusion, include), SearchResponse
        )

    def search_batch(
        self,
        searches: Sequence[str | SearchRequest | Mapping[str, Any]],
        *,
        top_k: int = 10,
        retrievers: list[str] | None = None,
        filters: Mapping[str, FilterValue] | None = None,
        timeout_ms: int | None = None,
        fusion: FusionOptions | dict[str, Any] | None = None,
    ) -> list[SearchResponse | RagError]:
        """Each search's response, or the error `search` would raise for it alone, in order.

        A string is a query searched with the keyword arguments; a SearchRequest, or a mapping of
        its fields, says everything itself. At most `gateway.max_batch_searches` (64 by default)
        in one call: more raise PayloadTooLarge. Raises as `search` does for what fails them all.
        """
        requests, batch = _batch(searches, top_k, retrievers, filters, timeout_ms, fusion)
        return _results(requests, self._call("search_batch", batch, BatchSearchResponse) if batch else None)

    async def search_batch_async(
        self,
        searches: Sequence[str | SearchRequest | Mapping[str, Any]],
        *,
        top_k: int = 10,
        retrievers: list[str] | None = None,
        filters: Mapping[str, FilterValue] | None = None,
        timeout_ms: int | None = None,
        fusion: FusionOptions | dict[str, Any] | None = None,
    ) -> list[SearchResponse | RagError]:
        """`search_batch`, from async code."""
        requests, batch = _batch(searches, top_k, retrievers, filters, timeout_ms, fusion)
        return _results(requests, await self._call_async("search_batch", batch, BatchSearchResponse) if batch else None)

    def reload(self, name: str) -> ReloadResponse:
        """Every replica of retriever `name` serves the version its artifacts link points to now; returns
        once they do. Raises NotFound (no such retriever) or Conflict (the new version fails
        verification, or the retriever holds no index; nothing changed)."""
        return self._call("reload", ReloadRequest(name=name), ReloadResponse)

    async def reload_async(self, name: str) -> ReloadResponse:
        """`reload`, from async code."""
        return await self._call_async("reload", ReloadRequest(name=name), ReloadResponse)

    def upsert(self, documents: Iterable[Mapping[str, Any] | WriteDocument], *, retrievers: list[str] | None = None,
               wait: bool = False) -> WriteResponse:
        """Add or replace documents by id: each a mapping with `id`, `text` and optional `metadata`.

        Returns once the write is durable (in the write-ahead log, on disk); with `wait`, once every
        replica of every retriever written to searches it. `retrievers`: default, every one that
        takes writes. Raises InvalidRequest (a document without text or id, an unknown retriever),
        Conflict (a retriever that takes no writes), PayloadTooLarge, ServiceUnavailable (not made
        durable: nothing applied). Writes by id are idempotent, so a retry is safe."""
        return self._call("upsert", _write(UpsertRequest, retrievers=retrievers, documents=list(documents),
                                           wait=wait), WriteResponse)

    async def upsert_async(self, documents: Iterable[Mapping[str, Any] | WriteDocument], *,
                           retrievers: list[str] | None = None, wait: bool = False) -> WriteResponse:
        """`upsert`, from async code."""
        return await self._call_async("upsert", _write(UpsertRequest, retrievers=retrievers,
                                                       documents=list(documents), wait=wait), WriteResponse)

    def delete(self, ids: Iterable[str], *, retrievers: list[str] | None = None, wait: bool = False) -> WriteResponse:
        """Remove documents by id (an id that is not there stays absent); returns as `upsert` does."""
        return self._call("delete", _write(DeleteRequest, retrievers=retrievers, ids=list(ids), wait=wait),
                          WriteResponse)

    async def delete_async(self, ids: Iterable[str], *, retrievers: list[str] | None = None,
                           wait: bool = False) -> WriteResponse:
        """`delete`, from async code."""
        return await self._call_async("delete", _write(DeleteRequest, retrievers=retrievers, ids=list(ids),
                                                       wait=wait), WriteResponse)

    def _call(self, method: str, body: BaseModel, model: type[M]) -> M:
        transport = self._connected()
        started, tries = _clock(), 1
        outcome = transport.send(method, body)
        # lost on the way: again, as the module docstring says
        while (pause := transport.pause_before_retry(method, outcome, tries, _clock() - started)) is not None:
            _sleep(pause)
            outcome, tries = transport.send(method, body), tries + 1
        return transport.answer(outcome, model)

    async def _call_async(self, method: str, body: BaseModel, model: type[M]) -> M:
        transport = self._connected()
        started, tries = _clock(), 1
        outcome = await transport.send_async(method, body)
        while (pause := transport.pause_before_retry(method, outcome, tries, _clock() - started)) is not None:
            await _sleep_async(pause)
            outcome, tries = await transport.send_async(method, body), tries + 1
        return transport.answer(outcome, model)

    def close(self) -> None:
        """Close the HTTP connection pool (a handle client holds none)."""
        if self._transport is not None:
            self._transport.close()

    async def aclose(self) -> None:
        """Close both HTTP connection pools, the async one too."""
        if self._transport is not None:
            await self._transport.aclose()

    def __enter__(self) -> RagClient:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    async def __aenter__(self) -> RagClient:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.aclose()


def _request(query, top_k, retrievers, filters, timeout_ms, fusion, include) -> SearchRequest:
    """The request, validated (and its query cleaned) as the gateway does: a bad one is never sent."""
    try:
        return SearchRequest(
            query=query,
            top_k=top_k,
            retrievers=retrievers,
            filters=dict(filters) if filters is not None else None,
            timeout_ms=timeout_ms,
            fusion=fusion,
            include=list(include) if include is not None else None,
        )
    except ValidationError as exc:
        raise InvalidRequest.from_validation(list(exc.errors())) from None


def _batch(searches, top_k, retrievers, filters, timeout_ms, fusion
           ) -> tuple[list[SearchRequest | RagError], BatchSearchRequest | None]:
    """Each search checked, and the batch of the valid ones to send; None when none is valid."""
    requests = _requests(searches, top_k, retrievers, filters, timeout_ms, fusion)
    sent = [r for r in requests if isinstance(r, SearchRequest)]
    return requests, BatchSearchRequest(searches=sent) if sent else None


def _requests(searches, top_k, retrievers, filters, timeout_ms, fusion) -> list[SearchRequest | RagError]:
    """Each search of a batch validated as `search` validates it, or its InvalidRequest."""
    checked: list[SearchRequest | RagError] = []
    for search in searches:
        try:
            if isinstance(search, str):
                checked.append(_request(search, top_k, retrievers, filters, timeout_ms, fusion, None))
            elif isinstance(search, SearchRequest):
                checked.append(search)
            else:
                checked.append(_validated(dict(search)))
        except InvalidRequest as exc:
            checked.append(exc)
    return checked


def _write(model: type[M], **fields: Any) -> M:
    """A write request, checked here as the gateway checks it: InvalidRequest names each problem."""
    fields["documents" if "documents" in fields else "ids"] = [
        d.model_dump() if isinstance(d, BaseModel) else d for d in fields.get("documents", fields.get("ids", []))]
    try:
        return model.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        raise InvalidRequest.from_validation(exc.errors(include_url=False)) from None


def _validated(fields: dict[str, Any]) -> SearchRequest:
    try:
        return SearchRequest.model_validate(fields)
    except ValidationError as exc:
        raise InvalidRequest.from_validation(list(exc.errors())) from None


def _results(requests: list[SearchRequest | RagError], batch: BatchSearchResponse | None
             ) -> list[SearchResponse | RagError]:
    """The client's own InvalidRequests in their places, and the gateway's answers to the rest, typed."""
    answers = iter(batch.responses if batch is not None else ())
    results: list[SearchResponse | RagError] = []
    for request in requests:
        if isinstance(request, RagError):
            results.append(request)
            continue
        item = next(answers)
        if isinstance(item, BatchSearchError):
            results.append(error_from_status(item.status, item.error.detail, retry_after_s=item.retry_after_s or 1))
        else:
            results.append(SearchResponse.model_construct(**{k: v for k, v in item if k != "status"}))
    return results


# -- through a DeploymentHandle ------------------------------------------------------------------
def app_handle(app_name: str, address: str) -> Any:
    """App `app_name`'s handle, joining the Ray cluster at `address` unless this process already has."""
    import ray  # ray only where a handle is used
    from ray import serve

    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    return serve.get_app_handle(app_name)


class HandleTransport:
    def __init__(self, handle: Any) -> None:
        from ray.exceptions import ActorUnavailableError, RayActorError  # ray only where a handle is used

        self._handle = handle
        self._replica_gone = (RayActorError, ActorUnavailableError)

    def send(self, method: str, body: BaseModel) -> Any:
        try:
            return getattr(self._handle, method).remote(body).result()
        except Exception as exc:
            return exc

    async def send_async(self, method: str, body: BaseModel) -> Any:
        try:
            return await getattr(self._handle, method).remote(body)
        except Exception as exc:
            return exc

    def pause_before_retry(self, method: str, outcome: Any, tries: int, elapsed_s: float) -> float | None:
        # the gateway replica died: once more, at once, and another one answers
        return 0.0 if tries == 1 and isinstance(outcome, self._replica_gone) else None

    def answer(self, outcome: Any, model: type[M]) -> M:
        if isinstance(outcome, Exception):
            # Ray wraps an exception raised in a replica; surface ragfan's own error to the caller.
            cause = getattr(outcome, "cause", None)
            if isinstance(cause, RagError):
                raise cause from None
            raise outcome
        return outcome

    def close(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


# -- over HTTP -----------------------------------------------------------------------------------
class HTTPTransport:
    """POST /v1/search on one pooled `httpx.Client`, and one `httpx.AsyncClient`, each made on first use."""

    def __init__(self, url: str, *, api_key: str | None, timeout_s: float, transport: Any = None) -> None:
        self.url = url.rstrip("/")
        headers = {"user-agent": f"ragfan-client/{__version__}", "content-type": "application/json",
                   "accept-encoding": ACCEPT_ENCODING}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        self.timeout_s = timeout_s
        self._options: dict[str, Any] = {"base_url": self.url, "headers": headers, "timeout": timeout_s}
        self._transport = transport
        self._client: httpx.Client | None = None
        self._async: httpx.AsyncClient | None = None
        self._async_loop: asyncio.AbstractEventLoop | None = None

    def _sync_client(self) -> httpx.Client:
        if self._client is None:
            self._client = httpx.Client(transport=self._transport, **self._options)
        return self._client

    def _async_client(self) -> httpx.AsyncClient:
        # An AsyncClient's connections belong to the event loop that opened them: a caller that runs
        # several loops (asyncio.run twice, one per test) gets a client of the current loop's own.
        loop = asyncio.get_running_loop()
        if self._async is None or self._async_loop is not loop:
            self._async = httpx.AsyncClient(transport=self._transport, **self._options)
            self._async_loop = loop
        return self._async

    def send(self, method: str, body: BaseModel) -> Any:
        try:
            return self._sync_client().post(_path(method, body), content=_body(body))
        except RETRY_NETWORK as exc:
            return exc

    async def send_async(self, method: str, body: BaseModel) -> Any:
        try:
            return await self._async_client().post(_path(method, body), content=_body(body))
        except RETRY_NETWORK as exc:
            return exc

    def pause_before_retry(self, method: str, outcome: Any, tries: int, elapsed_s: float) -> float | None:
        if isinstance(outcome, Exception):  # the connection failed: no answer came back
            if method in READ_ONLY:
                pause = min(BACKOFF_FIRST_S * 2 ** (tries - 1), BACKOFF_MAX_S)
                return pause if elapsed_s + pause < self.timeout_s else None
            return 0.0 if tries == 1 else None
        if outcome.status_code in RETRY_STATUSES and not _is_ragfan_error(outcome):  # the proxy lost the replica
            return 0.0 if tries == 1 else None
        return None

    def answer(self, outcome: Any, model: type[M]) -> M:
        if isinstance(outcome, Exception):
            raise outcome
        if outcome.status_code == 200:
            return model.model_validate_json(outcome.content)
        raise error_from_response(outcome, self.url)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    async def aclose(self) -> None:
        self.close()
        if self._async is not None:
            await self._async.aclose()


def _path(method: str, body: BaseModel) -> str:
    """The method's route, with any {field} in it filled from the body, URL-quoted."""
    return PATHS[method].format_map({k: quote(str(v), safe="") for k, v in body.model_dump().items()})


def _body(body: BaseModel) -> bytes:
    return body.model_dump_json(exclude_defaults=True).encode("utf-8")


def _detail(response: httpx.Response) -> Any:
    """`detail` of ragfan's JSON error body, or None when the body is something else (a proxy's page)."""
    try:
        body = response.json()
    except ValueError:
        return None
    return body.get("detail") if isinstance(body, dict) else None


def _is_ragfan_error(response: httpx.Response) -> bool:
    return _detail(response) is not None


def _retry_after(response: httpx.Response) -> int:
    value = response.headers.get("retry-after", "")
    return int(value) if value.strip().isdigit() else 1


def error_from_response(response: httpx.Response, url: str) -> RagError:
    """The ragfan error that an HTTP error answer stands for: the gateway's mapping, read backwards."""
    error = error_from_status(response.status_code, _detail(response), retry_after_s=_retry_after(response), url=url)
    if type(error) is RagError:
        excerpt = " ".join(response.text.split())[:200]
        return RagError(f"ragfan at {url} answered HTTP {response.status_code} {response.reason_phrase}: {excerpt}")
    return error


def error_from_status(status: int, detail: Any, *, retry_after_s: int = 1, url: str = "ragfan") -> RagError:
    """The ragfan error of an error body's status and `detail`: of an HTTP answer, or a batch item."""
    message = detail if isinstance(detail, str) else f"HTTP {status}"
    if status == 422:
        try:
            return InvalidRequest.from_validation(detail)
        except (KeyError, TypeError):  # not FastAPI's list of {loc, msg, type}: keep what the server said
            return InvalidRequest(message if detail is None or isinstance(detail, str) else str(detail))
    if status == 400:
        return MalformedRequest(message)
    if status == 401:
        return Unauthorized(message)
    if status == 409:
        return Conflict(message)
    if status == 404 and isinstance(detail, str):  # ragfan's own 404 has a message; a wrong URL has none
        return NotFound(message)
    if status == 413:
        return PayloadTooLarge(message)
    if status == 503 and isinstance(detail, dict) and "retrievers" in detail:
        return NoRetrieverAvailable(str(detail.get("message")), detail["retrievers"], retry_after_s=retry_after_s)
    if status == 503:  # Serve's backpressure: the proxy refused before the request reached ragfan
        return Overloaded(f"ragfan at {url} is overloaded: retry after {retry_after_s} s", retry_after_s=retry_after_s)
    return RagError(f"ragfan at {url} answered HTTP {status}")


# The errors a search raises are importable from here too, as httpx exports its own.
__all__ = [
    "Conflict", "HTTPTransport", "HandleTransport", "InvalidRequest", "MalformedRequest", "NoRetrieverAvailable",
    "NotFound", "Overloaded", "PayloadTooLarge", "RagClient", "RagError", "ServiceUnavailable", "Transport",
    "Unauthorized", "error_from_response", "error_from_status",
]
