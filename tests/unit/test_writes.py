"""Live writes without Ray: the log on disk, a retriever's delta and tombstones, and the hub that orders,
releases and merges writes."""

from __future__ import annotations

import asyncio
import json
import os

import numpy as np
import pytest

from actors.delta import LiveRetriever, encode_vector
from actors.dense import DenseRetriever
from actors.errors import ServiceUnavailable
from actors.keyword import KeywordRetriever
from actors.sources import PARENT
from actors.types import Document, Query
from actors.wal import LogReader, WriteLog, segments
from actors.writes import GATEWAY_STALE_S, WriteHub, read_pins
from tests.unit.fakes import HashingEmbedder

DOCS = [
    Document("a", "the heart pumps blood through arteries", {"topic": "cardio"}),
    Document("b", "insulin regulates glucose in the blood", {"topic": "endo"}),
    Document("c1", "vaccines train the immune system", {"topic": "immuno", PARENT: "c"}),
    Document("c2", "antibodies neutralise viruses", {"topic": "immuno", PARENT: "c"}),
]
EMBEDDER = HashingEmbedder()


def upsert(seq: int, doc_id: str, text: str, to=("d",), **metadata) -> dict:
    return {"seq": seq, "op": "upsert", "to": list(to), "id": doc_id, "text": text, "metadata": metadata,
            "vectors": {EMBEDDER.name: encode_vector(EMBEDDER.encode([text])[0])}}


def delete(seq: int, doc_id: str, to=("d",)) -> dict:
    return {"seq": seq, "op": "delete", "to": list(to), "id": doc_id}


def dense() -> LiveRetriever:
    return LiveRetriever(DenseRetriever.from_documents(name="d", documents=DOCS, embedder=EMBEDDER), deployment="d")


def keyword() -> LiveRetriever:
    return LiveRetriever(KeywordRetriever(name="d", documents=DOCS), deployment="d")


def ids(live: LiveRetriever, text: str, top_k: int = 10, **filters) -> list[str]:
    [hits] = live.search([Query(text, top_k=top_k, filters=filters or None)])
    return [h.doc_id for h in hits]


# -- the log ---------------------------------------------------------------------------------------------
def test_the_log_numbers_records_in_order_and_reads_them_back_after_any_seq(tmp_path):
    log = WriteLog(tmp_path)
    assert log.append([{"op": "delete", "to": ["d"], "id": "x"}, {"op": "delete", "to": ["d"], "id": "y"}]) == [1, 2]
    assert log.append([{"op": "delete", "to": ["d"], "id": "z"}]) == [3]
    assert [r["id"] for r in LogReader(tmp_path, after=1).read(upto=10)] == ["y", "z"]
    reader = LogReader(tmp_path, after=0)
    assert [r["seq"] for r in reader.read(upto=2)] == [1, 2]  # never past what it may apply
    log.append([{"op": "delete", "to": ["d"], "id": "w"}])
    assert [r["seq"] for r in reader.read(upto=10)] == [3, 4]  # read on from where it stopped


def test_a_torn_last_line_was_never_acknowledged_and_is_cut_off_when_the_log_reopens(tmp_path):
    log = WriteLog(tmp_path)
    log.append([{"op": "delete", "to": ["d"], "id": "x"}])
    with log.path.open("ab") as fh:
        fh.write(b'{"seq":2,"op":"del')  # a crash in the middle of an append
    reopened = WriteLog(tmp_path)
    assert reopened.end == 1
    assert reopened.append([{"op": "delete", "to": ["d"], "id": "y"}]) == [2]
    assert [r["id"] for r in LogReader(tmp_path, after=0).read(upto=5)] == ["x", "y"]


def test_an_append_that_cannot_reach_the_disk_raises_and_leaves_nothing(tmp_path):
    log = WriteLog(tmp_path / "log")
    log.append([{"op": "delete", "to": ["d"], "id": "x"}])
    os.rename(tmp_path / "log", tmp_path / "moved")
    (tmp_path / "log").write_text("not a directory")
    with pytest.raises(OSError):
        log.append([{"op": "delete", "to": ["d"], "id": "y"}])
    assert log.end == 1


