"""Errors of the service layer. See `actors.errors` for the whole tree; all derive from RagError."""

from __future__ import annotations

from typing import Any

from actors.errors import DataError, RagError, RetrieverFailed


class ConfigError(RagError):
    """The config file is missing, unreadable or invalid. The message names the bad key."""


class InvalidRequest(RagError):
    """A search request is invalid. `errors` follows FastAPI's 422 shape: loc, msg, type."""

    def __init__(self, message: str, errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.errors = errors or [{"loc": ["body"], "msg": message, "type": "value_error"}]

    def __reduce__(self):
        return (type(self), (self.message, self.errors))

    @classmethod
    def from_validation(cls, exc: Any) -> InvalidRequest:
        """From a pydantic ValidationError of a request body, located as HTTP's 422 locates it."""
        errors = [{"loc": ["body", *e["loc"]], "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        return cls("; ".join(f"{'.'.join(map(str, e['loc'][1:]))}: {e['msg']}" for e in errors), errors)


class NoRetrieverAvailable(RagError):
    """Every selected retriever failed. `reasons` maps each retriever to why."""

    def __init__(self, message: str, reasons: dict[str, Any] | None = None, *, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.reasons = reasons or {}
        self.retry_after_s = retry_after_s

    def __reduce__(self):
        return (_rebuild_unavailable, (self.message, self.reasons, self.retry_after_s))


def _rebuild_unavailable(message: str, reasons: dict[str, Any], retry_after_s: int) -> NoRetrieverAvailable:
    return NoRetrieverAvailable(message, reasons, retry_after_s=retry_after_s)


__all__ = ["ConfigError", "DataError", "InvalidRequest", "NoRetrieverAvailable", "RagError", "RetrieverFailed"]
