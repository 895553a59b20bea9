"""The benchmark's own logic, on retrievers that answer at once (no Ray, no timing asserts)."""

import asyncio
import types
from dataclasses import asdict

import pytest

import benchmarks.bench as bench_module
from actors.dense import DenseRetriever
from actors.keyword import KeywordRetriever
from actors.synthetic import SyntheticRetriever
from benchmarks.bench import (
    ServedProbe,
    batch_sizes_between,
    closed_loop,
    compact_histogram,
    demo_queries,
    format_table,
    mean_batch_size,
    percentile,
    served_config,
    targets,
)
from benchmarks.profile import parse_raw, summarise, to_markdown
from benchmarks.resources import busiest, cpu_seconds_by_role, role_of
from benchmarks.systems import TOP_K, ComputeLimitRun, Sequential, ThreadPoolManager, compute_limit
from tests.unit.fakes import HashingEmbedder


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


def test_compute_limit_encodes_each_chunk_once_per_model(docs):
    shared, other = HashingEmbedder(), HashingEmbedder(name="other")
    retrievers = {
        "corpus": DenseRetriever.from_documents(name="corpus", documents=docs, embedder=shared),
        "domain": DenseRetriever.from_documents(name="domain", documents=docs, embedder=shared),
        "persona": DenseRetriever.from_documents(name="persona", documents=docs, embedder=other),
        "keyword": KeywordRetriever(name="keyword", documents=docs),
    }
    shared.calls.clear()
    other.calls.clear()
    assert compute_limit(retrievers, ["aspirin", "metformin", "p53", "cancer", "insulin"], batch=2)[0] == 5
    # One encode per chunk of 2, 2 and 1 queries for each model: not one per retriever.
    assert shared.calls == [2, 2, 1]
    assert other.calls == [2, 2, 1]


def test_compute_limit_encodes_with_the_encoders_it_is_given_and_searches_the_same(docs):
    own, twin = HashingEmbedder(), HashingEmbedder(name="twin")
    retrievers = {
        "dense": DenseRetriever.from_documents(name="dense", documents=docs, embedder=own),
        "dense2": DenseRetriever.from_documents(name="dense2", documents=docs, embedder=own),
        "keyword": KeywordRetriever(name="keyword", documents=docs),
    }
    own.calls.clear()
    done = compute_limit(retrievers, ["aspirin", "metformin", "p53"], batch=2, encoders={id(own): twin})
    assert (done.queries, own.calls, twin.calls) == (3, [], [2, 1])  # only the encoder object changed
    assert 0 <= done.encode_seconds <= done.seconds


class Bar:
    def set_description(self, text):
        self.description = text


def test_compute_limit_run_keeps_the_faster_backend_and_says_what_each_measured(docs, monkeypatch):
    own = HashingEmbedder()
    retrievers = {"dense": DenseRetriever.from_documents(name="dense", documents=docs, embedder=own)}
    twin = HashingEmbedder(name="onnx twin")
    monkeypatch.setattr(bench_module, "onnx_encoders", lambda rs: {id(own): twin})

    def fake_limit(retrievers, queries, *, encoders):  # canned times: onnx takes 2 s, torch 4 s
        return ComputeLimitRun(len(queries), 2.0 if encoders else 4.0, 0.5 if encoders else 2.5)

    monkeypatch.setattr(bench_module, "compute_limit", fake_limit)
    kept = bench_module.compute_limit_run(retrievers, ["aspirin", "p53"], Bar())
    assert twin.calls == [32]  # warmed before its timed run, as the torch model was by the earlier runs
    assert (kept["system"], kept["concurrency"], kept["qps"], kept["p50_ms"]) == ("compute-limit", 256, 128.0, None)
    assert kept["encoder_backend"] == "onnx" and kept["encode_ms_per_query"] == 1.95
    assert kept["encoder_backends"] == {"torch": {"qps": 64.0, "encode_ms_per_query": 9.77},
                                        "onnx": {"qps": 128.0, "encode_ms_per_query": 1.95}}


def test_compute_limit_run_has_no_backend_where_nothing_encodes(retrievers, monkeypatch):
    monkeypatch.setattr(bench_module, "onnx_encoders", lambda rs: pytest.fail("nothing to export"))
    kept = bench_module.compute_limit_run(retrievers, ["aspirin"], Bar())
    assert kept["encoder_backend"] is None and kept["requests"] == 256


