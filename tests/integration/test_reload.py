"""Reloading a retriever in place, on the real app: `ragfan ingest` writes a new version, a reload rolls
it into every replica with no failed search, and replicas, answers and the result cache agree on it.

The `versioned` app serves artifacts that the tests re-ingest as they go: `keyword` (two replicas),
`dense` (one replica), `split` (dense, two shards) and `quick` (synthetic, nothing to reload). Its
API key is on. The tests run in file order and each says what version it expects to start from.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
import ray
from ray import serve

from serve_app.app import app_from_config
from serve_app.config import parse_config
from tests.integration.conftest import TINYBEIR, replica_actors, synthetic, wait_until

pytestmark = pytest.mark.integration
KEY = "reload-key-0123456789"
AUTH = {"authorization": f"Bearer {KEY}"}
NEW_WORD = "zyxwonderase"  # a word no document of tinybeir has, until a test adds it


def ingest(source: Path, out: Path, kinds: tuple[str, ...], **kw) -> None:
    from actors.ingest import ingest as run

    run(source, out, kinds=kinds, progress=False, **kw)


def corpus_with(tmp: Path, *extra: dict) -> Path:
    """tinybeir's corpus plus `extra` documents, as a new source file."""
    source = tmp / f"corpus-{len(list(tmp.glob('corpus-*')))}.jsonl"
    lines = (TINYBEIR / "corpus.jsonl").read_text().splitlines()
    source.write_text("\n".join([*lines, *(json.dumps(d) for d in extra)]) + "\n")
    return source


@pytest.fixture(scope="module")
def versioned(cluster, tmp_path_factory):
    """(base url, artifacts dir, scratch dir) of the versioned app."""
    out = tmp_path_factory.mktemp("versioned")
    scratch = tmp_path_factory.mktemp("sources")
    ingest(TINYBEIR / "corpus.jsonl", out, ("dense", "keyword"))
    ingest(TINYBEIR / "corpus.jsonl", out / "sharded", ("dense",), shards=2)
    small = {"ray_actor_options": {"num_cpus": 0.1}, "timeout_ms": 5000}
    config = parse_config(
        {
            "app_name": "versioned",
            "gateway": {"ray_actor_options": {"num_cpus": 0.1}},
            "retrievers": [
                {"name": "keyword", "kind": "keyword", "artifacts": str(out / "keyword"), "num_replicas": 2, **small},
                {"name": "dense", "kind": "dense", "artifacts": str(out / "dense"), **small},
                {"name": "split", "kind": "dense", "artifacts": str(out / "sharded" / "dense"), "shards": 2, **small},
                synthetic("quick"),
            ],
        },
        base_dir=Path("."),
    )
    serve.run(app_from_config(config, api_keys=[KEY]), name="versioned", route_prefix="/versioned")
    yield cluster + "/versioned", out, scratch
    serve.delete("versioned")


def search(http: httpx.Client, url: str, query: str, **body) -> dict:
    r = http.post(f"{url}/v1/search", json={"query": query, **body}, headers=AUTH)
    assert r.status_code == 200, r.text
    return r.json()


def reload(http: httpx.Client, url: str, name: str) -> httpx.Response:
    return http.post(f"{url}/v1/retrievers/{name}/reload", headers=AUTH)


def retriever_info(http: httpx.Client, url: str, name: str) -> dict:
    r = http.get(f"{url}/v1/retrievers", headers=AUTH)
    assert r.status_code == 200, r.text
    return next(i for i in r.json()["retrievers"] if i["name"] == name)


class Load:
    """Threads searching the app without pause until stopped; every answer is kept."""

    def __init__(self, url: str, threads: int = 3) -> None:
        self.url, self.answers, self.stop = url, [], threading.Event()
        self.switched = threading.Event()  # set by the test once the reload has returned
        self.after: list[dict] = []  # the answers of searches sent after that
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        with httpx.Client(timeout=60) as client:
            n = 0
            while not self.stop.is_set():
                n += 1  # a new query each time, so the cache does not answer for the retrievers
                after = self.switched.is_set()
                r = client.post(f"{self.url}/v1/search", headers=AUTH,
                                json={"query": f"stem cells and nanotechnology {threading.get_ident()} {n}"})
                self.answers.append((r.status_code, r.json()))
                if after:
                    self.after.append(r.json())

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)


def test_reload_refuses_an_unknown_retriever_a_synthetic_one_and_no_key(versioned, http):
    url, _, _ = versioned
    r = reload(http, url, "nope")
    assert r.status_code == 404 and "nope" in r.json()["detail"] and "keyword" in r.json()["detail"]
    r = reload(http, url, "quick")
    assert r.status_code == 409 and "synthetic" in r.json()["detail"]
    assert http.post(f"{url}/v1/retrievers/keyword/reload").status_code == 401


