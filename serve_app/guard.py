"""What every HTTP request must pass before the gateway reads it: an API key, then a bounded body.

`Guard` is plain ASGI middleware on the gateway's FastAPI app:

- API keys (optional). With keys configured, every path but /healthz and the API docs needs
  `Authorization: Bearer KEY`; a missing or wrong key gets 401. Keys are compared as SHA-256
  digests with `hmac.compare_digest`, against every configured key, so the time taken does not
  depend on how much of a key matched. Only digests reach the replicas, and no key is logged.
- Body size. A declared `Content-Length` over the limit gets 413 before one byte is read; a
  streamed body is counted as it arrives and refused once it passes the limit, so no more than
  the limit is ever held.
- Body shape. A JSON body must be UTF-8, at most MAX_JSON_DEPTH deep, with finite numbers;
  anything else gets 422 with the reason, where FastAPI alone would answer a vague 400 or fail
  later while writing the answer.

The limits are per process: each gateway replica sets them from its config (`configure`), and one
replica process hosts one gateway.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serve_app.errors import ConfigError

OPEN_PATHS = frozenset({"/healthz", "/docs", "/docs/oauth2-redirect", "/openapi.json"})
MAX_JSON_DEPTH = 32
API_KEYS_ENV = "RAGFAN_API_KEYS"


@dataclass
class Settings:
    max_body_bytes: int = 64 * 1024
    key_digests: tuple[bytes, ...] = ()


SETTINGS = Settings()


def configure(*, max_body_bytes: int, key_digests: Iterable[bytes]) -> None:
    SETTINGS.max_body_bytes = max_body_bytes
    SETTINGS.key_digests = tuple(key_digests)


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


def check_json(body: bytes) -> str | None:
    """Why `body` is not acceptable JSON, or None when it is."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"body is not valid UTF-8: byte 0x{body[exc.start]:02x} at offset {exc.start}"
    try:
        value = json.loads(text, parse_float=_finite, parse_constant=_no_constant)
    except RecursionError:
        return f"JSON is nested too deeply; the limit is {MAX_JSON_DEPTH} levels"
    except ValueError as exc:  # JSONDecodeError, and the checks above
        return f"body is not valid JSON: {exc}"
    if _depth(value, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        return f"JSON is nested too deeply; the limit is {MAX_JSON_DEPTH} levels"
    return None


async def _reply(send: Any, status: int, detail: Any, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers],
    })
    await send({"type": "http.response.body", "body": body})


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class Guard:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, root = scope.get("path", ""), scope.get("root_path", "")
        local = path[len(root):] if root and path.startswith(root) else path
        if SETTINGS.key_digests and local not in OPEN_PATHS:
            if not key_matches(_header(scope, b"authorization"), SETTINGS.key_digests):
                await _reply(send, 401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                             [(b"www-authenticate", b"Bearer")])
                return
        limit = SETTINGS.max_body_bytes
        declared = _header(scope, b"content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                await _reply(send, 400, f"Content-Length {declared[:40]!r} is not a number")
                return
            if int(declared) > limit:
                await _reply(send, 413, f"request body is {int(declared)} bytes; the limit is {limit}")
                return
        if scope.get("method") in {"POST", "PUT", "PATCH"}:
            body = bytearray()
            while True:  # at most `limit` bytes are ever held
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body += message.get("body", b"")
                if len(body) > limit:
                    await _reply(send, 413, f"request body is over the limit of {limit} bytes")
                    return
                if not message.get("more_body", False):
                    break
            content_type = (_header(scope, b"content-type") or "").lower()
            if body and "json" in content_type and (reason := check_json(bytes(body))):
                await _reply(send, 422, [{"loc": ["body"], "msg": reason, "type": "json_invalid"}])
                return
            receive = _replay(bytes(body), receive)
        await self.app(scope, receive, send)


def _replay(body: bytes, receive: Any) -> Any:
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: wait for the disconnect, as the server would

    return replay
