"""`ragfan ingest` swaps a rebuild into place in one atomic step, and cleans up after itself.

A reader (a replica starting, `verify`, the config's check for `manifest.json`) may open
`OUT/keyword` at any moment. The first test looks at that path after every step that changes the
file system during a rebuild, so a swap done in two steps (rename the old directory away, rename
the new one in) shows as a step after which the path is missing.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from actors.errors import DataError
from actors.index import MANIFEST, swap_in, verify, versions
from actors.ingest import ingest


def write_source(path: Path, word: str) -> None:
    docs = [{"_id": f"d{i}", "text": f"{word} document number {i} about retrieval"} for i in range(20)]
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))


def source_of(target: Path) -> str:
    """What a reader finds at `target`: the source checksum of a complete build, or "missing"."""
    try:
        return json.loads((target / MANIFEST).read_text())["source_sha256"]
    except (OSError, ValueError):
        return "missing"


@pytest.fixture
def built(tmp_path) -> tuple[Path, Path]:
    source, out = tmp_path / "corpus.jsonl", tmp_path / "out"
    write_source(source, "first")
    ingest(source, out, kinds=("keyword",), progress=False)
    return source, out / "keyword"


def test_a_rebuild_never_leaves_the_target_missing(built, monkeypatch):
    source, target = built
    first = source_of(target)
    seen: list[str] = []

    def looking_after(fn):
        def step(*args, **kwargs):
            result = fn(*args, **kwargs)
            seen.append(source_of(target))  # a reader arriving right after this step
            return result
        return step

    for name in ("rename", "replace", "symlink"):
        monkeypatch.setattr(os, name, looking_after(getattr(os, name)))
    monkeypatch.setattr(shutil, "rmtree", looking_after(shutil.rmtree))
    write_source(source, "second")
    [report] = ingest(source, target.parent, kinds=("keyword",), progress=False)
    assert not report.reused and len(seen) >= 3
    assert "missing" not in seen, seen
    second = source_of(target)
    assert second != first
    switch = seen.index(second)  # the old build until one step, the new one from then on
    assert set(seen[:switch]) == {first} and set(seen[switch:]) == {second}


def test_the_target_is_a_link_to_the_newest_version_and_only_one_older_version_stays(built):
    source, target = built
    for word in ("second", "third", "fourth"):
        write_source(source, word)
        ingest(source, target.parent, kinds=("keyword",), progress=False)
        assert verify(target)["num_docs"] == 20
    kept = versions(target)
    assert target.is_symlink() and target.resolve() == kept[-1].resolve()
    assert len(kept) == 2  # the current version and the one before
    assert sorted(p.name for p in target.parent.iterdir()) == sorted([target.name, *(p.name for p in kept)])
    assert not os.path.isabs(os.readlink(target))  # relative: the output directory can move


def test_an_unchanged_source_is_reused_without_a_new_version(built):
    source, target = built
    before = versions(target)
    [report] = ingest(source, target.parent, kinds=("keyword",), progress=False)
    assert report.reused and versions(target) == before


def test_a_failed_build_leaves_the_old_version_in_place(built):
    _, target = built
    before, manifest = versions(target), verify(target)

    def broken(directory: Path) -> dict:
        (directory / "half-written").write_text("x")
        raise DataError("the build failed half way")

    with pytest.raises(DataError, match="half way"):
        swap_in(target, build=broken)
    assert versions(target) == before and verify(target) == manifest
    assert sorted(p.name for p in target.parent.iterdir()) == sorted([target.name, *(p.name for p in before)])


def test_a_plain_directory_from_an_older_ragfan_becomes_the_previous_version(built):
    source, target = built
    legacy = target.resolve()
    target.unlink()
    shutil.copytree(legacy, target)  # what ragfan wrote before versions: a real directory
    shutil.rmtree(legacy)
    old = source_of(target)
    write_source(source, "second")
    ingest(source, target.parent, kinds=("keyword",), progress=False)
    assert target.is_symlink() and source_of(target) != old
    [previous, current] = versions(target)
    assert current == target.resolve() and source_of(previous) == old
