"""A cancelled call stops its search at the next stage or batch boundary, and the tests count it.

The replica runs `retriever.search` in a worker thread, which cancelling a coroutine cannot stop;
`SearchRunner` hands the search a CancelToken and sets it. Each test counts how much of the work
ran after the cancel, so a search that ignored the token would show up as work done to the end.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from actors.dense import DenseRetriever
from actors.deployment import SearchRunner
from actors.errors import Cancelled
from actors.graph import GraphRetriever
from actors.keyword import KeywordRetriever
from actors.synthetic import SyntheticRetriever
from actors.types import CancelToken, Query
from tests.unit.test_retrievers import TRIPLES

# Four groups for the dense index: one unfiltered, three filters, so four index calls in one batch.
BATCH = [
    Query("cancer risk", top_k=2),
    Query("cancer risk", top_k=2, filters={"domain": "neuro"}),
    Query("cancer risk", top_k=2, filters={"domain": "metabolism"}),
    Query("cancer risk", top_k=2, filters={"domain": "oncology"}),
]


class CountingIndex:
    """A FAISS index that counts its searches and cancels the token after the first one."""

    def __init__(self, index, cancel: CancelToken) -> None:
        self.index, self.cancel, self.searches = index, cancel, 0
        self.ntotal, self.d = index.ntotal, index.d

    def search(self, *args, **kwargs):
        self.searches += 1
        self.cancel.cancel()  # the deadline passes while the first sub-batch runs
        return self.index.search(*args, **kwargs)


def test_dense_stops_between_the_index_calls_of_a_batch(docs, embedder):
    r = DenseRetriever.from_documents(name="d", documents=docs, embedder=embedder)
    assert len(r.search(BATCH)) == 4  # without a cancel, all four groups are searched
    cancel = CancelToken()
    r.index = CountingIndex(r.index, cancel)
    with pytest.raises(Cancelled):
        r.search(BATCH, cancel=cancel)
    assert r.index.searches == 1  # of 4: the other three sub-batches never ran


def test_dense_stops_between_encoding_and_the_index(docs, embedder):
    r = DenseRetriever.from_documents(name="d", documents=docs, embedder=embedder)
    cancel = CancelToken()
    r.index = CountingIndex(r.index, cancel)
    encode = embedder.encode

    def encode_then_give_up(texts, **kw):
        cancel.cancel()  # the deadline passes while the model encodes
        return encode(texts, **kw)

    embedder.encode = encode_then_give_up
    with pytest.raises(Cancelled):
        r.search(BATCH, cancel=cancel)
    assert r.index.searches == 0


def test_keyword_stops_between_queries(docs):
    r = KeywordRetriever(name="k", documents=docs)
    cancel, masked = CancelToken(), []
    mask = r._mask

    def mask_then_give_up(query):
        masked.append(query)
        cancel.cancel()
        return mask(query)

    r._mask = mask_then_give_up
    with pytest.raises(Cancelled):
        r.search(BATCH, cancel=cancel)
    assert len(masked) == 1  # of 4


def test_graph_stops_between_queries(embedder):
    g = GraphRetriever(name="g", triples=TRIPLES, embedder=embedder)
    cancel, linked = CancelToken(), []
    link = g.link

    def link_then_give_up(text, vector):
        linked.append(text)
        cancel.cancel()
        return link(text, vector)

    g.link = link_then_give_up
    with pytest.raises(Cancelled):
        g.search([Query("p53"), Query("metformin"), Query("obesity")], cancel=cancel)
    assert linked == ["p53"]


def test_synthetic_stops_between_queries_and_its_wait_ends_when_cancelled(docs):
    cancel = CancelToken()
    cancel.cancel()
    with pytest.raises(Cancelled):
        SyntheticRetriever(name="s", documents=docs).search(BATCH, cancel=cancel)
    # a minute's wait, cancelled from another thread once the search is under way
    slow, cancel = SyntheticRetriever(name="s", documents=docs, delay_ms=60_000), CancelToken()
    threading.Timer(0.05, cancel.cancel).start()
    with pytest.raises(Cancelled):
        slow.search(BATCH, cancel=cancel)


class Recorder:
    """A search that records when it starts and ends, and waits until its token is set or `release`."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.started = threading.Event()
        self.release = threading.Event()

    def search(self, queries, *, cancel: CancelToken):
        self.events.append(f"start {queries[0].text}")
        self.started.set()
        try:
            while not self.release.wait(0.005):
                cancel.check()
            return [[] for _ in queries]
        finally:
            self.events.append(f"end {queries[0].text}")


async def test_the_replica_stops_a_cancelled_search_and_holds_its_slot_until_it_has():
    recorder = Recorder()
    runner = SearchRunner(recorder.search, max_concurrent=1)
    first = asyncio.ensure_future(runner([Query("a")]))
    await asyncio.to_thread(recorder.started.wait, 10)
    second = asyncio.ensure_future(runner([Query("b")]))  # waits for the slot
    first.cancel()  # the gateway's deadline passed: Serve cancels the call in the replica
    with pytest.raises(asyncio.CancelledError):
        await first
    assert recorder.events[:2] == ["start a", "end a"]  # the thread had stopped before the call ended
    assert runner.counts["cancelled"] == runner.counts["stopped_early"] == 1
    recorder.release.set()
    assert await asyncio.wait_for(second, 10) == [[]]
    assert recorder.events == ["start a", "end a", "start b", "end b"]  # one thread at a time
    assert runner.counts == {"started": 2, "running": 0, "cancelled": 1, "stopped_early": 1}


async def test_a_search_that_ignores_the_token_is_counted_as_run_to_the_end():
    started, gate = threading.Event(), threading.Event()

    def stubborn(queries, *, cancel):
        started.set()
        gate.wait(10)
        return [[] for _ in queries]

    runner = SearchRunner(stubborn)
    call = asyncio.ensure_future(runner([Query("a")]))
    await asyncio.to_thread(started.wait, 10)
    call.cancel()
    await asyncio.sleep(0)  # the runner takes the cancellation and waits for the thread
    gate.set()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert runner.counts == {"started": 1, "running": 0, "cancelled": 1, "stopped_early": 0}