def test_segments_go_only_once_every_record_in_them_is_merged(tmp_path):
    log = WriteLog(tmp_path)
    log.append([{"op": "delete", "to": ["d"], "id": str(i)} for i in range(3)])  # 1..3
    log.rotate()
    log.append([{"op": "delete", "to": ["d"], "id": "4"}])  # 4, in the second segment
    assert log.truncate(2) == 0  # seq 3 is not merged yet
    assert log.truncate(3) == 1
    assert [first for first, _ in segments(tmp_path)] == [4]
    # a reader starting from a version that holds less replays what is left: the rest was merged
    assert [r["seq"] for r in LogReader(tmp_path, after=0).read(upto=9)] == [4]
    log.rotate()  # a new, empty segment: a reader at the end of the log returns, with nothing more
    reader = LogReader(tmp_path, after=0)
    assert [r["seq"] for r in reader.read(upto=10**9)] == [4] and reader.read(upto=10**9) == []
    log.append([{"op": "delete", "to": ["d"], "id": "5"}])
    assert [r["seq"] for r in reader.read(upto=10**9)] == [5]


# -- a retriever's delta ------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [dense, keyword], ids=["dense", "keyword"])
def test_an_upsert_is_found_a_replaced_document_shows_its_new_text_and_a_delete_is_gone(make):
    live = make()
    live.apply([upsert(1, "n", "zebras migrate across the savanna")])
    assert ids(live, "zebras savanna", top_k=1) == ["n"]
    live.apply([upsert(2, "a", "lions hunt zebras at dawn")])  # `a` replaced: its old text is gone
    [hits] = live.search([Query("lions hunt", top_k=10)])
    assert [(h.doc_id, h.text) for h in hits if h.doc_id == "a"] == [("a", "lions hunt zebras at dawn")]
    assert "a" not in ids(live, "heart pumps blood arteries", top_k=2) or live.kind == "dense"
    live.apply([delete(3, "n"), delete(4, "b")])
    found = ids(live, "zebras savanna insulin glucose", top_k=10)
    assert "n" not in found and "b" not in found
    assert (live.applied, live.touched) == (4, 4)


@pytest.mark.parametrize("make", [dense, keyword], ids=["dense", "keyword"])
def test_a_write_to_a_parent_id_replaces_every_chunk_cut_from_it(make):
    live = make()
    live.apply([upsert(1, "c", "vaccines are a public health success")])
    [hits] = live.search([Query("vaccines immune antibodies viruses", top_k=10)])
    assert {"c1", "c2"}.isdisjoint(h.doc_id for h in hits) and "c" in [h.doc_id for h in hits]


def test_records_for_other_deployments_and_old_records_are_skipped():
    live = dense()
    live.apply([upsert(1, "x", "zebras", to=("other",)), upsert(2, "y", "zebras")])
    live.apply([upsert(2, "y", "something else entirely")])  # seq 2 again: already applied
    assert ids(live, "zebras", top_k=2)[0] == "y"
    assert (live.applied, live.touched) == (2, 2)


def test_catching_up_past_records_the_log_no_longer_holds_reaches_what_was_released(tmp_path):
    # A merge dropped records 1-2 from the log; a replica then opened a version that does not hold them
    # (a reload). It must still count them as passed, or it would ask the hub for them again forever.
    def unnumbered(doc_id: str) -> dict:  # the log numbers what it appends
        return {k: v for k, v in upsert(0, doc_id, "zebras").items() if k != "seq"}

    log = WriteLog(tmp_path)
    log.append([unnumbered("x"), unnumbered("y")])
    log.rotate()
    log.truncate(2)
    live = LiveRetriever(DenseRetriever.from_documents(name="d", documents=DOCS, embedder=EMBEDDER),
                         deployment="d", log_dir=tmp_path)
    assert live.catch_up(2) == 0 and live.applied == 2
    log.append([unnumbered("z")])  # seq 3
    assert live.catch_up(3) == 1 and live.applied == 3 and ids(live, "zebras", top_k=1) == ["z"]


def test_a_filter_sees_the_delta_and_skips_tombstones():
    live = dense()
    live.apply([upsert(1, "n", "blood pressure in the heart", topic="cardio"), delete(2, "a")])
    assert ids(live, "heart blood", topic="cardio") == ["n"]


def test_flat_with_tombstones_answers_what_a_flat_index_of_the_live_documents_answers():
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(40)]
    docs = [Document(f"d{i}", " ".join(rng.choice(words, 6))) for i in range(200)]
    live = LiveRetriever(DenseRetriever.from_documents(name="d", documents=docs, embedder=EMBEDDER), deployment="d")
    gone = [f"d{i}" for i in range(0, 200, 3)]
    live.apply([delete(i + 1, d) for i, d in enumerate(gone)])
    rest = [d for d in docs if d.doc_id not in set(gone)]
    fresh = DenseRetriever.from_documents(name="d", documents=rest, embedder=EMBEDDER)
    for q in ("w1 w2 w3", "w10 w20", "w39"):
        [mine], [theirs] = live.search([Query(q, top_k=10)]), fresh.search([Query(q, top_k=10)])
        assert not {h.doc_id for h in mine} & set(gone)
        # the same scores, hit for hit (equal scores may come in another order)
        assert [round(h.score, 5) for h in mine] == [round(h.score, 5) for h in theirs]


