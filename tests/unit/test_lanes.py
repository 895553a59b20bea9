"""The gateway's batching and lanes, with fake handles: ordering and counts, never wall-clock time."""

from __future__ import annotations

import asyncio

import pytest

from actors.errors import RetrieverFailed
from actors.synthetic import SyntheticRetriever
from actors.types import Query
from serve_app.batcher import Batcher
from serve_app.clock import now
from serve_app.lanes import Ask, EncoderLane, RetrieverLane
from serve_app.outcome import Outcome
from tests.unit.fakes import FakeEncoder, FakeHandle, GatedRetriever


class Recorder:
    """A send function whose calls wait for the test to release them."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.gate = asyncio.Event()
        self.cancelled = 0

    async def __call__(self, items, deadline):
        self.batches.append(list(items))
        try:
            await self.gate.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return [item.upper() for item in items]


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def submit(batcher: Batcher, item: str, *, timeout_s: float) -> str:
    """One request of its own: its answer, or its exception raised (TimeoutError past its deadline)."""
    [answer] = await batcher.submit_many([item], deadlines=[now() + timeout_s])
    if isinstance(answer, BaseException):
        raise answer
    return answer


async def search(lane: RetrieverLane, text: str, *, top_k: int, filters=None, vectors=None) -> Outcome:
    """One request's outcome, asked as the gateway asks a lane: a group of one."""
    [outcome] = await lane.search_many([Ask(text, top_k, filters)], vectors)
    return outcome


async def test_a_lone_request_goes_at_once():
    send = Recorder()
    batcher = Batcher(send, max_batch_size=8, max_concurrent=1, wait_s=10.0)
    task = asyncio.ensure_future(submit(batcher, "a", timeout_s=5))
    await settle()
    assert send.batches == [["a"]]  # sent before anything else happened: no window, no wait
    send.gate.set()
    assert await task == "A"


async def test_requests_that_arrive_while_a_call_is_in_flight_share_the_next_call():
    send = Recorder()
    batcher = Batcher(send, max_batch_size=8, max_concurrent=1)
    first = asyncio.ensure_future(submit(batcher, "a", timeout_s=5))
    await settle()
    rest = [asyncio.ensure_future(submit(batcher, x, timeout_s=5)) for x in "bcd"]
    await settle()
    assert send.batches == [["a"]]  # b, c, d wait behind the call in flight
    send.gate.set()
    assert [await first, *[await t for t in rest]] == ["A", "B", "C", "D"]
    assert send.batches == [["a"], ["b", "c", "d"]]
    assert dict(batcher.sizes) == {1: 1, 3: 1}


async def test_batches_respect_max_batch_size_and_slots():
    send = Recorder()
    batcher = Batcher(send, max_batch_size=2, max_concurrent=2)
    tasks = [asyncio.ensure_future(submit(batcher, x, timeout_s=5)) for x in "abcde"]
    await settle()
    assert send.batches == [["a"], ["b"]]  # a free slot sends at once; c, d and e wait for one
    send.gate.set()
    assert [await t for t in tasks] == list("ABCDE")
    assert send.batches[2:] == [["c", "d"], ["e"]]  # at most two a call


async def test_each_request_keeps_its_own_deadline_and_the_call_goes_on_for_the_others():
    send = Recorder()
    batcher = Batcher(send, max_batch_size=8, max_concurrent=1)
    blocker = asyncio.ensure_future(submit(batcher, "a", timeout_s=5))
    await settle()
    short = asyncio.ensure_future(submit(batcher, "b", timeout_s=0.01))
    long = asyncio.ensure_future(submit(batcher, "c", timeout_s=5))
    with pytest.raises(TimeoutError):
        await short
    send.gate.set()
    assert (await blocker, await long) == ("A", "C")
    assert ["b"] not in send.batches and ["b", "c"] not in send.batches  # b left the queue when it gave up
    assert send.cancelled == 0


async def test_a_call_nobody_waits_for_any_more_is_cancelled():
    send = Recorder()
    batcher = Batcher(send, max_batch_size=8, max_concurrent=1)
    task = asyncio.ensure_future(submit(batcher, "a", timeout_s=5))
    await settle()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await settle()
    assert send.cancelled == 1 and batcher.in_flight == 0


async def test_an_error_reaches_every_request_of_the_call():
    async def broken(items, deadline):
        raise RetrieverFailed("index gone")

    batcher = Batcher(broken, max_batch_size=8)
    results = await asyncio.gather(*(submit(batcher, x, timeout_s=5) for x in "ab"), return_exceptions=True)
    assert [str(r) for r in results] == ["index gone", "index gone"]


# -- lanes -----------------------------------------------------------------------------------------
@pytest.fixture
def retriever(docs):
    return SyntheticRetriever(name="r", documents=docs)


def lane(handles, **kw) -> RetrieverLane:
    return RetrieverLane("r", handles, top_k=3, timeout_ms=5000, filter_keys=["domain"], **kw)


