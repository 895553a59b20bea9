"""ragfan's service layer: config, lanes, fusion, the HTTP gateway, the Python client and the CLI.

The client, the request and response types it speaks, and every error import from here, as
httpx's do:

    from serve_app import InvalidRequest, RagClient, SearchResponse

Importing `serve_app` loads none of them: each name is imported on first use (`__getattr__`), so
the modules of the service, which all import this package, pay only for what they use, and the
client never loads Ray, numpy or torch until it is used on a Ray cluster.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from actors.errors import (
        Cancelled,
        ConfigError,
        Conflict,
        DataError,
        InvalidRequest,
        MalformedRequest,
        NoRetrieverAvailable,
        NotFound,
        Overloaded,
        PayloadTooLarge,
        RagError,
        RetrieverFailed,
        ServiceUnavailable,
        Unauthorized,
    )
    from serve_app.client import RagClient
    from serve_app.schemas import (
        FusionOptions,
        ReloadResponse,
        ReplicaVersion,
        Result,
        RetrieverStatus,
        SearchRequest,
        SearchResponse,
        Source,
        WriteDocument,
        WriteResponse,
    )

# Each public name, and the module that defines it.
_HOMES = {
    **dict.fromkeys(["RagClient"], "serve_app.client"),
    **dict.fromkeys(["FusionOptions", "ReloadResponse", "ReplicaVersion", "Result", "RetrieverStatus", "SearchRequest",
                     "SearchResponse", "Source", "WriteDocument", "WriteResponse"], "serve_app.schemas"),
    **dict.fromkeys(["Cancelled", "ConfigError", "Conflict", "DataError", "InvalidRequest", "MalformedRequest",
                     "NoRetrieverAvailable", "NotFound", "Overloaded", "PayloadTooLarge", "RagError", "RetrieverFailed",
                     "ServiceUnavailable", "Unauthorized"], "actors.errors"),
}

__all__ = [
    "Cancelled",
    "ConfigError",
    "Conflict",
    "DataError",
    "FusionOptions",
    "InvalidRequest",
    "MalformedRequest",
    "NoRetrieverAvailable",
    "NotFound",
    "Overloaded",
    "PayloadTooLarge",
    "RagClient",
    "RagError",
    "ReloadResponse",
    "ReplicaVersion",
    "Result",
    "RetrieverFailed",
    "RetrieverStatus",
    "SearchRequest",
    "SearchResponse",
    "ServiceUnavailable",
    "Source",
    "Unauthorized",
    "WriteDocument",
    "WriteResponse",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'serve_app' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
