"""The HTTP API: routes over a `Gateway`, one error mapping, and an OpenAPI schema that states every rule.

`build_api(gateway, ...)` makes the FastAPI app for one gateway replica. Each replica builds its own
(`GatewayDeployment.__serve_build_asgi_app__` in serve_app/app.py), so the limits and API keys are
the app's own state, not module globals, and a test builds as many as it likes.

In the order a request meets them:

1. `Guard` (ASGI middleware): the API key, then the body size, before a byte of the body is parsed.
   - API keys (optional). With keys configured, every path but /healthz, the API docs and the
     /dashboard page (which holds no figures; it asks /v1/stats for them, with the key) needs
     `Authorization: Bearer KEY`; a missing or wrong key gets 401. Keys are compared as SHA-256
     digests with `hmac.compare_digest`, against every configured key, so the time taken does not
     depend on how much of a key matched. Only digests reach the replicas, and no key is logged.
   - Body size. A declared `Content-Length` over the limit gets 413 before one byte is read; a
     streamed body is counted as it arrives and refused once it passes the limit.
2. The route parses the JSON body once (`StrictJSONRoute`): UTF-8, at most MAX_JSON_DEPTH deep,
   finite numbers; pydantic validates it, then `validate` checks what depends on the config.
3. Every ragfan error becomes its status and JSON body in one function, `error_response`: the
   exception handlers and the guard both use it. Serve's own backpressure (503 with Retry-After)
   happens before the request reaches this app.

On the way out, an answer of `gateway.compress_min_bytes` or more is compressed as the request's
Accept-Encoding asks: zstd, then br, then gzip, whichever it accepts first in that order
(starlette-compress's `CompressMiddleware`, inside the Guard, so the Guard's refusals stay plain).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.routing import APIRoute
from starlette_compress import CompressMiddleware

from actors.errors import ConfigError, InvalidRequest, MalformedRequest, PayloadTooLarge, RagError, Unauthorized
from serve_app import __version__
from serve_app.gateway import Gateway, filter_keys
from serve_app.schemas import (
    BatchSearchRequest,
    BatchSearchResponse,
    DeleteRequest,
    ErrorResponse,
    ReloadResponse,
    RetrieversResponse,
    SearchRequest,
    SearchResponse,
    StatsResponse,
    UpsertRequest,
    WriteResponse,
)

# /dashboard is a page with no data in it: it asks GET /v1/stats, which needs the key, for the figures.
OPEN_PATHS = frozenset({"/healthz", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/dashboard"})
WRITE_PATHS = "/v1/documents"  # their bodies carry whole documents: limited by writes.max_body_bytes
DASHBOARD = Path(__file__).parent / "dashboard" / "index.html"
MAX_JSON_DEPTH = 32
API_KEYS_ENV = "RAGFAN_API_KEYS"
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "a Content-Length that is not a number"},
    401: {"model": ErrorResponse, "description": "API keys are on and the request has no valid one"},
    413: {"model": ErrorResponse, "description": "the body is over gateway.max_body_bytes"},
    503: {"model": ErrorResponse, "description": "no selected retriever answered, or the gateway is overloaded; "
          "see Retry-After"},
}


# -- API keys ---------------------------------------------------------------------------------
def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def load_api_keys(keys_file: Path | None = None) -> list[str]:
    """Keys from RAGFAN_API_KEYS (comma-separated) and `keys_file` (one per line, # comments)."""
    keys = [k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",")]
    if keys_file is not None:
        try:
            lines = keys_file.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ConfigError(f"gateway.api_keys_file: cannot read {keys_file}: {exc.strerror}") from None
        keys += [line.strip() for line in lines if not line.lstrip().startswith("#")]
    return list(dict.fromkeys(k for k in keys if k))


def key_matches(authorization: str | None, digests: tuple[bytes, ...]) -> bool:
    scheme, _, token = (authorization or "").partition(" ")
    presented = digest(token.strip()) if scheme.lower() == "bearer" and token.strip() else b""
    matched = False
    for reference in digests:  # no early exit: every key is compared every time
        matched |= hmac.compare_digest(presented, reference)
    return matched