def test_served_retrievers_contribute_the_same_top_k_as_in_process(tmp_path):
    for profile in ("seed", "dataset", "demo"):
        assert {r.top_k for r in served_config(profile, tmp_path, batch=32).retrievers} == {TOP_K}
    demo = served_config("demo", None, batch=32)
    assert demo.app_name == "ragfan-bench"
    assert demo.names == ["corpus", "keyword", "graph", "persona", "domain"]
    assert all(r.timeout_ms == 30_000 and r.data.is_file() for r in demo.retrievers)
    assert demo.retriever("graph").aliases.is_file()


def test_demo_queries_are_the_claims_of_the_bundled_question_set():
    queries = demo_queries()
    assert len(queries) == 150
    assert queries[0] == "0-dimensional biomaterials show inductive properties."


def test_closed_loop_keeps_every_client_busy(monkeypatch):
    """On a fake clock that only the calls move (10 ms each), the run's figures are exact."""
    clock = types.SimpleNamespace(now=100.0)
    monkeypatch.setattr(bench_module, "time", types.SimpleNamespace(perf_counter=lambda: clock.now))
    calls, in_flight, most = [], 0, 0

    async def call(q):
        nonlocal in_flight, most
        calls.append(q)
        in_flight += 1
        most = max(most, in_flight)
        clock.now += 0.010
        await asyncio.sleep(0)
        in_flight -= 1

    latencies, elapsed = asyncio.run(closed_loop(call, ["x", "y"], concurrency=4, duration_s=0.05))
    assert most == 4  # four clients with a call out at once, never more: a closed loop
    assert len(latencies) == len(calls) > 4 and set(calls) == {"x", "y"}
    # No client starts a call after the duration, and the run lasts until the last call ends.
    assert elapsed == pytest.approx(0.010 * len(calls)) and 0.05 <= elapsed < 0.05 + 4 * 0.010
    # A latency (ms) spans the client's call and the three others' that ran meanwhile, and no client
    # idles between calls: client i starts at i * 10 ms and is busy from then to the end.
    assert max(latencies) == pytest.approx(40.0)
    assert sum(latencies) == pytest.approx(sum(1000 * elapsed - 10 * i for i in range(4)))


# -- who pays: roles, CPU by role, batch sizes -----------------------------------------------------
@pytest.mark.parametrize(("title", "role"), [
    ("ray::ServeReplica:ragfan-bench:gateway", "gateway"),
    ("ray::ServeReplica:ragfan-bench:dense.handle_request_with_rejection", "dense"),
    ("ray::ServeReplica:ragfan-bench:corpus-shard0" + " " * 40, "corpus-shard0"),
    ("ray::ServeReplica:ragfan-bench:keyword ray::ServeReplica:ragfan-bench:keyword", "keyword"),
    ("ray::ServeReplica:app:e5-v1.5", "e5-v1.5"),
    ("ray::ProxyActor ray::ProxyActor", "proxy"),
    ("ray::ServeController.listen_for_change", "controller"),
    ("py-spy /venv/bin/py-spy record --pid 42", "py-spy"),
    ("raylet /venv/lib/ray/core/src/ray/raylet/raylet --raylet_socket_name=x", "ray"),
    ("ray::IDLE", "ray"),
    ("ray::DashboardAgent", "ray"),
])
def test_a_process_role_comes_from_its_title(title, role):
    assert role_of(title) == role


def test_cpu_by_role_counts_each_process_from_its_own_start():
    before = {1: ("driver", 10.0), 2: ("dense", 2.0), 3: ("dense", 5.0), 4: ("ray", 1.0)}
    # 3 exited (its last seconds are lost), 5 started (all of its time counts), 4 was idle
    after = {1: ("driver", 10.5), 2: ("dense", 2.5), 4: ("ray", 1.0), 5: ("dense", 0.25)}
    assert cpu_seconds_by_role(before, after) == {"dense": 0.75, "driver": 0.5, "ray": 0.0}
    assert busiest(before) == {"dense": 3, "driver": 1, "ray": 4}


def test_batch_sizes_are_the_difference_between_two_stats_answers():
    before = {"batches": {"dense": {1: 5, 4: 2}, "encoder:default": {8: 1}}}
    after = {"batches": {"dense": {1: 7, 4: 2, 8: 3}, "encoder:default": {8: 1}, "keyword": {2: 4}}}
    sizes = batch_sizes_between(before, after)
    assert sizes == {"dense": {1: 2, 8: 3}, "keyword": {2: 4}}
    assert mean_batch_size(sizes["dense"]) == 5.2
    assert compact_histogram({1: 2, 2: 1, 3: 4, 8: 3, 32: 1}) == "1:2 2-3:5 8-15:3 32-63:1"


