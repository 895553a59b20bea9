import asyncio
import json

import pytest

from actors.errors import ConfigError
from serve_app import http as guard
from serve_app.breaker import CircuitBreaker
from tests.unit.fakes import Clock


def test_breaker_opens_after_n_failures_and_closes_after_a_good_probe():
    clock = Clock(100.0)
    b = CircuitBreaker(failures=3, cooldown_s=5, clock=clock)
    for _ in range(2):
        assert b.allow()
        b.record(False)
    assert b.state == "closed"
    assert b.allow()
    b.record(True)  # a success resets the count: failures must be consecutive
    for _ in range(3):
        assert b.allow()
        b.record(False)
    assert b.state == "open" and not b.allow() and b.retry_in_s() == 5
    clock.now += 5
    assert b.allow() and b.state == "half_open"  # the one probe
    assert not b.allow()  # the others still skip while it is out
    b.record(True)
    assert b.state == "closed" and b.consecutive_failures == 0 and b.allow()


def test_a_failed_probe_reopens_and_a_cancelled_one_frees_the_slot():
    clock = Clock(100.0)
    b = CircuitBreaker(failures=1, cooldown_s=2, clock=clock)
    b.allow()
    b.record(False)
    clock.now += 2
    assert b.allow()
    b.release()  # the request was cancelled: no verdict, but the next request may probe
    assert b.allow()
    b.record(False)
    assert b.state == "open" and b.snapshot() == {"state": "open", "consecutive_failures": 2, "retry_in_s": 2.0}
    with pytest.raises(ValueError):
        CircuitBreaker(failures=0)


def test_key_matching_is_by_digest_and_needs_the_bearer_scheme():
    digests = (guard.digest("k1"), guard.digest("k2"))
    assert guard.key_matches("Bearer k2", digests)
    assert guard.key_matches("bearer  k1 ", digests)
    for header in (None, "", "k1", "Basic k1", "Bearer", "Bearer k3", "Bearer k1x"):
        assert not guard.key_matches(header, digests)


def test_api_keys_come_from_env_and_file(tmp_path, monkeypatch):
    monkeypatch.setenv("RAGFAN_API_KEYS", " a, b ,,")
    keys = tmp_path / "keys"
    keys.write_text("# comment\nc\n\nb\n")
    assert guard.load_api_keys(keys) == ["a", "b", "c"]
    monkeypatch.delenv("RAGFAN_API_KEYS")
    assert guard.load_api_keys() == []
    with pytest.raises(ConfigError, match="api_keys_file"):
        guard.load_api_keys(tmp_path / "missing")


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'{"query": "ok", "top_k": 3}', None),
        (b"\xff", "not valid UTF-8"),
        (b'{"a": Infinity}', "Infinity is not valid JSON"),
        (b'{"a": 1e400}', "out of range"),
        (b"[" * 33 + b"]" * 33, "nested too deeply"),
        (b"[" * 32 + b"]" * 32, None),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b"{", "not valid JSON"),
    ],
)
def test_parse_json(body, reason):
    if reason is None:
        assert guard.parse_json(body) == json.loads(body)
        return
    with pytest.raises(json.JSONDecodeError) as info:
        guard.parse_json(body)
    assert reason in str(info.value)


def run_guard(body: bytes, headers: dict[str, str], limit: int = 100, keys: tuple[bytes, ...] = ()):
    """Drive the middleware as a server would; return (status, body, what the app received)."""
    seen = {}

    async def app(scope, receive, send):
        message = await receive()
        seen["body"] = message["body"]
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    chunks = [body[i : i + 10] for i in range(0, len(body), 10)] or [b""]
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    sent = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/search", "root_path": "",
             "headers": [(k.encode(), v.encode()) for k, v in headers.items()]}
    asyncio.run(guard.Guard(app, max_body_bytes=limit, key_digests=keys)(scope, receive, send))
    status = sent[0]["status"]
    return status, b"".join(m.get("body", b"") for m in sent[1:]), seen.get("body"), len(messages)


def test_guard_passes_a_good_body_through_whole():
    body = json.dumps({"query": "x" * 50}).encode()
    status, _, received, _ = run_guard(body, {"content-type": "application/json"})
    assert status == 200 and received == body


def test_guard_refuses_by_content_length_without_reading():
    status, out, received, unread = run_guard(b"x" * 500, {"content-length": "500"})
    assert status == 413 and received is None and unread == 50  # not one chunk was read
    assert b"500 bytes; the limit is 100" in out


def test_guard_cuts_a_streamed_body_off_at_the_limit():
    status, _, received, unread = run_guard(b"x" * 500, {})
    assert status == 413 and received is None and unread == 39  # read 110 bytes of 500, then stopped


def test_guard_asks_for_a_key_before_anything_else():
    keys = (guard.digest("secret"),)
    status, out, received, _ = run_guard(b"{}", {"content-length": "999"}, keys=keys)
    assert status == 401 and received is None and b"secret" not in out
    status, _, _, _ = run_guard(b"{}", {"authorization": "Bearer secret"}, keys=keys)
    assert status == 200