def test_every_replica_reports_the_version_it_serves_and_answers_name_it(versioned, http):
    url, out, _ = versioned
    info = retriever_info(http, url, "keyword")
    link = (out / "keyword").resolve().name
    assert info["version"] and link.endswith(info["version"])
    assert len(info["replicas"]) == 2 and {r["version"] for r in info["replicas"]} == {info["version"]}
    answer = search(http, url, "stem cells", cache=False)
    assert answer["retrievers"]["keyword"]["version"] == info["version"]
    split = search(http, url, "stem cells", cache=False)["retrievers"]["split"]["version"]
    assert split == retriever_info(http, url, "split")["version"] and len(split.split("|")) == 2


def test_a_reload_under_load_rolls_the_new_version_into_every_replica_with_no_failed_search(versioned, http):
    url, out, scratch = versioned
    before = retriever_info(http, url, "keyword")["version"]
    source = corpus_with(scratch, {"_id": "new-1", "title": "", "text": f"The {NEW_WORD} enzyme and stem cells."})
    ingest(source, out, ("keyword",))
    # The link moved, but nothing reloaded yet: every replica still serves the version before.
    assert search(http, url, NEW_WORD, cache=False)["retrievers"]["keyword"]["version"] == before
    with Load(url) as load:
        wait_until(lambda: len(load.answers) >= 5, 60)
        started = len(load.answers)
        r = reload(http, url, "keyword")
        load.switched.set()
        wait_until(lambda: len(load.after) >= 5, 60)  # searches after the switch too
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["name"] == "keyword" and body["version_before"] == before and body["version"] != before
    assert len(body["replicas"]) == 2 and {x["version"] for x in body["replicas"]} == {body["version"]}
    # No search failed, and none lost a retriever to the switch.
    assert [s for s, _ in load.answers if s != 200] == []
    trouble = [(a["retrievers"]["keyword"]["status"], a["retrievers"]["keyword"].get("error"))
               for _, a in load.answers if a["retrievers"]["keyword"]["status"] != "ok"]
    assert trouble == []
    versions = [a["retrievers"]["keyword"]["version"] for _, a in load.answers]
    assert set(versions) <= {before, body["version"]} and started > 0
    # Every search sent after the reload returned was answered by the new version.
    assert {a["retrievers"]["keyword"]["version"] for a in load.after} == {body["version"]}
    answer = search(http, url, NEW_WORD, cache=False, retrievers=["keyword"])
    assert answer["retrievers"]["keyword"]["version"] == body["version"]
    assert answer["results"][0]["id"] == "new-1"
    info = retriever_info(http, url, "keyword")
    assert info["version"] == body["version"] and {x["version"] for x in info["replicas"]} == {body["version"]}


def test_a_cached_answer_of_the_old_version_is_not_served_after_a_reload(versioned, http):
    url, out, scratch = versioned
    query = f"{NEW_WORD} stem cells cached"
    first = search(http, url, query)
    again = search(http, url, query)
    assert again["retrievers"]["keyword"]["cache"] == "hit"
    assert again["retrievers"]["keyword"]["version"] == first["retrievers"]["keyword"]["version"]
    source = corpus_with(scratch, {"_id": "new-2", "title": "", "text": f"{NEW_WORD} {NEW_WORD} cached stem cells."})
    ingest(source, out, ("keyword",))
    new = reload(http, url, "keyword").json()["version"]
    after = search(http, url, query)
    assert after["retrievers"]["keyword"]["cache"] == "miss"
    assert after["retrievers"]["keyword"]["version"] == new
    assert "new-2" in [h["id"] for h in after["results"]]
    assert search(http, url, query)["retrievers"]["keyword"]["cache"] == "hit"  # cached again, under the new one


def test_a_corrupt_new_version_is_refused_and_changes_nothing(versioned, http):
    url, out, scratch = versioned
    before = retriever_info(http, url, "keyword")["version"]
    ingest(corpus_with(scratch, {"_id": "new-3", "title": "", "text": "a corrupt build"}), out, ("keyword",))
    version_dir = (out / "keyword").resolve()
    victim = next(p for p in sorted(version_dir.iterdir()) if p.name != "manifest.json")
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    victim.write_bytes(bytes(data))
    r = reload(http, url, "keyword")
    assert r.status_code == 409, r.text
    assert victim.name in r.json()["detail"] and "checksum" in r.json()["detail"]
    info = retriever_info(http, url, "keyword")
    assert info["version"] == before and {x["version"] for x in info["replicas"]} == {before}
    assert search(http, url, "stem cells", cache=False)["retrievers"]["keyword"]["status"] == "ok"
    # A removed file is refused the same way.
    victim.unlink()
    r = reload(http, url, "keyword")
    assert r.status_code == 409 and victim.name in r.json()["detail"]
    # Repair the link with a good build for the tests after this one.
    ingest(corpus_with(scratch, {"_id": "new-3", "title": "", "text": "a good build"}), out, ("keyword",))
    assert reload(http, url, "keyword").status_code == 200