class FakeGateway:
    """The app handle's `stats.remote()` surface, answering from a list (an exception is raised)."""

    def __init__(self, answers):
        self.answers = list(answers)
        self.calls = 0

    @property
    def stats(self):
        return self

    def remote(self):
        self.calls += 1
        answer = self.answers.pop(0)

        async def respond():
            if isinstance(answer, Exception):
                raise answer
            return answer

        return respond()


async def test_probe_records_cpu_by_role_and_the_batches_that_formed():
    probe = ServedProbe(FakeGateway([{"batches": {"dense": {4: 1}}}, {"batches": {"dense": {4: 3, 2: 1}}}]))
    await probe.start()
    recorded = await probe.stop(requests=10)
    assert "driver" in recorded["cpu_ms_per_query_by_role"]
    assert recorded["batch_sizes"] == {"dense": {2: 1, 4: 2}}
    assert recorded["batch_size_mean"] == {"dense": 3.33}


async def test_probe_asks_a_gateway_without_stats_once_and_goes_on():
    gateway = FakeGateway([AttributeError("no stats")])
    probe = ServedProbe(gateway)
    for _ in range(2):
        await probe.start()
        recorded = await probe.stop(requests=10)
        assert "batch_sizes" not in recorded and "driver" in recorded["cpu_ms_per_query_by_role"]
    assert gateway.calls == 1


# -- py-spy summaries ------------------------------------------------------------------------------
RAW = """\
<module> (replica.py:1);run (asyncio/base_events.py:600);encode (sentence_transformers/SentenceTransformer.py:512) 5
<module> (replica.py:1);run (asyncio/base_events.py:600);encode (sentence_transformers/SentenceTransformer.py:530) 1
<module> (replica.py:1);run (asyncio/base_events.py:600);dumps (ray/_private/serialization.py:80) 3
<module> (replica.py:1);run (asyncio/base_events.py:610) 1
py-spy> a line that is not a stack
"""


def test_collapsed_stacks_summarise_into_leaf_frames_and_groups():
    stacks = parse_raw(RAW)
    assert sum(stacks.values()) == 10
    profile = summarise(stacks, pid=7, top=2)
    assert profile.samples == 10 and profile.pid == 7
    # line numbers merged: the two encode lines are one leaf with 6 of 10 samples
    assert profile.leaf == [("encode (sentence_transformers/SentenceTransformer.py)", 60.0),
                            ("dumps (ray/_private/serialization.py)", 30.0)]
    assert profile.inclusive == [("query encoding (sentence-transformers, torch)", 60.0),
                                 ("serialisation (pickle, Ray's serializer, msgpack)", 30.0)]


def test_py_spy_summary_is_markdown_per_role():
    report = {"run": "ragfan-handle c=32", "seconds": 10, "rate": 50, "stacks_dir": "/tmp/x",
              "roles": {"dense": asdict(summarise(parse_raw(RAW), pid=7)),
                        "proxy": {"pid": 8, "samples": 0, "leaf": [], "inclusive": [], "error": "no such process"}}}
    text = to_markdown(report)
    assert text.startswith("## py-spy: ragfan-handle c=32, 10 s at 50 Hz")
    assert "### dense (pid 7, 10 samples)" in text
    assert "| 60.0 | `encode (sentence_transformers/SentenceTransformer.py)` |" in text
    assert "inclusive: query encoding (sentence-transformers, torch) 60%" in text
    assert "### proxy (pid 8, 0 samples)\n\nno samples: no such process" in text


# -- the report -------------------------------------------------------------------------------------
def run(system, c, p50, qps, p99=None, **extra):
    return {"system": system, "concurrency": c, "requests": 10, "p50_ms": p50, "p95_ms": p50,
            "p99_ms": p99 or p50, "qps": qps, "cpu_s_per_query": 0.01, "peak_rss_mb": 100, **extra}


def test_targets_say_when_none_was_measured():
    assert targets({"profile": "seed", "runs": [run("ragfan-handle", 8, 308, 3.2)]}) == [
        "targets: none measured at these concurrencies"]