@pytest.mark.parametrize("make", [dense, keyword], ids=["dense", "keyword"])
def test_a_merged_version_holds_the_live_documents_and_the_seq_it_covers(make, tmp_path):
    live = make()
    live.apply([upsert(1, "n", "zebras migrate"), delete(2, "b"), upsert(3, "a", "lions hunt zebras")])
    manifest = live.save(tmp_path)
    assert manifest["log_seq"] == 3 and manifest["num_docs"] == 4  # a, c1, c2, n
    merged = (DenseRetriever.load(tmp_path, manifest, name="d", embedder=EMBEDDER) if live.kind == "dense"
              else KeywordRetriever.load(tmp_path, manifest, name="d"))
    assert sorted(d.doc_id for d in merged.documents) == ["a", "c1", "c2", "n"]
    assert ids(LiveRetriever(merged, deployment="d", base_seq=3), "zebras", top_k=2)[0] in {"n", "a"}


def test_keyword_delta_scores_a_document_about_as_the_base_scored_it():
    base = KeywordRetriever(name="d", documents=DOCS)
    [before] = base.search([Query("insulin glucose", top_k=1)])
    live = LiveRetriever(KeywordRetriever(name="d", documents=[d for d in DOCS if d.doc_id != "b"]), deployment="d")
    live.apply([upsert(1, "b", DOCS[1].text)])
    [after] = live.search([Query("insulin glucose", top_k=1)])
    assert after[0].doc_id == "b"
    assert after[0].score == pytest.approx(before[0].score, rel=0.35)


# -- the hub -------------------------------------------------------------------------------------------------
def records(*doc_ids: str, to=("d",)) -> list[dict]:
    return [{"op": "delete", "to": list(to), "id": i} for i in doc_ids]


def test_the_hub_acknowledges_in_order_and_a_restarted_hub_knows_the_log(tmp_path):
    async def main():
        hub = WriteHub(tmp_path, ["d", "e"])
        first = await hub.write(records("x", "y"))
        second = await hub.write(records("z", to=("e",)))
        assert first["seq"] == 2 and second["seq"] == 3 and second["touched"] == {"d": 2, "e": 3}
        again = WriteHub(tmp_path, ["d", "e"])
        assert again.log.end == 3 and again.touched == {"d": 2, "e": 3} and len(again.pending["d"]) == 2

    asyncio.run(main())


def test_a_write_the_log_cannot_take_is_a_503_and_appends_nothing(tmp_path):
    async def main():
        hub = WriteHub(tmp_path / "log", ["d"])
        await hub.write(records("x"))
        os.rename(tmp_path / "log", tmp_path / "moved")
        (tmp_path / "log").write_text("")
        with pytest.raises(ServiceUnavailable):
            await hub.write(records("y"))
        assert hub.log.end == 1 and hub.touched == {"d": 1}

    asyncio.run(main())


def test_replicas_apply_a_write_only_once_every_live_gateway_knows_it(tmp_path):
    async def main():
        hub = WriteHub(tmp_path, ["d"])
        await hub.follow_writes("gw1", knows=0)
        await hub.follow_writes("gw2", knows=0)
        await hub.write(records("x"))
        replica = asyncio.ensure_future(hub.follow_writes("r1", knows=0, deployment="d", wait_s=10))
        await asyncio.sleep(0.05)
        assert not replica.done()  # neither gateway has learnt seq 1
        assert (await hub.follow_writes("gw1", knows=0))["end"] == 1
        await hub.follow_writes("gw1", knows=1)
        await asyncio.sleep(0.05)
        assert not replica.done()  # gw2 still keys its cache by the seq before
        await hub.follow_writes("gw2", knows=1)
        assert (await asyncio.wait_for(replica, 1))["released"] == 1

    asyncio.run(main())


def test_a_gateway_that_stopped_calling_stops_holding_writes_back(tmp_path, monkeypatch):
    async def main():
        hub = WriteHub(tmp_path, ["d"])
        await hub.follow_writes("gw-dead", knows=0)
        await hub.write(records("x"))
        assert hub.released() == 0
        seen = hub.gateways["gw-dead"]
        hub.gateways["gw-dead"] = (seen[0], seen[1] - GATEWAY_STALE_S - 1)  # as if killed a while ago
        assert hub.released() == 1

    asyncio.run(main())


