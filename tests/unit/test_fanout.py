import asyncio

from serve_app.fanout import Call, call_with_deadline, fan_out
from serve_app.outcome import describe_error


async def sleeper(seconds: float, value):
    await asyncio.sleep(seconds)
    return value


async def test_calls_run_concurrently():
    events: list[str] = []
    all_started = asyncio.Event()

    async def call(i: int) -> list[int]:
        events.append(f"start {i}")
        if len(events) == 4:
            all_started.set()
        await all_started.wait()  # one after another, the first would wait here until its deadline
        events.append(f"end {i}")
        return [i]

    outcomes = await fan_out({f"r{i}": Call(lambda i=i: call(i), timeout_s=2) for i in range(4)})
    assert [o.status for o in outcomes.values()] == ["ok"] * 4
    assert [o.value for o in outcomes.values()] == [[0], [1], [2], [3]]
    # every call started before any finished
    assert sorted(events[:4]) == [f"start {i}" for i in range(4)]
    assert sorted(events[4:]) == [f"end {i}" for i in range(4)]


async def test_timeout_cancels_the_call_and_does_not_wait_for_it():
    events: list[str] = []
    never = asyncio.Event()  # nothing sets it: the call can only end by being cancelled

    async def hang():
        events.append("started")
        try:
            await never.wait()
            events.append("finished")
        except asyncio.CancelledError:
            events.append("cancelled")
            raise

    # (wait_for only keeps a broken call_with_deadline that waits for the call from hanging the suite)
    outcome = await asyncio.wait_for(call_with_deadline("slow", Call(hang, timeout_s=0.1)), 30)
    events.append("outcome")
    assert outcome.status == "timeout"
    assert "100 ms" in outcome.error
    assert events == ["started", "cancelled", "outcome"]  # cancelled before the outcome, never waited out


async def test_cancel_method_of_a_pending_response_is_called_on_timeout():
    class Pending:
        cancelled = False

        def __await__(self):
            return asyncio.sleep(60).__await__()

        def cancel(self):
            Pending.cancelled = True

    outcome = await call_with_deadline("r", Call(Pending, timeout_s=0.05))
    assert outcome.status == "timeout" and Pending.cancelled


async def test_an_error_is_an_outcome_not_an_exception():
    async def boom():
        raise RuntimeError("index exploded\nsecond line")

    outcomes = await fan_out({"bad": Call(boom, 1), "good": Call(lambda: sleeper(0, ["h"]), 1)})
    assert outcomes["bad"].status == "error"
    assert outcomes["bad"].error == "RuntimeError: index exploded"
    assert outcomes["good"].status == "ok" and outcomes["good"].value == ["h"]
    assert list(outcomes) == ["bad", "good"]


def test_describe_error_unwraps_a_cause():
    class Wrapped(Exception):
        def __init__(self):
            super().__init__("long traceback ...")
            self.cause = ValueError("the real reason")

    assert describe_error(Wrapped()) == "ValueError: the real reason"
    assert describe_error(TimeoutError()) == "TimeoutError"
    assert len(describe_error(RuntimeError("x" * 5000))) <= 300
