"""Every error ragfan raises, in one tree.

    RagError                        500  base class; `message` says what was wrong and what to do
    ├── ConfigError                      bad configuration; raised at start, names the key and the file
    ├── DataError                        a data or index file is missing or malformed; names the file
    ├── RetrieverFailed                  a retriever could not load or answer
    ├── InvalidRequest              422  bad search input; `errors` locates each problem (loc, msg, type)
    │   └── MalformedRequest        400  the request cannot be read: a Content-Length that is not a number
    ├── Unauthorized                401  API keys are on and the request has no valid one
    ├── NotFound                    404  the app does not offer this (GET /v1/stats with gateway.metrics: false)
    ├── Conflict                    409  the request cannot be carried out in the state the data is in: a
    │                                    reload of a version that fails verification, or of a kind with no index
    ├── PayloadTooLarge             413  the body is over gateway.max_body_bytes
    └── ServiceUnavailable          503  try again after `retry_after_s`
        ├── Overloaded                   the gateway is at its queue limit (Serve's backpressure)
        └── NoRetrieverAvailable         every selected retriever failed; `reasons` says why, per retriever

    Cancelled                            not a RagError: a signal inside a replica that the caller of a
                                         search gave up (like asyncio.CancelledError); no user sees it

The number is the HTTP status the gateway answers with. One function writes every error body
(`serve_app/http.py`), and the HTTP client maps each status back to the same class, so a caller
catches the same exception whether it searched through a handle or over HTTP.

The classes live here, in `actors`, because `serve_app` imports `actors` and never the reverse.
"""

from __future__ import annotations

from typing import Any


class RagError(Exception):
    """Base class of every ragfan error."""

    status_code = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __reduce__(self):  # errors cross process boundaries through Ray: keep them picklable
        return (type(self), (self.message,))

    def detail(self) -> Any:
        """What the JSON error body carries under `detail`."""
        return self.message

    def headers(self) -> dict[str, str]:
        return {}


class ConfigError(RagError):
    """The config file is missing, unreadable or invalid. The message names the bad key."""


class DataError(RagError):
    """A data or index file is missing, unreadable or malformed."""


class RetrieverFailed(RagError):
    """A retriever could not be loaded, or failed while answering."""


class InvalidRequest(RagError):
    """A search request is invalid. `errors` follows FastAPI's 422 shape: loc, msg, type."""

    status_code = 422

    def __init__(self, message: str, errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.errors = errors or [{"loc": ["body"], "msg": message, "type": "value_error"}]

    def __reduce__(self):
        return (type(self), (self.message, self.errors))

    def detail(self) -> Any:
        return self.errors

    @classmethod
    def from_validation(cls, errors: list[Any], *, prefix: tuple[str, ...] = ("body",)) -> InvalidRequest:
        """From pydantic's `ValidationError.errors()`, located as HTTP's 422 locates them.

        A JSON decoding error carries its reason in `ctx.error`; that reason is the message.
        """
        located = []
        for e in errors:
            loc = [str(p) if not isinstance(p, int) else p for p in e["loc"]]
            loc = loc if loc[:len(prefix)] == list(prefix) else [*prefix, *loc]
            msg = (e.get("ctx") or {}).get("error") if e["type"] == "json_invalid" else None
            located.append({"loc": loc, "msg": str(msg or e["msg"]), "type": e["type"]})
        message = "; ".join(f"{'.'.join(map(str, e['loc'][len(prefix):])) or 'body'}: {e['msg']}" for e in located)
        return cls(message, located)


class MalformedRequest(InvalidRequest):
    """The request cannot be read at all, e.g. its Content-Length is not a number."""

    status_code = 400

    def detail(self) -> Any:
        return self.message


class Unauthorized(RagError):
    """API keys are on, and the request sent none or a wrong one."""

    status_code = 401

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class NotFound(RagError):
    """What was asked for is switched off in this app's config."""

    status_code = 404


class Conflict(RagError):
    """The app cannot do this with the data as it is: the message says what is wrong and what to do."""

    status_code = 409


class PayloadTooLarge(RagError):
    """The request body is over the gateway's limit."""

    status_code = 413


class ServiceUnavailable(RagError):
    """The service cannot answer now; try again after `retry_after_s` seconds."""

    status_code = 503

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def __reduce__(self):
        return (_rebuild, (type(self), self.message, {"retry_after_s": self.retry_after_s}))

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class Overloaded(ServiceUnavailable):
    """Too many requests are waiting at the gateway: Serve refused this one (backpressure)."""


class NoRetrieverAvailable(ServiceUnavailable):
    """Every selected retriever failed. `reasons` maps each retriever to its status and error."""

    def __init__(self, message: str, reasons: dict[str, Any] | None = None, *, retry_after_s: int = 1) -> None:
        super().__init__(message, retry_after_s=retry_after_s)
        self.reasons = reasons or {}

    def __reduce__(self):
        return (_rebuild, (type(self), self.message, {"reasons": self.reasons, "retry_after_s": self.retry_after_s}))

    def detail(self) -> Any:
        return {"message": self.message, "retrievers": self.reasons}


class Cancelled(Exception):
    """A search stopped early because its caller stopped waiting for it.

    Raised inside a replica's worker thread at a stage or batch boundary (`CancelToken.check` in
    actors/types.py) and never seen by a user: the call it belongs to was already cancelled. A
    signal rather than an error, like `asyncio.CancelledError`, so it does not derive from RagError.
    """


def _rebuild(cls: type[RagError], message: str, kwargs: dict[str, Any]) -> RagError:
    return cls(message, **kwargs)


__all__ = sorted([
    "Cancelled", "ConfigError", "Conflict", "DataError", "InvalidRequest", "MalformedRequest", "NoRetrieverAvailable",
    "NotFound", "Overloaded", "PayloadTooLarge", "RagError", "RetrieverFailed", "ServiceUnavailable", "Unauthorized",
])
