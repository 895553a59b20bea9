"""Group concurrent requests into one downstream call, each request keeping its own deadline.

The gateway keeps one Batcher per retriever and one per encoder. Requests that arrive while the
downstream is busy wait together and go out as one call; a lone request goes at once:

    submit_many([q1])  ─ nothing in flight ──────►  send([q1])
    submit_many([q2])  ┐
    submit_many([q3])  ├ a batch in flight: queue ►  send([q2, q3, q4])   when a slot frees,
    submit_many([q4])  ┘                                                  or the window closes

- At most `max_concurrent` calls are in flight; a free slot with another call already in flight
  waits up to `wait_s` for the batch to fill (never longer, and never when nothing is in flight).
- A call carries at most `max_batch_size` items and runs until the latest deadline among them;
  `send(items, deadline)` gets that deadline (on `now()`'s clock, serve_app/clock.py) to pace calls
  of its own.
- `submit_many(items, deadlines=...)` queues a group (one search's query, or a batch query's) that
  goes out as one call, whole, even past `max_batch_size` (a batch query asks each retriever once);
  smaller groups still share a call.
- A request whose caller gives up (its own deadline, or cancellation) leaves the queue; when every
  request of a call in flight has given up, the call is cancelled, which cancels it downstream.
- `sizes` counts the batch sizes sent, for `ragfan bench`; `on_batch` is told each one, for metrics.
"""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclass(slots=True)
class _Waiter(Generic[T]):
    item: T
    deadline: float  # when the caller stops waiting, on `now()`'s clock: the one `loop.time()` rounds
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Batcher(Generic[T, R]):
    def __init__(
        self,
        send: Callable[[list[T], float], Awaitable[Sequence[R]]],
        *,
        max_batch_size: int = 32,
        max_concurrent: int = 1,
        wait_s: float = 0.0,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch_size < 1 or max_concurrent < 1 or wait_s < 0:
            raise ValueError("max_batch_size and max_concurrent must be >= 1, wait_s >= 0")
        self._send = send
        self.max_batch_size = max_batch_size
        self.max_concurrent = max_concurrent
        self.wait_s = wait_s
        self._queue: deque[list[_Waiter[T]]] = deque()  # groups, each sent whole in one call
        self._running: dict[asyncio.Task, list[_Waiter[T]]] = {}  # each call in flight, and whom it answers
        self._timer: asyncio.TimerHandle | None = None
        self.sizes: Counter[int] = Counter()
        self.on_batch = on_batch  # told each batch size sent (the gateway's metrics)

    @property
    def in_flight(self) -> int:
        return len(self._running)

    async def submit_many(self, items: Sequence[T], *, deadlines: Sequence[float]) -> list[R | BaseException]:
        """Each item's answer, or its exception (TimeoutError past its deadline, on `now()`'s clock),
        from one call that carries all of them, however many."""
        waiters = self._enqueue(items, deadlines)
        return await asyncio.gather(*(self._wait(w) for w in waiters), return_exceptions=True)

    def _enqueue(self, items: Sequence[T], deadlines: Sequence[float]) -> list[_Waiter[T]]:
        group = [_Waiter(item, deadline) for item, deadline in zip(items, deadlines, strict=True)]
        self._queue.append(group)
        self._schedule()
        return group

    async def _wait(self, waiter: _Waiter[T]) -> R:
        try:
            async with asyncio.timeout_at(waiter.deadline):
                return await asyncio.shield(waiter.future)
        finally:
            if not waiter.future.done():  # gave up (deadline or cancellation): nobody wants the answer
                waiter.future.cancel()
                self._abandoned()

    # -- dispatch -------------------------------------------------------------------------------
    def _schedule(self) -> None:
        while self._queue and len(self._running) < self.max_concurrent:
            self._drop_abandoned()
            if not self._queue:
                return
            full = sum(map(len, self._queue)) >= self.max_batch_size
            if self._running and not full and self.wait_s > 0:
                # Another call is in flight, so this one may wait a little for company.
                if self._timer is None:
                    self._timer = asyncio.get_running_loop().call_later(self.wait_s, self._window_closed)
                return
            self._dispatch()

    def _window_closed(self) -> None:
        self._timer = None
        if self._queue and len(self._running) < self.max_concurrent:
            self._dispatch()
            self._schedule()

    def _dispatch(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch = list(self._queue.popleft())  # a group larger than max_batch_size goes whole, alone
        while self._queue and len(batch) + len(self._queue[0]) <= self.max_batch_size:
            batch += self._queue.popleft()
        self.sizes[len(batch)] += 1
        if self.on_batch is not None:
            self.on_batch(len(batch))
        self._running[asyncio.get_running_loop().create_task(self._run(batch))] = batch

    async def _run(self, batch: list[_Waiter[T]]) -> None:
        task = asyncio.current_task()
        assert task is not None  # _dispatch runs this as a task
        deadline = max(w.deadline for w in batch)
        try:
            async with asyncio.timeout_at(deadline):
                answers = await self._send([w.item for w in batch], deadline)
            if len(answers) != len(batch):
                raise RuntimeError(f"{len(answers)} answers for {len(batch)} requests")
        except asyncio.CancelledError:
            for w in batch:
                w.future.cancel()
            raise
        except Exception as exc:
            for w in batch:
                if not w.future.done():
                    w.future.set_exception(exc)
                    w.future.exception()  # retrieved here: a caller that gave up must not log it as lost
        else:
            for w, answer in zip(batch, answers, strict=True):
                if not w.future.done():
                    w.future.set_result(answer)
        finally:
            self._running.pop(task, None)
            self._schedule()

    # -- callers who gave up ----------------------------------------------------------------------
    def _drop_abandoned(self) -> None:
        groups = ([w for w in group if not w.future.done()] for group in self._queue)
        self._queue = deque(group for group in groups if group)

    def _abandoned(self) -> None:
        self._drop_abandoned()
        for task, batch in list(self._running.items()):
            if all(w.future.done() for w in batch):
                task.cancel()  # nobody waits for this call any more: stop it downstream too
