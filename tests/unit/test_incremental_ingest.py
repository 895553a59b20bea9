"""A re-ingest of a changed source embeds only the new and changed chunks, and gives the index a full
rebuild gives.

The embedding stand-in records every text it is asked for, so each test says exactly what was
embedded; its vectors depend on the text alone (like the real model's), so an incremental index and
a full rebuild of the same source must hold the same vectors, bit for bit. No Ray: the stand-in
replaces `embed_on_cluster`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import faiss
import numpy as np
import pytest

from actors.dense import DenseRetriever
from actors.index import MANIFEST, verify
from actors.ingest import HASHES, ChunkCounts, ingest
from actors.keyword import KeywordRetriever
from actors.shards import shard_dir, shard_of
from actors.types import Query
from serve_app.cli import main
from tests.unit.fakes import HashingEmbedder

MODEL = "fake-hashing"  # not a model name ragfan resolves: the manifest records it as given
WORDS = ("vitamin insulin cancer tumour aspirin glucose exercise sclerosis statin malaria vaccine gut "
         "microbiota obesity p53 metformin running risk children heart").split()


class RecordingEmbed:
    """Embeds with the hashing embedder, one call per `embed`, and keeps the texts of each call."""

    def __init__(self) -> None:
        self.embedder = HashingEmbedder(name=MODEL)
        self.calls: list[list[str]] = []

    def __call__(self, texts: Sequence[str], model: str, *, progress: bool) -> np.ndarray:
        assert model == MODEL
        self.calls.append(list(texts))
        return self.embedder.encode(texts)

    @property
    def texts(self) -> list[str]:
        return [t for call in self.calls for t in call]


def corpus(n: int = 30) -> dict[str, str]:
    return {f"d{i}": " ".join(WORDS[(i * k) % len(WORDS)] for k in range(1, 3 + i % 6)) + f" item{i}"
            for i in range(n)}


def write(path: Path, docs: dict[str, str]) -> Path:
    path.write_text("".join(json.dumps({"_id": i, "text": t}) + "\n" for i, t in docs.items()))
    return path


def changed(docs: dict[str, str]) -> dict[str, str]:
    """One document edited (d3), one gone (d7), one new (new1) at the end."""
    out = {i: t for i, t in docs.items() if i != "d7"}
    out["d3"] = "an edited abstract about statins and heart risk"
    out["new1"] = "a new abstract on the gut microbiota of children"
    return out


def run(source: Path, out: Path, embed: RecordingEmbed, **kwargs):
    kwargs.setdefault("kinds", ("dense", "keyword"))
    return {r.kind: r for r in ingest(source, out, model=MODEL, progress=False, embed=embed, **kwargs)}


def stored_vectors(directory: Path) -> np.ndarray:
    index = faiss.read_index(str(directory / "index.faiss"))
    return index.reconstruct_n(0, index.ntotal)


def load_dense(directory: Path) -> DenseRetriever:
    return DenseRetriever.load(directory, verify(directory), name="d", embedder=HashingEmbedder(name=MODEL))


@pytest.fixture
def source(tmp_path) -> Path:
    return write(tmp_path / "corpus.jsonl", corpus())


def test_a_first_ingest_embeds_everything_and_counts_it_all_as_added(source, tmp_path):
    embed = RecordingEmbed()
    reports = run(source, tmp_path / "out", embed)
    assert embed.texts == list(corpus().values())
    for kind in ("dense", "keyword"):
        r = reports[kind]
        assert (r.mode, r.reused, r.chunks, r.note) == ("full", False, ChunkCounts(added=30), "")
        manifest = verify(r.path)
        assert manifest["build"] == "full" and manifest["chunks"] == {"added": 30, "changed": 0, "removed": 0,
                                                                      "reused": 0}
        # the hashes are the sha256 of each chunk's text, in index order, and checksummed like every file
        hashes = json.loads((r.path / HASHES).read_text())
        assert hashes == [hashlib.sha256(t.encode()).hexdigest() for t in corpus().values()]
        assert HASHES in manifest["files"]
    assert reports["dense"].embedded == 30


def test_a_changed_source_embeds_only_the_new_and_changed_chunks(source, tmp_path):
    out = tmp_path / "out"
    run(source, out, RecordingEmbed())
    new = changed(corpus())
    write(source, new)
    embed = RecordingEmbed()
    reports = run(source, out, embed)
    assert embed.calls == [[new["d3"], new["new1"]]]  # in source order, in one call
    expected = ChunkCounts(added=1, changed=1, removed=1, reused=28)
    for kind in ("dense", "keyword"):
        r = reports[kind]
        assert (r.mode, r.reused, r.chunks, r.num_docs) == ("incremental", False, expected, 30)
        assert verify(r.path)["chunks"] == {"added": 1, "changed": 1, "removed": 1, "reused": 28}
    assert reports["dense"].embedded == 2
    # what the next run compares with: the hashes of this version's chunks
    assert json.loads((reports["dense"].path / HASHES).read_text()) == [
        hashlib.sha256(t.encode()).hexdigest() for t in new.values()
    ]


def test_the_incremental_index_is_the_full_rebuild_of_the_changed_source(source, tmp_path):
    out, rebuilt = tmp_path / "out", tmp_path / "rebuilt"
    run(source, out, RecordingEmbed())
    write(source, changed(corpus()))
    run(source, out, RecordingEmbed())
    full = RecordingEmbed()
    run(source, rebuilt, full, full=True)
    assert len(full.texts) == 30
    np.testing.assert_array_equal(stored_vectors(out / "dense"), stored_vectors(rebuilt / "dense"))
    assert (out / "dense" / "docs.jsonl").read_bytes() == (rebuilt / "dense" / "docs.jsonl").read_bytes()
    assert (out / "keyword" / "docs.jsonl").read_bytes() == (rebuilt / "keyword" / "docs.jsonl").read_bytes()
    queries = [Query("statins and heart risk", top_k=5), Query("gut microbiota children", top_k=10),
               Query("item7 vitamin", top_k=30)]
    dense = [load_dense(d / "dense") for d in (out, rebuilt)]
    keyword = [KeywordRetriever.load(d / "keyword", verify(d / "keyword"), name="k") for d in (out, rebuilt)]
    for a, b in (dense, keyword):
        for q in queries:
            [hits_a], [hits_b] = a.search([q]), b.search([q])
            assert [(h.doc_id, h.score) for h in hits_a] == [(h.doc_id, h.score) for h in hits_b]
            assert "d7" not in {h.doc_id for h in hits_a}  # the removed document is gone
    [top] = dense[0].search([Query("an edited abstract about statins and heart risk", top_k=1)])
    assert top[0].doc_id == "d3" and top[0].text.startswith("an edited abstract")


def test_an_unchanged_source_is_reused_and_nothing_is_embedded(source, tmp_path):
    out = tmp_path / "out"
    run(source, out, RecordingEmbed())
    embed = RecordingEmbed()
    reports = run(source, out, embed)
    assert embed.calls == []
    for r in reports.values():
        assert (r.mode, r.reused, r.chunks, r.embedded) == ("reused", True, ChunkCounts(reused=30), 0)


def test_removals_alone_embed_nothing(source, tmp_path):
    out = tmp_path / "out"
    run(source, out, RecordingEmbed())
    write(source, {i: t for i, t in corpus().items() if i not in ("d0", "d29")})
    embed = RecordingEmbed()
    reports = run(source, out, embed)
    assert embed.calls == []  # so no Ray either
    assert reports["dense"].chunks == ChunkCounts(removed=2, reused=28) and reports["dense"].embedded == 0
    assert "d0" not in {d.doc_id for d in load_dense(out / "dense").documents}


def test_full_embeds_everything_even_an_unchanged_source(source, tmp_path):
    out = tmp_path / "out"
    run(source, out, RecordingEmbed())
    embed = RecordingEmbed()
    reports = run(source, out, embed, full=True)
    assert embed.texts == list(corpus().values())
    for r in reports.values():
        assert (r.mode, r.reused, r.chunks) == ("full", False, ChunkCounts(added=30))
        assert "--full" in r.note and verify(r.path)["full_rebuild"] == r.note


@pytest.mark.parametrize(
    ("settings", "reason"),
    [({"index_type": "hnsw"}, "index_type 'flat' -> 'hnsw'"), ({"max_words": 3, "overlap": 1}, "max_words 256 -> 3")],
)
def test_other_settings_fall_back_to_a_full_rebuild_and_say_why(source, tmp_path, settings, reason):
    out = tmp_path / "out"
    run(source, out, RecordingEmbed(), kinds=("dense",))
    write(source, changed(corpus()))
    embed = RecordingEmbed()
    [r] = run(source, out, embed, kinds=("dense",), **settings).values()
    assert r.mode == "full" and reason in r.note and r.chunks == ChunkCounts(added=r.num_docs)
    assert len(embed.texts) == r.num_docs == r.embedded  # every chunk embedded again


def test_a_version_without_hashes_falls_back_to_a_full_rebuild(source, tmp_path):
    out = tmp_path / "out"
    [first] = run(source, out, RecordingEmbed(), kinds=("keyword",)).values()
    # what an older ragfan wrote: no hashes, and a manifest without them
    (first.path / HASHES).unlink()
    manifest = json.loads((first.path / MANIFEST).read_text())
    del manifest["files"][HASHES]
    (first.path / MANIFEST).write_text(json.dumps(manifest))
    write(source, changed(corpus()))
    [r] = run(source, out, RecordingEmbed(), kinds=("keyword",)).values()
    assert r.mode == "full" and "no hashes.json" in r.note
    # and the version it wrote has them, so the next run is incremental
    write(source, corpus())
    [again] = run(source, out, RecordingEmbed(), kinds=("keyword",)).values()
    assert again.mode == "incremental" and again.chunks == ChunkCounts(added=1, changed=1, removed=1, reused=28)


def test_a_corrupt_current_version_falls_back_to_a_full_rebuild(source, tmp_path):
    out = tmp_path / "out"
    run(source, out, RecordingEmbed(), kinds=("dense",))
    index = out / "dense" / "index.faiss"
    index.write_bytes(index.read_bytes()[:-8])  # its vectors can no longer be trusted
    write(source, changed(corpus()))
    embed = RecordingEmbed()
    [r] = run(source, out, embed, kinds=("dense",)).values()
    assert r.mode == "full" and "index.faiss: missing or corrupt" in r.note and len(embed.texts) == 30


def test_hnsw_takes_its_vectors_back_from_the_graphs_flat_storage(source, tmp_path):
    out, rebuilt = tmp_path / "out", tmp_path / "rebuilt"
    run(source, out, RecordingEmbed(), kinds=("dense",), index_type="hnsw")
    write(source, changed(corpus()))
    embed = RecordingEmbed()
    [r] = run(source, out, embed, kinds=("dense",), index_type="hnsw").values()
    assert r.mode == "incremental" and len(embed.texts) == 2
    run(source, rebuilt, RecordingEmbed(), kinds=("dense",), index_type="hnsw", full=True)
    np.testing.assert_array_equal(stored_vectors(out / "dense"), stored_vectors(rebuilt / "dense"))
    assert type(faiss.read_index(str(out / "dense" / "index.faiss"))).__name__ == "IndexHNSWFlat"


def test_each_shard_is_updated_on_its_own(source, tmp_path):
    out, rebuilt = tmp_path / "out", tmp_path / "rebuilt"
    ingest(source, out, kinds=("dense",), shards=2, model=MODEL, progress=False, embed=RecordingEmbed())
    new = changed(corpus())
    write(source, new)
    embed = RecordingEmbed()
    reports = ingest(source, out, kinds=("dense",), shards=2, model=MODEL, progress=False, embed=embed)
    assert sorted(embed.texts) == sorted([new["d3"], new["new1"]])
    by_text = {text: doc_id for doc_id, text in new.items()}
    for call in embed.calls:  # each shard embeds only its own new and changed chunks
        assert len({shard_of(by_text[t], 2) for t in call}) == 1
    for i, r in enumerate(reports):
        assert r.path == shard_dir(out / "dense", i, 2) and r.mode == "incremental"
        assert r.embedded == sum(shard_of(doc_id, 2) == i for doc_id in ("d3", "new1"))
    totals = [sum(getattr(r.chunks, f) for r in reports) for f in ("added", "changed", "removed", "reused")]
    assert totals == [1, 1, 1, 28]
    ingest(source, rebuilt, kinds=("dense",), shards=2, model=MODEL, progress=False, embed=RecordingEmbed(),
           full=True)
    for i in range(2):
        np.testing.assert_array_equal(stored_vectors(shard_dir(out / "dense", i, 2)),
                                      stored_vectors(shard_dir(rebuilt / "dense", i, 2)))


def test_the_cli_takes_full_and_prints_the_counts(source, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["ingest", str(source), "--out", str(out), "--kinds", "keyword"]
    assert main(argv) == 0
    write(source, changed(corpus()))
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].split()[:7] == ["keyword", "incremental", "30", "1", "1", "1", "28"]
    assert main([*argv, "--full"]) == 0
    printed = capsys.readouterr()
    assert printed.out.splitlines()[-2].split()[:7] == ["keyword", "full", "30", "30", "0", "0", "0"]
    assert "full rebuild: asked for (--full)" in printed.out and "full rebuild" in printed.err