def test_seed_targets_leave_out_compute_limit_which_only_sleeps_there():
    seed = {"profile": "seed", "runs": [
        run("ragfan-handle", 1, 308, 3.2), run("ragfan-http", 1, 309.5, 3.2), run("threadpool", 32, 9000, 4.6),
        run("ragfan-handle", 32, 320, 100), run("ragfan-http", 32, 330, 95), run("compute-limit", 256, None, 300),
        run("ragfan-batch", 4, 2000, 64)]}
    assert targets(seed) == [
        "targets:",
        "  [met] c=32 ragfan-handle QPS >= 2x threadpool (aim 3x): 21.74x (100 vs 4.6 QPS) (aim met)",
        "  [met] c=1 ragfan-http p50 <= ragfan-handle p50 + 3 ms (aim +1): 309.5 ms vs 308 ms, +1.5 ms (aim missed)",
        "  [met] c=32 ragfan-http QPS >= 0.9x ragfan-handle (aim 1.0x): 0.95x (95 vs 100 QPS) (aim missed)",
        "  [met] c=1 ragfan-handle p50 <= 310 ms (aim 305): 308 ms (aim missed)",
        "  [reported] c=32 ragfan-handle p99 vs p50: 1.00x",
    ]


def test_dataset_targets_are_issue_21s_ratios_from_the_same_report():
    real = {"dataset": "d", "runs": [
        run("threadpool", 1, 27, 37), run("ragfan-http", 1, 26, 22), run("single:dense", 1, 20, 50),
        run("single:keyword", 1, 5, 150), run("ragfan-handle", 1, 24, 28), run("ragfan-handle", 32, 100, 90, p99=400),
        run("threadpool", 32, 300, 40), run("ragfan-http", 32, 300, 70), run("compute-limit", 256, None, 120),
        run("ragfan-handle-batch1", 32, 300, 45)]}
    assert targets(real) == [
        "targets:",
        "  [met] c=32 ragfan-handle QPS >= 50% of compute-limit (aim 70%): 75% (90 vs 120 QPS) (aim met)",
        "  [met] c=32 ragfan-handle QPS >= 2x threadpool (aim 3x): 2.25x (90 vs 40 QPS) (aim missed)",
        "  [met] c=1 ragfan-http p50 <= ragfan-handle p50 + 3 ms (aim +1): 26 ms vs 24 ms, +2.0 ms (aim missed)",
        "  [MISSED] c=32 ragfan-http QPS >= 0.9x ragfan-handle (aim 1.0x): 0.78x (70 vs 90 QPS) (aim missed)",
        "  [reported] c=1 ragfan-handle p50 vs the slowest retriever alone: 24 ms vs 20 ms (single:dense), +4.0 ms",
        "  [reported] c=32 ragfan-handle p99 vs p50: 4.00x",
        "  dynamic batching at c=32: 2.00x the QPS of batch size 1",
    ]


def test_demo_targets_include_compute_limit_and_the_served_footprint():
    demo = {"profile": "demo", "rss_at_rest_mb": 3000, "rss_at_rest_mb_by_role": {"driver": 700, "dense": 2300},
            "runs": [run("threadpool", 32, 300, 20), run("ragfan-handle", 32, 200, 70),
                     run("compute-limit", 256, None, 90), run("ragfan-http", 1, 55, 18),
                     run("ragfan-handle", 1, 52, 19)]}
    assert targets(demo) == [
        "targets:",
        "  [met] c=32 ragfan-handle QPS >= 50% of compute-limit (aim 70%): 78% (70 vs 90 QPS) (aim met)",
        "  [met] c=32 ragfan-handle QPS >= 2x threadpool (aim 3x): 3.50x (70 vs 20 QPS) (aim met)",
        "  [met] c=1 ragfan-http p50 <= ragfan-handle p50 + 3 ms (aim +1): 55 ms vs 52 ms, +3.0 ms (aim missed)",
        "  [met] RSS at rest of the served app (tree less the bench driver) <= 2400 MB (aim 2000): 2,300 MB"
        " (driver 700 MB more) (aim missed)",
        "  [reported] c=32 ragfan-handle p99 vs p50: 1.00x",
    ]