def test_a_replica_that_serve_starts_later_opens_its_siblings_version_not_the_links(versioned, http):
    url, out, scratch = versioned
    pinned = retriever_info(http, url, "keyword")["version"]
    # Two rebuilds, not reloaded: ingest keeps the version before the link's, and this one because it is served.
    ingest(corpus_with(scratch, {"_id": "new-4", "title": "", "text": "not reloaded yet"}), out, ("keyword",))
    ingest(corpus_with(scratch, {"_id": "new-4", "title": "", "text": "not reloaded either"}), out, ("keyword",))
    assert not (out / "keyword").resolve().name.endswith(pinned)  # the link moved on
    victim = replica_actors("versioned", "keyword")[0]
    ray.kill(victim, no_restart=True)

    def two_replicas_report() -> bool:
        replicas = retriever_info(http, url, "keyword")["replicas"]
        return len(replicas) == 2 and all(r["version"] for r in replicas)

    wait_until(two_replicas_report, 120, interval_s=0.5)
    info = retriever_info(http, url, "keyword")
    assert {r["version"] for r in info["replicas"]} == {pinned} and info["version"] == pinned
    for _ in range(6):  # whichever replica answers, it is the pinned version
        assert search(http, url, "stem cells", cache=False)["retrievers"]["keyword"]["version"] == pinned


def test_a_dense_retriever_and_each_shard_of_a_sharded_one_reload(versioned, http):
    url, out, scratch = versioned
    source = corpus_with(scratch, {"_id": "new-5", "title": "", "text": f"{NEW_WORD}: a protein folding stem cells."})
    ingest(source, out, ("dense",))
    ingest(source, out / "sharded", ("dense",), shards=2)
    before = retriever_info(http, url, "split")["version"]
    dense = reload(http, url, "dense")
    split = reload(http, url, "split")
    assert dense.status_code == 200 and split.status_code == 200, (dense.text, split.text)
    body = split.json()
    assert body["version_before"] == before and len(body["version"].split("|")) == 2
    assert {r["deployment"] for r in body["replicas"]} == {"split-shard0", "split-shard1"}
    assert all(a != b for a, b in zip(before.split("|"), body["version"].split("|"), strict=True))
    answer = search(http, url, f"{NEW_WORD} protein", cache=False, retrievers=["dense", "split"])
    assert answer["retrievers"]["split"]["version"] == body["version"]
    assert answer["retrievers"]["dense"]["version"] == dense.json()["version"]
    for name in ("dense", "split"):
        assert "new-5" in [h["id"] for h in search(http, url, f"{NEW_WORD} protein", retrievers=[name])["results"]]


def test_ragfan_reload_on_the_command_line(versioned):
    url, _, _ = versioned
    env = {"RAGFAN_API_KEY": KEY, "PATH": str(Path(sys.executable).parent)}
    for _ in range(2):  # the first rolls in what the link points to; the second finds nothing new
        ok = subprocess.run([sys.executable, "-m", "serve_app.cli", "reload", "keyword", "--url", url],
                            capture_output=True, text=True, env=env, timeout=300)
        assert ok.returncode == 0, ok.stderr
        assert ok.stdout.startswith("keyword: version ") and "served by 2 replicas" in ok.stdout
    assert "(unchanged)" in ok.stdout
    missing = subprocess.run([sys.executable, "-m", "serve_app.cli", "reload", "nope", "--url", url],
                             capture_output=True, text=True, env=env, timeout=300)
    assert missing.returncode == 2 and "no retriever 'nope'" in missing.stderr and "Traceback" not in missing.stderr


@pytest.fixture
def watched(cluster, tmp_path):
    out = tmp_path / "out"
    ingest(TINYBEIR / "corpus.jsonl", out, ("keyword",))
    config = parse_config(
        {"app_name": "watched", "gateway": {"ray_actor_options": {"num_cpus": 0.1}},
         "retrievers": [{"name": "keyword", "kind": "keyword", "artifacts": str(out / "keyword"),
                         "ray_actor_options": {"num_cpus": 0.1}, "reload": {"watch_s": 0.5}}]},
        base_dir=Path("."),
    )
    serve.run(app_from_config(config, api_keys=[]), name="watched", route_prefix="/watched")
    yield cluster + "/watched", out
    serve.delete("watched")
    shutil.rmtree(out, ignore_errors=True)


def test_a_watched_retriever_rolls_in_a_new_version_by_itself(watched, http, tmp_path):
    url, out = watched
    before = http.get(f"{url}/v1/retrievers").json()["retrievers"][0]["version"]
    ingest(corpus_with(tmp_path, {"_id": "watched-1", "title": "", "text": f"{NEW_WORD} watched"}), out, ("keyword",))
    link = (out / "keyword").resolve().name

    def rolled_in() -> bool:
        info = http.get(f"{url}/v1/retrievers").json()["retrievers"][0]
        return info["version"] != before and link.endswith(info["version"])

    wait_until(rolled_in, 60, interval_s=0.25)
    hits = http.post(f"{url}/v1/search", json={"query": NEW_WORD, "cache": False}).json()["results"]
    assert hits[0]["id"] == "watched-1"