def test_wait_applied_returns_when_every_live_replica_has_the_write(tmp_path):
    async def live(deployment):
        return ["r1", "r2"]

    async def main():
        hub = WriteHub(tmp_path, ["d"], live=live)
        seq = (await hub.write(records("x")))["seq"]
        await hub.follow_writes("r1", knows=0, deployment="d")
        await hub.follow_writes("r2", knows=0, deployment="d")
        waiting = asyncio.ensure_future(hub.wait_applied(["d"], seq, timeout_s=10))
        await hub.follow_writes("r1", knows=seq, deployment="d")
        await asyncio.sleep(0.05)
        assert not waiting.done()
        await hub.follow_writes("r2", knows=seq, deployment="d")
        assert await asyncio.wait_for(waiting, 2) is True
        assert await hub.wait_applied(["d"], seq + 1, timeout_s=0.1) is False

    asyncio.run(main())


class MergingReplica:
    """What `hub.merge` reaches through a handle: one replica's merge, which writes a version."""

    def __init__(self, log_seq: int) -> None:
        self.log_seq = log_seq

    @property
    def merge(self):
        outer = self

        class Remote:
            async def remote(self):
                return {"version": f"merged-v{outer.log_seq}", "log_seq": outer.log_seq}

        return Remote()


def test_a_merge_pins_the_new_version_saves_the_pin_and_drops_the_merged_log(tmp_path):
    async def main():
        hub = WriteHub(tmp_path, ["d", "e"], max_docs=2, replica=lambda d: MergingReplica(hub.log.end))
        await hub.write(records("x", "y"))
        await hub.write(records("z", to=("e",)))
        assert hub.due() == ["d"]
        version = await hub.merge("d")
        assert hub.pins["d"] == version == "merged-v3" and hub.pending["d"] == []
        assert read_pins(tmp_path) == {"pins": {"d": "merged-v3"}, "base_seq": {"d": 3, "e": 0},
                                       "touched": {"d": 2, "e": 3}}
        assert hub.truncatable() == 0  # `e` has seq 3 pending: nothing goes yet
        await hub.merge("e")
        assert [first for first, _ in segments(tmp_path)] == [4]  # both hold everything: the old segment went
        restarted = WriteHub(tmp_path, ["d", "e"])
        assert restarted.pins == {"d": "merged-v3", "e": "merged-v3"} and restarted.due() == []

    asyncio.run(main())


def test_the_log_is_json_lines_a_person_can_read(tmp_path):
    log = WriteLog(tmp_path)
    log.append([{"op": "upsert", "to": ["d"], "id": "é", "text": "naïve café\u0007", "metadata": {}}])
    [line] = log.path.read_text(encoding="utf-8").splitlines()
    assert json.loads(line)["text"] == "naïve café\u0007"


# -- the gateway's side -----------------------------------------------------------------------------------
def write_app(tmp_path, *, enabled: bool = True):
    """A gateway over fake handles: two dense retrievers of one model (one sharded), a keyword one and a
    synthetic one, with the WriteHub itself behind a fake `versions` handle."""
    from pathlib import Path

    from serve_app.config import parse_config
    from serve_app.gateway import Gateway
    from serve_app.testing import FakeHandle
    from tests.unit.fakes import FakeEncoder

    data = {"data": "unused.jsonl", "timeout_ms": 2000}
    config = parse_config({
        "writes": {"enabled": enabled, "dir": str(tmp_path / "writes"), "max_documents": 3},
        "retrievers": [{"name": "one", "kind": "dense", **data}, {"name": "two", "kind": "dense", "shards": 2, **data},
                       {"name": "kw", "kind": "keyword", **data}, {"name": "syn", "kind": "synthetic", **data}],
    }, base_dir=Path("."))
    encoder = FakeEncoder(HashingEmbedder())
    hub = WriteHub(config.writes_dir / "log", ["one", "two-shard0", "two-shard1", "kw"]) if enabled else None
    gateway = Gateway(config, {r.name: [] for r in config.retrievers}, {"default": FakeHandle(encoder)},
                      versions=FakeHandle(hub) if hub else None)
    return gateway, encoder, hub


def logged(hub: WriteHub) -> list[dict]:
    return LogReader(hub.log_dir, after=0).read(upto=10**9)