async def test_concurrent_requests_make_one_call_to_the_retriever_with_their_own_queries(retriever):
    gated = GatedRetriever(retriever)
    handle = FakeHandle(gated)
    r = lane([handle], batcher_options={"max_batch_size": 8, "max_concurrent": 1})
    first = asyncio.ensure_future(search(r, "aspirin", top_k=1))
    await settle()
    others = [
        asyncio.ensure_future(search(r, "metformin diabetes", top_k=5, filters={"domain": "metabolism", "x": "y"})),
        asyncio.ensure_future(search(r, "p53 cancers", top_k=2)),
    ]
    await settle()
    gated.gate.set()
    outcomes = [await first, *[await t for t in others]]
    assert [len(c[1][0]) for c in handle.calls] == [1, 2]  # the two late requests shared one call
    second = handle.calls[1][1][0]
    assert [(q.text, q.top_k, q.filters) for q in second] == [
        ("metformin diabetes", 5, {"domain": "metabolism"}),  # top_k: the larger of the lane's and the request's
        ("p53 cancers", 3, None),  # filters: only the keys this retriever filters on
    ]
    assert [o.status for o in outcomes] == ["ok"] * 3
    assert outcomes[0].value[0].doc_id == "d3" and [h.doc_id for h in outcomes[1].value] == ["d2"]


async def test_one_encoding_serves_every_lane_of_the_model(retriever, embedder):
    encoder = FakeHandle(FakeEncoder(embedder))
    enc = EncoderLane("default", encoder, max_batch_size=8, max_concurrent=1)
    handles = [FakeHandle(retriever), FakeHandle(retriever)]
    lanes = [RetrieverLane(f"r{i}", [h], top_k=3, timeout_ms=5000, encoder=enc) for i, h in enumerate(handles)]
    vector = asyncio.ensure_future(enc.encode_many(["aspirin cancer"], timeout_s=5))
    outcomes = await asyncio.gather(*(search(x, "aspirin cancer", top_k=3, vectors=vector) for x in lanes))
    assert [o.status for o in outcomes] == ["ok", "ok"]
    assert [name for name, _ in encoder.calls] == ["encode"]  # once, for both lanes
    sent = [h.calls[0][1][0][0].vector for h in handles]
    assert sent[0] is sent[1] and sent[0].shape == (embedder.dim,)


async def test_an_encoder_failure_is_the_dense_lanes_error_and_the_graph_lane_goes_on(retriever, embedder):
    fake = FakeEncoder(embedder)
    fake.fail = RuntimeError("replica died")
    enc = EncoderLane("default", FakeHandle(fake), max_batch_size=8, max_concurrent=1)
    dense = RetrieverLane("dense", [FakeHandle(retriever)], top_k=3, timeout_ms=5000, encoder=enc)
    graph_handle = FakeHandle(retriever)
    graph = RetrieverLane("graph", [graph_handle], top_k=3, timeout_ms=5000, encoder=enc, vector_optional=True)
    vector = asyncio.ensure_future(enc.encode_many(["aspirin"], timeout_s=5))
    d, g = await asyncio.gather(*(search(x, "aspirin", top_k=3, vectors=vector)
                                  for x in (dense, graph)))
    assert d.status == "error" and d.error == "RetrieverFailed: encoder for default: RuntimeError: replica died"
    assert g.status == "ok" and g.error.startswith("linked entities by name only: encoder for default")
    assert graph_handle.calls[0][1][0][0].vector is None


async def test_a_slow_encoder_times_the_dense_lane_out_naming_the_encoder(retriever, embedder):
    class Hanging:
        async def encode(self, texts):
            await asyncio.Event().wait()

    enc = EncoderLane("default", FakeHandle(Hanging()), max_batch_size=8, max_concurrent=1)
    dense = RetrieverLane("dense", [FakeHandle(retriever)], top_k=3, timeout_ms=30, encoder=enc)
    vector = asyncio.ensure_future(enc.encode_many(["aspirin"], timeout_s=0.03))
    outcome = await search(dense, "aspirin", top_k=3, vectors=vector)
    assert outcome.status == "timeout" and outcome.error == "no answer within 30 ms (waiting for the encoder)"
    with pytest.raises(TimeoutError):
        await vector


async def test_shards_are_merged_per_query_and_a_failed_shard_lowers_coverage(docs):
    class Broken:
        async def search(self, queries):
            raise RetrieverFailed("shard index corrupt")

    halves = [SyntheticRetriever(name="h0", documents=docs[:3]), SyntheticRetriever(name="h1", documents=docs[3:])]
    whole = lane([FakeHandle(h) for h in halves])
    outcome = await search(whole, "risk of cancers", top_k=3)
    assert outcome.status == "ok" and outcome.coverage == 1.0
    unsharded = SyntheticRetriever(name="all", documents=docs).search([Query("risk of cancers", top_k=3)])[0]
    assert [h.doc_id for h in outcome.value] == [h.doc_id for h in unsharded] and len(unsharded) == 3
    assert {h.doc_id for h in outcome.value} & {d.doc_id for d in docs[3:]}  # both halves contributed
    degraded = lane([FakeHandle(halves[0]), FakeHandle(Broken())])
    outcome = await search(degraded, "cancer risk", top_k=3)
    assert outcome.status == "ok" and outcome.coverage == 0.5
    assert outcome.error == "shard 1: error: RetrieverFailed: shard index corrupt"
    dead = lane([FakeHandle(Broken()), FakeHandle(Broken())])
    outcome = await search(dead, "cancer risk", top_k=3)
    assert outcome.status == "error" and outcome.coverage == 0.0


async def test_the_breaker_opens_and_then_skips_the_lane(docs):
    from serve_app.breaker import CircuitBreaker

    class Broken:
        async def search(self, queries):
            raise RetrieverFailed("down")

    r = lane([FakeHandle(Broken())], breaker=CircuitBreaker(failures=2, cooldown_s=60))
    statuses = [(await search(r, "x", top_k=1)).status for _ in range(3)]
    assert statuses == ["error", "error", "skipped"] and r.breaker.state == "open"
