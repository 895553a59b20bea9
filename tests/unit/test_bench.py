"""The benchmark's own logic, on retrievers that answer at once (no Ray, no timing asserts)."""

import asyncio

import pytest

from actors.synthetic import SyntheticRetriever
from benchmarks.bench import closed_loop, format_table, percentile, targets
from benchmarks.systems import Sequential, ThreadPoolManager, compute_limit


@pytest.fixture
def retrievers(docs):
    return {n: SyntheticRetriever(name=n, documents=docs) for n in ("a", "b")}


def test_percentile_is_nearest_rank():
    values = list(range(1, 101))
    assert (percentile(values, 50), percentile(values, 99), percentile([7.0], 95)) == (51, 99, 7.0)


def test_in_process_systems_answer_the_same(retrievers):
    sequential = Sequential(retrievers).search("aspirin cancer")
    threadpool = ThreadPoolManager(retrievers)
    pooled = asyncio.run(threadpool.search("aspirin cancer"))
    threadpool.close()
    assert [h.doc_id for h in sequential] == [h.doc_id for h in pooled] and sequential[0].doc_id == "d3"
    assert compute_limit(retrievers, ["aspirin", "metformin", "p53"], batch=2)[0] == 3


def test_closed_loop_keeps_every_client_busy():
    calls = []

    async def call(q):
        calls.append(q)
        await asyncio.sleep(0)

    latencies, elapsed = asyncio.run(closed_loop(call, ["x", "y"], concurrency=4, duration_s=0.05))
    assert len(latencies) == len(calls) > 4 and elapsed > 0
    assert set(calls) == {"x", "y"}


def run(system, c, p50, qps, p99=None):
    return {"system": system, "concurrency": c, "requests": 10, "p50_ms": p50, "p95_ms": p50,
            "p99_ms": p99 or p50, "qps": qps, "cpu_s_per_query": 0.01, "peak_rss_mb": 100}


def test_targets_are_ratios_from_the_same_report():
    seed = {"profile": "seed", "runs": [run("sequential", 1, 860, 1.1), run("ragfan-handle", 1, 310, 3.2),
                                        run("threadpool", 64, 9000, 4.6), run("ragfan-handle", 64, 900, 50)]}
    lines = targets(seed)
    assert "[met] c=1 p50 <= 315 ms: 310 ms" in lines[1]
    assert "[met] c=1 speedup over sequential >= 2.7x: 2.77x" in lines[2]
    assert "[met] c=64 QPS >= 10x threadpool: 10.9x" in lines[3]
    real = {"dataset": "d", "runs": [run("single:dense", 1, 20, 50), run("single:keyword", 1, 5, 150),
                                     run("ragfan-handle", 1, 35, 28), run("ragfan-handle", 32, 100, 90, p99=400),
                                     run("threadpool", 32, 300, 80), run("compute-limit", 256, None, 120),
                                     run("ragfan-handle-batch1", 32, 300, 45)]}
    text = format_table(real)
    assert "[MISSED] c=1 p50 <= slowest single p50 + 10 ms: 35 ms vs 20 ms" in text
    assert "[MISSED] c=32 QPS >= 1.5x threadpool: 1.12x" in text
    assert "[met] c=32 QPS >= 50% of compute-limit: 75%" in text
    assert "[MISSED] c=32 p99 <= 3x p50: 4.00x" in text
    assert "dynamic batching at c=32: 2.00x the QPS of batch size 1" in text