# -- errors -----------------------------------------------------------------------------------
def error_response(exc: RagError) -> JSONResponse:
    """The one place a ragfan error becomes HTTP: its status, `{"detail": ...}`, and its headers."""
    return JSONResponse(status_code=exc.status_code, content={"detail": exc.detail()}, headers=exc.headers())


async def _on_rag_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, RagError)
    return error_response(exc)


async def _on_validation_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    return error_response(InvalidRequest.from_validation(list(exc.errors())))


# -- the body, parsed once --------------------------------------------------------------------
def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _depth(value: Any, limit: int) -> int:
    stack, deepest = [(value, 1)], 0
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            if deepest > limit:
                return deepest
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def parse_json(body: bytes) -> Any:
    """The body as JSON, or json.JSONDecodeError saying why not: not UTF-8, too deep, not finite, ..."""
    def fail(reason: str, pos: int = 0) -> json.JSONDecodeError:
        error = json.JSONDecodeError(reason, "", pos)
        error.args = (reason,)  # the reason alone, without JSONDecodeError's "line 1 column 1" suffix
        return error

    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise fail(f"body is not valid UTF-8: byte 0x{body[exc.start]:02x} at offset {exc.start}", exc.start) from None
    try:
        value = json.loads(text, parse_float=_finite, parse_constant=_no_constant)
    except RecursionError:
        raise fail(f"JSON is nested too deeply; the limit is {MAX_JSON_DEPTH} levels") from None
    except json.JSONDecodeError as exc:
        raise fail(f"body is not valid JSON: {exc}", exc.pos) from None
    except ValueError as exc:  # the checks above
        raise fail(f"body is not valid JSON: {exc}") from None
    if _depth(value, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise fail(f"JSON is nested too deeply; the limit is {MAX_JSON_DEPTH} levels")
    return value


class _StrictJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_json(await self.body())
        return self._json


class StrictJSONRoute(APIRoute):
    """A route whose JSON body FastAPI reads with `parse_json`: one parse, with ragfan's rules.

    FastAPI turns the JSONDecodeError into a RequestValidationError of type `json_invalid`, which
    the handler answers as 422 with the reason.
    """

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            return await handler(_StrictJSONRequest(request.scope, request.receive))

        return strict


# -- the guard --------------------------------------------------------------------------------
def _header(scope: dict[str, Any], name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class Guard:
    """ASGI middleware: the API key, then a bounded body (see the module docstring)."""

    def __init__(self, app: Any, *, max_body_bytes: int, key_digests: tuple[bytes, ...] = (),
                 write_body_bytes: int | None = None) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.write_body_bytes = write_body_bytes or max_body_bytes  # /v1/documents: writes carry whole documents
        self.key_digests = key_digests

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            receive = await self._check(scope, receive)
        except RagError as exc:
            await error_response(exc)(scope, receive, send)
            return
        if receive is not None:
            await self.app(scope, receive, send)

    async def _check(self, scope: dict[str, Any], receive: Any) -> Any:
        """`receive` for the app (replaying a body read here), None when the client left; raises to refuse."""
        path, root = scope.get("path", ""), scope.get("root_path", "")
        local = path[len(root):] if root and path.startswith(root) else path
        # /dashboard/ too: the router answers it with a redirect to /dashboard, which holds nothing
        if self.key_digests and local.rstrip("/") not in OPEN_PATHS:
            if not key_matches(_header(scope, b"authorization"), self.key_digests):
                raise Unauthorized("missing or invalid API key: send 'Authorization: Bearer <key>'")
        limit = self.write_body_bytes if local.startswith(WRITE_PATHS) else self.max_body_bytes
        declared = _header(scope, b"content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                raise MalformedRequest(f"Content-Length {declared[:40]!r} is not a number")
            if int(declared) > limit:
                raise PayloadTooLarge(f"request body is {int(declared)} bytes; the limit is {limit}")
        if scope.get("method") not in {"POST", "PUT", "PATCH"}:
            return receive
        body = bytearray()
        while True:  # at most `limit` bytes are ever held
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            if len(body) > limit:
                raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
            if not message.get("more_body", False):
                return _replay(bytes(body), receive)


def _replay(body: bytes, receive: Any) -> Any:
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: wait for the disconnect, as the server would

    return replay


# -- the app ----------------------------------------------------------------------------------
def build_api(gateway: Gateway, *, max_body_bytes: int | None = None, key_digests: Iterable[bytes] = ()) -> FastAPI:
    """The FastAPI app serving `gateway`, with its config's limits and rules in the OpenAPI schema."""
    config = gateway.config
    digests = tuple(key_digests)
    api = FastAPI(
        title="ragfan",
        version=__version__,
        description="Fans each query out to several retrievers in parallel and fuses their answers.",
    )
    api.router.route_class = StrictJSONRoute
    api.add_exception_handler(RagError, _on_rag_error)
    api.add_exception_handler(RequestValidationError, _on_validation_error)
    if config.gateway.compress_min_bytes is not None:
        # Inside the Guard (added first, so it runs second): a refused request costs no compression.
        api.add_middleware(CompressMiddleware, minimum_size=config.gateway.compress_min_bytes)
    api.add_middleware(Guard, max_body_bytes=max_body_bytes or config.gateway.max_body_bytes, key_digests=digests,
                       write_body_bytes=config.writes.max_body_bytes)

    @api.post("/v1/search", response_model=SearchResponse, summary="Search all or some retrievers",
              responses={**ERRORS, 422: {"model": ErrorResponse, "description": "an invalid request"}})
    async def search(request: SearchRequest) -> SearchResponse:
        return await gateway.search(request)

    @api.post("/v1/search/batch", response_model=BatchSearchResponse, summary="Several searches, answered in order",
              description="Each search is answered in its place, 200 with its SearchResponse or its own 422 or "
              "503 error; one bad or failed search fails no other. Each retriever is asked once for the batch.",
              responses={**ERRORS, 413: {"model": ErrorResponse, "description": "the body is over "
                         "gateway.max_body_bytes, or it has more searches than gateway.max_batch_searches"},
                         422: {"model": ErrorResponse, "description": "the body is not a list of searches"}})
    async def search_batch(batch: BatchSearchRequest) -> BatchSearchResponse:
        return await gateway.search_batch(batch)

    @api.get("/v1/retrievers", response_model=RetrieversResponse, summary="Each retriever and its health",
             responses={401: ERRORS[401]})
    async def retrievers() -> RetrieversResponse:
        return await gateway.retrievers()

    @api.post("/v1/retrievers/{name}/reload", response_model=ReloadResponse,
              summary="Serve the version of a retriever's index that its artifacts link points to now",
              description="Every replica of the retriever (each shard's) opens and verifies the new version beside "
              "the one it serves and swaps to it; searches already running finish on the old one, and none fails. "
              "Answers once every replica serves it. Cached answers of the old version are not served after.",
              responses={401: ERRORS[401],
                         404: {"model": ErrorResponse, "description": "no retriever of that name"},
                         409: {"model": ErrorResponse, "description": "the new version fails verification (a "
                               "checksum, the model, the dimension), or the retriever holds no index; nothing "
                               "changed"},
                         503: {"model": ErrorResponse, "description": "some replica did not serve it in time"}})
    async def reload(name: str) -> ReloadResponse:
        return await gateway.reload(name)

    write_errors = {
        **ERRORS,
        409: {"model": ErrorResponse, "description": "a named retriever takes no writes (graph, synthetic, dense with "
              "`encoder: local`), or the app has writes off; nothing was applied"},
        413: {"model": ErrorResponse, "description": "more documents than writes.max_documents, or a body over "
              "writes.max_body_bytes; nothing was applied"},
        422: {"model": ErrorResponse, "description": "an unknown retriever, a document without text or with an empty "
              "id; nothing was applied"},
        503: {"model": ErrorResponse, "description": "the write could not be made durable (the log's storage, the "
              "encoder); nothing was applied. Writes by id are idempotent: retry"},
    }

    @api.post("/v1/documents", response_model=WriteResponse, summary="Add or replace documents, by id, while serving",
              description="Acknowledged once it is in the write-ahead log on disk (fsync); searched by every "
              "replica within seconds, or before the answer with `wait: true`. A batch is applied whole or not at "
              "all.", responses=write_errors)
    async def upsert(request: UpsertRequest) -> WriteResponse:
        return await gateway.upsert(request)

    @api.post("/v1/documents/delete", response_model=WriteResponse, summary="Remove documents by id while serving",
              description="Acknowledged once it is in the write-ahead log on disk (fsync). A document that a write "
              "replaced or deleted is never answered again once the write is visible.", responses=write_errors)
    async def delete(request: DeleteRequest) -> WriteResponse:
        return await gateway.delete(request)

    @api.get("/v1/stats", response_model=StatsResponse, summary="The last 15 minutes, for every gateway replica",
             description="What the /dashboard page draws: searches per second, latency quantiles, status mix, "
             "degraded and cache-hit rates per 5-second bucket, and each retriever's health now.",
             responses={401: ERRORS[401], 404: {"model": ErrorResponse, "description": "gateway.metrics is false"},
                        503: {"model": ErrorResponse, "description": "the stats deployment does not answer"}})
    async def stats() -> dict[str, Any]:
        return await gateway.live_stats()

    @api.get("/dashboard", response_class=HTMLResponse, summary="A live page of /v1/stats's figures")
    async def dashboard() -> HTMLResponse:
        return HTMLResponse(DASHBOARD.read_text(encoding="utf-8"))

    @api.get("/healthz", summary="200 when the gateway is up")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    api.openapi = _openapi_with_rules(api, gateway, secured=bool(digests))  # type: ignore[method-assign]
    return api


def _openapi_with_rules(api: FastAPI, gateway: Gateway, *, secured: bool) -> Callable[[], dict[str, Any]]:
    """FastAPI's schema, plus the rules that depend on the config, so that clients and fuzzers
    generated from it agree with the server: the query's length, the retriever names as an enum,
    the filter keys, and the API key where one is needed."""
    default = api.openapi

    def openapi() -> dict[str, Any]:
        if api.openapi_schema is not None:
            return api.openapi_schema
        schema = default()
        config = gateway.config
        components = schema["components"]["schemas"]
        request = components["SearchRequest"]["properties"]
        request["query"]["maxLength"] = config.max_query_chars
        names = {"type": "string", "enum": config.names}
        request["retrievers"]["anyOf"][0]["items"] = names
        keys = filter_keys(config)
        request["filters"]["anyOf"][0]["propertyNames"] = {"enum": keys} if keys else {}
        if not keys:
            request["filters"]["anyOf"][0]["maxProperties"] = 0
        components["FusionOptions"]["properties"]["weights"]["anyOf"][0]["propertyNames"] = names
        for parameter in schema["paths"]["/v1/retrievers/{name}/reload"]["post"]["parameters"]:
            parameter["schema"] = {**parameter["schema"], **names}
        searches = components["BatchSearchRequest"]["properties"]["searches"]
        # Any JSON value: each is checked as a SearchRequest on its own, and a bad one is answered 422
        # in its place while the batch answers 200, so the schema must not refuse the whole batch for it.
        searches["items"] = {"description": "a SearchRequest (#/components/schemas/SearchRequest), checked on its own"}
        searches["maxItems"] = config.gateway.max_batch_searches
        for model, items in (("UpsertRequest", "documents"), ("DeleteRequest", "ids")):
            write = components[model]["properties"]
            write["retrievers"]["anyOf"][0]["items"] = names  # a name that takes no writes: 409, as documented
            write[items]["maxItems"] = config.writes.max_documents
        if secured:
            schema["components"]["securitySchemes"] = {"APIKey": {"type": "http", "scheme": "bearer"}}
            for path, operations in schema["paths"].items():
                if path not in OPEN_PATHS:
                    for operation in operations.values():
                        operation["security"] = [{"APIKey": []}]
        api.openapi_schema = schema
        return schema

    return openapi