def test_table_shows_cpu_by_role_batch_sizes_and_rss_at_rest():
    served = {"cpu_ms_per_query_by_role": {"driver": 1.5, "gateway": 2.25, "ray": 0.5},
              "batch_sizes": {"dense": {1: 2, 8: 3}}, "batch_size_mean": {"dense": 5.2}}
    report = {"dataset": "d", "rss_at_rest_mb": 2500, "rss_at_rest_mb_by_role": {"dense": 1500, "driver": 1000},
              "runs": [run("compute-limit", 256, None, 120, encoder_backend="onnx",
                           encoder_backends={"torch": {"qps": 100.0, "encode_ms_per_query": 3.5},
                                             "onnx": {"qps": 120.0, "encode_ms_per_query": 2.25}}),
                       run("ragfan-handle", 8, 50, 80, **served),
                       run("ragfan-handle", 32, 100, 90, **served),
                       run("ragfan-http", 32, 120, 70, cpu_ms_per_query_by_role={"proxy": 3.0}),
                       run("ragfan-handle-batch1", 64, 300, 45, cpu_ms_per_query_by_role={"proxy": 1.0})]}
    lines = format_table(report).splitlines()
    assert lines[1].split()[:6] == ["compute-limit", "256", "10", "-", "-", "-"]
    assert ("compute-limit encodes with onnx, the faster: torch 100.00 QPS (encoding 3.50 ms a query), "
            "onnx 120.00 QPS (encoding 2.25 ms a query)") in lines
    header = next(line for line in lines if line.startswith("CPU ms/query, c=32"))
    assert header.split()[-2:] == ["ragfan-handle", "ragfan-http"]
    assert next(line for line in lines if line.startswith("gateway")).split() == ["gateway", "2.25", "0.00"]
    assert next(line for line in lines if line.startswith("proxy")).split() == ["proxy", "0.00", "3.00"]
    assert next(line for line in lines if line.startswith("sum")).split() == ["sum", "4.25", "3.00"]
    assert lines.count("batch sizes, ragfan-handle c=8: lane, mean, batches by size") == 1
    assert "  dense                            5.20   1:2 8-15:3" in lines
    assert "RSS at rest after start: 2,500 MB (dense 1,500, driver 1,000)" in lines


# -- issue 12's rows (batch requests, the result cache) against issue 21's targets--------------------------------------
def test_batch_and_cache_targets_are_ratios_from_the_same_report():
    report = {"dataset": "d", "runs": [
        run("compute-limit", 256, None, 200), run("ragfan-batch", 4, 1000, 150), run("ragfan-batch-http", 4, 1000, 90),
        run("ragfan-cache-miss", 1, 40, 25) | {"cpu_s_per_query": 0.03},
        run("ragfan-cache-hit", 1, 3, 300) | {"cpu_s_per_query": 0.0015},
        run("ragfan-zipf-uncached", 32, 400, 80), run("ragfan-cached", 32, 90, 200)]}
    assert targets(report)[1:] == [
        "  [met] c=1 CPU per cache hit through the handle <= 2.0 ms (aim 1.0): 1.50 ms (a miss 30.00 ms) (aim missed)",
        "  [met] ragfan-batch (handle, c=4) QPS >= 70% of compute-limit (aim 85%): 75% (150 vs 200 QPS) (aim missed)",
        "  [MISSED] c=32 ragfan-cached QPS >= 3x ragfan-zipf-uncached (aim 4x): 2.50x (200 vs 80 QPS) (aim missed)",
        "  [reported] ragfan-batch over HTTP (c=4) QPS vs compute-limit: 45% (90 vs 200 QPS)",
    ]


def test_a_batch_run_is_counted_in_queries():
    counted = bench_module.per_query(run("ragfan-batch", 4, 1000, 3.0) | {"cpu_s_per_query": 0.32})
    assert (counted["requests"], counted["qps"], counted["cpu_s_per_query"]) == (320, 96.0, 0.01)
    assert counted["queries_per_request"] == 32


def test_the_zipf_stream_repeats_the_asked_share_popular_queries_most_and_is_reproducible():
    queries = [f"q{i}" for i in range(50)]
    stream = bench_module.zipf_stream(queries, repeat=0.8, length=5000)
    seen, repeats = set(), 0
    for q in stream:
        repeats += q in seen
        seen.add(q)
    assert 0.78 < repeats / len(stream) < 0.82  # 80% asked before, though the 50 queries ran out long ago
    assert stream.count("q0") > stream.count("q9") > 0  # earlier, more popular
    assert "q3 (2)" in seen  # new ones after the queries ran out: the same texts, a round number added
    assert stream == bench_module.zipf_stream(queries, repeat=0.8, length=5000)


async def test_closed_loop_once_asks_each_query_exactly_once():
    asked = []

    async def call(q):
        asked.append(q)
        await asyncio.sleep(0)

    latencies, _ = await closed_loop(call, ["a", "b", "c", "d", "e"], 3, 0.0, once=True)
    assert sorted(asked) == ["a", "b", "c", "d", "e"] and len(latencies) == 5


def test_served_rows_run_without_the_cache_and_the_cached_rows_with_it():
    assert served_config("demo", None, 32).cache is None  # every query searched, as in-process
    assert served_config("demo", None, 32, cache=True).cache.backend == "memory"
