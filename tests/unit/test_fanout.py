import asyncio
import time

from serve_app.fanout import Call, call_with_deadline, describe_error, fan_out


async def sleeper(seconds: float, value):
    await asyncio.sleep(seconds)
    return value


async def test_calls_run_concurrently():
    started = time.perf_counter()
    outcomes = await fan_out({f"r{i}": Call(lambda i=i: sleeper(0.2, [i]), timeout_s=2) for i in range(4)})
    elapsed = time.perf_counter() - started
    assert all(o.status == "ok" for o in outcomes.values())
    assert elapsed < 0.6  # well under the 0.8 s the four take one after another


async def test_timeout_cancels_the_call_and_does_not_wait_for_it():
    cancelled = asyncio.Event()

    async def hang():
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    started = time.perf_counter()
    outcome = await call_with_deadline("slow", Call(hang, timeout_s=0.1))
    assert outcome.status == "timeout"
    assert "100 ms" in outcome.error
    assert time.perf_counter() - started < 1.0
    assert cancelled.is_set()


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
