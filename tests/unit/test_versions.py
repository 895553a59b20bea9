"""Versions without Ray: naming them on disk, the VersionHub's pins and long calls, the Reloader's steps on
fake handles, and a lane that stops serving cached answers of a version once the pin moves."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import pytest

from actors.errors import Conflict, DataError, NotFound
from actors.index import IN_USE, IN_USE_TTL_S, mark_in_use, swap_in
from actors.spec import KeywordOptions, RetrieverSpec, SyntheticOptions
from actors.synthetic import SyntheticRetriever
from actors.types import Searched
from actors.versions import VersionHub, version_dir, version_now
from serve_app.cache import MemoryCache
from serve_app.lanes import Ask, RetrieverLane
from serve_app.reload import Reloader, gateway_member
from tests.unit.fakes import FakeHandle


# -- naming versions --------------------------------------------------------------------------------
def build(text: str):
    def write(directory: Path) -> dict:
        (directory / "docs.txt").write_text(text)
        return {"kind": "keyword", "num_docs": 1}

    return write


def test_a_version_is_the_directory_the_link_points_to_and_stays_openable_after_the_link_moves(tmp_path):
    link = tmp_path / "keyword"
    spec = RetrieverSpec(name="k", options=KeywordOptions(), artifacts=link)
    first = swap_in(link, build=build("one"))
    v1 = version_now(spec)
    assert first.name == f".keyword.{v1}" and v1.startswith("v")
    swap_in(link, build=build("two"))
    v2 = version_now(spec)
    assert v2 != v1 and (version_dir(spec, v1) / "docs.txt").read_text() == "one"
    assert (version_dir(spec, v2) / "docs.txt").read_text() == "two"
    swap_in(link, build=build("three"))  # ingest keeps the current version and the one before
    with pytest.raises(DataError, match=f"version {v1} is gone"):
        version_dir(spec, v1)


def test_a_version_a_replica_marks_in_use_outlives_later_rebuilds_until_the_mark_is_stale(tmp_path):
    link = tmp_path / "keyword"
    spec = RetrieverSpec(name="k", options=KeywordOptions(), artifacts=link)
    swap_in(link, build=build("served"))
    served = version_now(spec)
    mark_in_use(version_dir(spec, served))
    for text in ("two", "three", "four"):
        swap_in(link, build=build(text))
    assert (version_dir(spec, served) / "docs.txt").read_text() == "served"
    stale = time.time() - IN_USE_TTL_S - 1
    os.utime(version_dir(spec, served) / IN_USE, (stale, stale))
    swap_in(link, build=build("five"))
    with pytest.raises(DataError, match="is gone"):
        version_dir(spec, served)


def test_a_data_retriever_is_versioned_by_its_content_and_a_plain_directory_by_its_manifest(tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text(json.dumps({"id": "a", "text": "one"}) + "\n")
    spec = RetrieverSpec(name="s", options=SyntheticOptions(), data=data)
    before = version_now(spec)
    data.write_text(json.dumps({"id": "a", "text": "two"}) + "\n")
    assert before.startswith("data-") and version_now(spec) != before
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "manifest.json").write_text("{}")
    spec = RetrieverSpec(name="k", options=KeywordOptions(), artifacts=plain)
    assert version_now(spec).startswith("dir-") and version_dir(spec, version_now(spec)) == plain
    os.remove(plain / "manifest.json")
    with pytest.raises(DataError, match="ragfan ingest"):
        version_now(spec)


# -- the hub ----------------------------------------------------------------------------------------
async def test_the_first_replica_to_report_pins_its_version_and_a_later_one_is_told_it():
    hub = VersionHub()
    assert await hub.sync("r1", {"kw": "v1"}) == {"kw": "v1"}
    assert await hub.sync("r2", {"kw": None}) == {"kw": "v1"}  # a replica starting: open v1
    assert hub.state(["kw"])["kw"]["members"]["r1"]["serving"] == "v1"


async def test_a_waiting_member_wakes_when_the_pin_moves_and_not_before():
    hub = VersionHub()
    await hub.sync("r1", {"kw": "v1"})
    waiting = asyncio.ensure_future(hub.sync("r1", {"kw": "v1"}, wait_s=30))
    await asyncio.sleep(0)
    assert not waiting.done()
    assert hub.pin("kw", "v2") == "v1"
    assert await waiting == {"kw": "v2"}
    # Nothing moved: the call ends after wait_s with the same pin.
    assert await hub.sync("r1", {"kw": "v2"}, wait_s=0.01) == {"kw": "v2"}


async def test_a_member_that_could_not_open_the_pin_says_so_and_is_not_woken_for_it_again():
    hub = VersionHub()
    hub.pin("kw", "v2")
    got = await hub.sync("r1", {"kw": "v1"}, known={"kw": "v2"}, failed={"kw": ("v2", "checksum mismatch")},
                         wait_s=0.01)
    assert got == {"kw": "v2"}
    member = hub.state(["kw"])["kw"]["members"]["r1"]
    assert member == {"serving": "v1", "failed": "v2", "error": "checksum mismatch", "told": "v2"}


# -- the reloader, on fake handles ------------------------------------------------------------------
class Replica:
    """A retriever replica stand-in that follows the hub as RetrieverDeployment does, when the test lets it."""

    def __init__(self, hub: FakeHandle, name: str, member: str, version: str, link: list[str]) -> None:
        self.hub, self.name, self.member, self.version, self.link = hub, name, member, version, link
        self.refuse: str | None = None  # a reason to refuse every new version
        self.searches = SyntheticRetriever(name=name, documents=[])

    async def follow_once(self) -> None:
        pins = await self.hub.sync.remote(self.member, {self.name: self.version}, wait_s=0)
        pin = pins[self.name]
        if pin != self.version:
            if self.refuse:
                await self.hub.sync.remote(self.member, {self.name: self.version}, known={self.name: pin},
                                           failed={self.name: (pin, self.refuse)})
            else:
                self.version = pin
                await self.hub.sync.remote(self.member, {self.name: pin})

    async def check_version(self):
        if self.link[0] == "broken":
            raise Conflict(f"{self.name}: the new version is refused: docs.txt: missing or corrupt (checksum mismatch)")
        return {"version": self.link[0], "model": None, "dim": None}

    async def search(self, queries):
        return Searched([[] for _ in queries], self.version)

    def describe(self):
        return {"fingerprint": f"fp-{self.version}", "version": self.version}


@pytest.fixture
def reloading():
    hub = FakeHandle(VersionHub())
    link = ["v1"]
    replicas = [Replica(hub, "kw", f"r{i}", "v1", link) for i in range(2)]
    lane = RetrieverLane("kw", [FakeHandle(replicas[0])], top_k=5, timeout_ms=1000)
    reloader = Reloader({"kw": lane, "quick": lane}, {"kw": "keyword", "quick": "synthetic"}, hub)
    return hub, link, replicas, lane, reloader


async def follow(hub: FakeHandle, lane: RetrieverLane) -> None:
    """What a gateway replica does when the hub answers its long call."""
    pins = await hub.sync.remote(gateway_member("g1"), {d: lane.pins.get(d) for d in lane.deployments}, wait_s=0)
    lane.follow(pins)
    await hub.sync.remote(gateway_member("g1"), {d: lane.pins.get(d) for d in lane.deployments})


async def test_a_reload_pins_the_checked_version_and_answers_only_once_every_replica_and_gateway_serves_it(
        reloading):
    hub, link, replicas, lane, reloader = reloading
    for r in replicas:
        await r.follow_once()
    await follow(hub, lane)
    link[0] = "v2"
    reload = asyncio.ensure_future(reloader.reload("kw"))
    await asyncio.sleep(0.1)
    assert not reload.done() and hub.target.pins["kw"] == "v2"
    await replicas[0].follow_once()
    await asyncio.sleep(0.1)
    assert not reload.done()  # r1 and the gateway still on v1
    await replicas[1].follow_once()
    await asyncio.sleep(0.1)
    assert not reload.done()  # the gateway still follows v1
    await follow(hub, lane)
    answer = await asyncio.wait_for(reload, 5)
    assert (answer.name, answer.version_before, answer.version) == ("kw", "v1", "v2")
    assert {(r.replica, r.version) for r in answer.replicas} == {("r0", "v2"), ("r1", "v2")}


async def test_a_version_a_replica_refuses_is_unpinned_and_the_reload_is_a_conflict(reloading):
    hub, link, replicas, lane, reloader = reloading
    for r in replicas:
        await r.follow_once()
    link[0], replicas[1].refuse = "v2", "FileNotFoundError: index.faiss"
    reload = asyncio.ensure_future(reloader.reload("kw"))
    await asyncio.sleep(0.1)
    await replicas[1].follow_once()
    with pytest.raises(Conflict, match="r1 refused version v2: FileNotFoundError: index.faiss.*keeps serving v1"):
        await asyncio.wait_for(reload, 5)
    assert hub.target.pins["kw"] == "v1"


async def test_a_corrupt_version_an_unknown_name_and_a_synthetic_retriever_change_nothing(reloading):
    hub, link, replicas, lane, reloader = reloading
    await replicas[0].follow_once()
    link[0] = "broken"
    with pytest.raises(Conflict, match="checksum mismatch"):
        await reloader.reload("kw")
    assert hub.target.pins == {"kw": "v1"}
    with pytest.raises(NotFound, match="no retriever 'nope'; retrievers: kw"):
        await reloader.reload("nope")
    with pytest.raises(Conflict, match="synthetic"):
        await reloader.reload("quick")


# -- the result cache follows the version -----------------------------------------------------------
async def test_once_the_pin_moves_no_answer_of_the_old_version_is_read_or_written_in_the_cache(reloading):
    hub, link, replicas, _, _ = reloading
    lane = RetrieverLane("kw", [FakeHandle(replicas[0])], top_k=5, timeout_ms=1000, cache=MemoryCache())
    lane.follow({"kw": "v1"})
    ask = Ask("stem cells", 5)
    assert (await lane.search_many([ask]))[0].cache == "miss"
    hit = (await lane.search_many([ask]))[0]
    assert (hit.cache, hit.version) == ("hit", "v1")
    lane.follow({"kw": "v2"})  # a reload pinned v2; the replica still serves v1
    still_old = (await lane.search_many([ask]))[0]
    assert (still_old.cache, still_old.version) == ("off", "v1")  # searched, not read from nor written to the cache
    replicas[0].version = "v2"
    await asyncio.sleep(0.3)  # past FINGERPRINT_RETRY_S: the lane asks the replica again
    new = (await lane.search_many([ask]))[0]
    assert (new.cache, new.version) == ("miss", "v2")
    assert (await lane.search_many([ask]))[0].cache == "hit"


async def test_a_replica_still_starting_that_was_told_the_new_pin_is_not_waited_for_but_one_told_the_old_is(reloading):
    hub, link, replicas, lane, reloader = reloading
    await replicas[0].follow_once()
    await follow(hub, lane)
    await hub.sync.remote("early", {"kw": None})  # started before the reload: told v1, still opening it
    link[0] = "v2"
    reload = asyncio.ensure_future(reloader.reload("kw"))
    await asyncio.sleep(0.1)
    await replicas[0].follow_once()
    await follow(hub, lane)
    await hub.sync.remote("late", {"kw": None})  # started after the pin: told v2, opens v2
    await asyncio.sleep(0.1)
    assert not reload.done()  # "early" will come up on v1
    await hub.sync.remote("early", {"kw": "v1"}, known={"kw": "v1"})
    await asyncio.sleep(0.1)
    assert not reload.done()
    await hub.sync.remote("early", {"kw": "v2"})
    answer = await asyncio.wait_for(reload, 5)
    assert {(r.replica, r.version, r.opening) for r in answer.replicas} == {
        ("r0", "v2", False), ("early", "v2", False), ("late", None, True)}
