"""Sources, chunking, artifacts loaded through `open_artifacts`, and the errors for broken ones."""

import json

import pytest

from actors.data import read_triples
from actors.dense import DenseRetriever
from actors.errors import DataError, RetrieverFailed
from actors.factory import open_artifacts
from actors.index import load_or_build
from actors.keyword import KeywordRetriever
from actors.sources import PARENT, chunk, read_source, source_sha256
from actors.spec import DenseOptions, KeywordOptions, RetrieverSpec
from actors.types import Document, Query
from tests.unit.fakes import HashingEmbedder


def test_chunking_keeps_short_documents_whole_and_splits_long_ones_with_overlap():
    short, long = Document("s", "one two three"), Document("l", " ".join(f"w{i}" for i in range(10)))
    chunks = list(chunk([short, long], max_words=4, overlap=1))
    assert [c.doc_id for c in chunks] == ["s", "l#0", "l#1", "l#2"]
    assert chunks[1].text == "w0 w1 w2 w3" and chunks[2].text == "w3 w4 w5 w6"
    assert {c.metadata[PARENT] for c in chunks} == {"s", "l"}
    with pytest.raises(ValueError, match="overlap"):
        list(chunk([short], max_words=4, overlap=4))


def test_a_directory_of_text_and_markdown_is_a_source(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("plain text about statins")
    (tmp_path / "sub" / "b.md").write_text("# Vitamin D\n\nand bone health")
    (tmp_path / "ignored.csv").write_text("x,y")
    docs = read_source(tmp_path)
    assert [(d.doc_id, d.metadata["title"]) for d in docs] == [("a.txt", "a"), ("sub/b.md", "Vitamin D")]
    before = source_sha256(tmp_path)
    (tmp_path / "a.txt").write_text("changed")
    assert source_sha256(tmp_path) != before
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no .txt or .md"):
        read_source(empty)


def test_triples_from_tsv(tmp_path):
    path = tmp_path / "kg.tsv"
    path.write_text("head\trelation\ttail\tdoc_id\ntp53\tmutated_in\tbreast cancer\t42\nx\ty\n")
    with pytest.raises(DataError, match=r"kg.tsv:3: expected head<TAB>relation<TAB>tail"):
        read_triples(path)
    path.write_text("tp53\tmutated_in\tBreast Cancer\t42\n")
    [t] = read_triples(path)
    assert (t.head, t.relation, t.tail, t.doc_id) == ("tp53", "mutated_in", "breast cancer", "42")


@pytest.fixture
def dense_artifacts(tmp_path, docs, embedder):
    target = tmp_path / "dense"

    def build(directory):
        return {**DenseRetriever.from_documents(name="d", documents=docs, embedder=embedder).save(directory),
                "model": "sentence-transformers/all-MiniLM-L6-v2"}

    load_or_build(target, build=build, load=lambda d, m: None)
    return target


def test_a_loaded_dense_index_reads_documents_from_disk(dense_artifacts, embedder):
    manifest = json.loads((dense_artifacts / "manifest.json").read_text())
    r = DenseRetriever.load(dense_artifacts, manifest, name="d", embedder=embedder)
    assert type(r.documents).__name__ == "DocStore" and len(r.documents) == 5
    [hits] = r.search([Query("aspirin colorectal cancer", top_k=2, filters={"domain": "oncology"})])
    assert hits[0].doc_id == "d3" and hits[0].text.startswith("Aspirin")


def test_a_dimension_mismatch_names_the_file_and_the_fix(dense_artifacts):
    manifest = json.loads((dense_artifacts / "manifest.json").read_text())
    with pytest.raises(RetrieverFailed, match=r"index.faiss: built with dimension 256 .* has 64; delete"):
        DenseRetriever.load(dense_artifacts, manifest, name="d", embedder=HashingEmbedder(dim=64))


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_truncated_or_altered_file_is_named(dense_artifacts, damage):
    path = dense_artifacts / "docs.jsonl"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else data.replace(b"Aspirin", b"Asprin!"))
    spec = RetrieverSpec(name="d", options=DenseOptions(), artifacts=str(dense_artifacts))
    with pytest.raises(DataError, match=r"docs.jsonl: missing or corrupt \(checksum mismatch\)"):
        open_artifacts(spec)


def test_missing_artifacts_wrong_kind_and_wrong_model(tmp_path, dense_artifacts):
    with pytest.raises(DataError, match=r"manifest.json: not found; build the index with `ragfan ingest"):
        open_artifacts(RetrieverSpec(name="d", options=DenseOptions(), artifacts=str(tmp_path / "nope")))
    with pytest.raises(DataError, match="holds a 'dense' index, but k is kind 'keyword'"):
        open_artifacts(RetrieverSpec(name="k", options=KeywordOptions(), artifacts=str(dense_artifacts)))
    with pytest.raises(RetrieverFailed, match="built with model 'sentence-transformers/all-MiniLM-L6-v2'"):
        open_artifacts(RetrieverSpec(name="d", options=DenseOptions(model="other/model"), artifacts=dense_artifacts))


def test_keyword_artifacts_round_trip(tmp_path, docs):
    target = tmp_path / "keyword"
    load_or_build(target, build=lambda d: KeywordRetriever(name="k", documents=docs).save(d), load=lambda d, m: None)
    r = open_artifacts(RetrieverSpec(name="k", options=KeywordOptions(), artifacts=str(target)))
    [hits] = r.search([Query("metformin glucose", top_k=1)])
    assert hits[0].doc_id == "d2"


def test_a_spec_needs_exactly_one_source():
    with pytest.raises(ValueError, match="exactly one"):
        RetrieverSpec(name="x", options=DenseOptions())
    with pytest.raises(ValueError, match="exactly one"):
        RetrieverSpec(name="x", options=DenseOptions(), data="a", artifacts="b")


@pytest.mark.parametrize(("free", "workers", "options"), [
    ({"CPU": 3.5}, 3, {"num_cpus": 1}),
    ({"CPU": 0.25}, 1, {"num_cpus": 0.25}),  # less than a CPU free: one actor on that share
    ({"CPU": 0.0, "GPU": 2.0}, 2, {"num_gpus": 1, "num_cpus": 0.0}),
])
def test_the_embedding_pool_sizes_itself_to_what_the_cluster_has_free(monkeypatch, free, workers, options):
    import ray

    from actors.ingest import EmbedPool

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "available_resources", lambda: free)
    pool = EmbedPool("default", progress=False)
    assert (pool.max_workers, pool._options) == (workers, options)


def test_the_embedding_pool_on_a_cluster_with_no_cpu_free_fails_at_once_saying_what_to_do(monkeypatch):
    """It used to ask for a whole CPU anyway and wait for it forever (`embedding: 0%`)."""
    import ray

    from actors.errors import RagError
    from actors.ingest import EmbedPool

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "available_resources", lambda: {"memory": 1e9})
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    with pytest.raises(RagError, match=r"has 2 CPUs and none is free.*Stop what holds them"):
        EmbedPool("default", progress=False)
