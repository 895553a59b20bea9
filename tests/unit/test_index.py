import json

import pytest

from actors.data import read_documents, read_triples
from actors.dense import DenseRetriever
from actors.errors import DataError
from actors.index import build_key, load_or_build
from actors.types import Query


def build_dense(docs, embedder, calls):
    def build(directory):
        calls.append(directory)
        return DenseRetriever.from_documents(name="d", documents=docs, embedder=embedder).save(directory)

    def load(directory, manifest):
        return DenseRetriever.load(directory, manifest, name="d", embedder=embedder)

    return build, load


def test_build_once_then_reuse(tmp_path, docs, embedder):
    calls = []
    build, load = build_dense(docs, embedder, calls)
    target = tmp_path / "d" / build_key(model="fake")
    r1, built1 = load_or_build(target, build=build, load=load)
    r2, built2 = load_or_build(target, build=build, load=load)
    assert (built1, built2) == (True, False) and len(calls) == 1
    manifest = json.loads((target / "manifest.json").read_text())
    assert manifest["num_docs"] == 5 and manifest["dim"] == embedder.dim and manifest["kind"] == "dense"
    assert set(manifest["files"]) == {"docs.jsonl", "docs.offsets.npy", "index.faiss"}
    assert r2.search([Query("aspirin cancer", top_k=1)])[0][0].doc_id == "d3"
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # no temporary directory left


def test_a_corrupt_file_is_named(tmp_path, docs, embedder):
    build, load = build_dense(docs, embedder, [])
    target = tmp_path / "idx"
    load_or_build(target, build=build, load=load)
    with (target / "index.faiss").open("r+b") as fh:
        fh.seek(50)
        fh.write(b"\x00garbage")
    with pytest.raises(DataError, match=r"index.faiss: missing or corrupt"):
        load_or_build(target, build=build, load=load)


def test_a_failed_build_leaves_nothing_that_loads(tmp_path):
    def build(directory):
        (directory / "docs.jsonl").write_text("partial")
        raise RuntimeError("killed mid-build")

    with pytest.raises(RuntimeError):
        load_or_build(tmp_path / "idx", build=build, load=lambda d, m: None)
    assert list(tmp_path.iterdir()) == []


def test_build_key_changes_with_any_part():
    assert build_key(model="a", sha="1") == build_key(sha="1", model="a")
    assert build_key(model="a", sha="1") != build_key(model="b", sha="1")


def test_read_documents_reports_file_and_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"_id": "1", "title": "T", "text": "body", "metadata": {"k": 1}}\n\n{"_id": "2"}\n')
    with pytest.raises(DataError, match=r"c.jsonl:3: .*string `text`"):
        read_documents(path)
    path.write_text('{"_id": "1", "title": "T", "text": "body", "metadata": {"k": 1}}\n{oops\n')
    with pytest.raises(DataError, match=r"c.jsonl:2: not valid JSON"):
        read_documents(path)
    path.write_text(
        '{"_id": "1", "title": "T", "text": "body", "metadata": {"k": 1}}\n{"_id": "2", "title": "Q?", "text": "b"}'
    )
    one, two = read_documents(path)
    assert one.text == "T. body" and one.metadata == {"k": "1", "title": "T"}
    assert two.text == "Q? b"
    with pytest.raises(DataError, match="not found"):
        read_documents(tmp_path / "missing.jsonl")


def test_read_triples(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"head": "P53", "relation": "r", "tail": "X", "doc_id": 7}\n')
    [t] = read_triples(path)
    assert (t.head, t.tail, t.doc_id) == ("p53", "x", "7")
    path.write_text('{"head": "a", "tail": "b"}\n')
    with pytest.raises(DataError, match="t.jsonl:1"):
        read_triples(path)