def test_a_write_is_embedded_once_per_model_and_each_record_names_the_shard_that_owns_its_id(tmp_path):
    from actors.shards import shard_of

    gateway, encoder, hub = write_app(tmp_path)

    async def main():
        return await gateway.upsert({"documents": [{"id": "x", "text": "alpha beta"}, {"id": "y", "text": "gamma"}]})

    answer = asyncio.run(main())
    assert (answer.accepted, answer.sequence, answer.retrievers) == (2, 2, ["one", "two", "kw"])
    assert encoder.embedder.calls == [2]  # one call, for both dense retrievers of the model
    records = logged(hub)
    assert [r["to"] for r in records] == [["one", f"two-shard{shard_of(i, 2)}", "kw"] for i in ("x", "y")]
    assert all(len(r["vectors"]) == 1 for r in records)  # one model: one vector per document
    assert gateway.touched["one"] == 2 and gateway.lanes["one"].touched == {"one": 2}


@pytest.mark.parametrize(("body", "error"), [
    ({"documents": [{"id": "x", "text": "ok"}], "retrievers": ["nope"]}, "InvalidRequest"),
    ({"documents": [{"id": "x", "text": "ok"}], "retrievers": ["syn"]}, "Conflict"),
    ({"documents": [{"id": "x", "text": "ok"}, {"id": "y", "text": " \x00 "}]}, "InvalidRequest"),
    ({"documents": [{"id": "", "text": "ok"}]}, "InvalidRequest"),
    ({"documents": [{"id": str(i), "text": "ok"} for i in range(4)]}, "PayloadTooLarge"),
])
def test_a_bad_write_raises_before_anything_is_embedded_or_logged(tmp_path, body, error):
    gateway, encoder, hub = write_app(tmp_path)
    with pytest.raises(Exception) as caught:
        asyncio.run(gateway.upsert(body))
    assert type(caught.value).__name__ == error
    assert encoder.embedder.calls == [] and hub.log.end == 0


def test_an_app_with_writes_off_answers_409(tmp_path):
    from actors.errors import Conflict

    gateway, _, _ = write_app(tmp_path, enabled=False)
    with pytest.raises(Conflict, match="takes no writes"):
        asyncio.run(gateway.delete({"ids": ["x"]}))


def test_messy_text_is_written_with_its_control_characters_as_spaces(tmp_path):
    gateway, _, hub = write_app(tmp_path)
    asyncio.run(gateway.upsert({"documents": [{"id": "m", "text": "metformin\x07lowers\u0097glucose"}],
                                "retrievers": ["kw"]}))
    [record] = logged(hub)
    assert record["text"] == "metformin lowers glucose" and record["to"] == ["kw"]


# -- merges that are cut short ---------------------------------------------------------------------------
class DyingReplica:
    """A replica killed while it writes the merged version."""

    @property
    def merge(self):
        class Remote:
            async def remote(self):
                raise RuntimeError("the replica died")

        return Remote()


def test_a_merge_cut_short_changes_no_pin_and_drops_no_record(tmp_path):
    async def main():
        hub = WriteHub(tmp_path, ["d"], max_docs=1, replica=lambda d: DyingReplica())
        await hub.write(records("x", "y"))
        with pytest.raises(RuntimeError):
            await hub.merge("d")
        assert "d" not in hub.pins and len(hub.pending["d"]) == 2
        assert [r["id"] for r in LogReader(tmp_path, after=0).read(upto=10)] == ["x", "y"]
        # a hub that restarts then (or the next try) finds every record still pending
        again = WriteHub(tmp_path, ["d"], max_docs=1, replica=lambda d: MergingReplica(2))
        assert again.due() == ["d"]
        assert await again.merge("d") == "merged-v2" and again.pending["d"] == []

    asyncio.run(main())


# -- the CLI, before any service answers -----------------------------------------------------------------
def test_ragfan_upsert_says_what_is_wrong_without_a_traceback(tmp_path, capsys):
    from serve_app.cli import main

    assert main(["upsert", str(tmp_path / "missing.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err
    source = tmp_path / "docs.jsonl"
    source.write_text('{"_id": "a", "text": "fine"}\n{"_id": "b"}\n')
    assert main(["upsert", str(source)]) == 2
    assert "docs.jsonl:2" in capsys.readouterr().err  # the line without text
    source.write_text('{"_id": "a", "text": "fine"}\n')
    assert main(["upsert", str(source), "--batch", "0"]) == 2
    assert main(["upsert", str(source), "--url", "http://127.0.0.1:9"]) == 1
    assert "cannot reach ragfan" in capsys.readouterr().err
    assert main(["delete", "a", "--url", "http://127.0.0.1:9"]) == 1
