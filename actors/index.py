"""Index artifacts on disk: one directory per retriever build, with a manifest, written atomically.

A build goes into a temporary directory beside its target and is renamed into place only when
complete, so a crashed build never leaves a directory that loads. The directory name carries a key
derived from everything that shapes the index (source bytes, model, parameters), so a changed
source or model builds a new index and an unchanged one is reused.

    <cache_dir>/<retriever name>/<key>/
        manifest.json   format version, kind, model, dim, doc count, index type, checksums
        docs.jsonl      the documents (id, text, metadata), with docs.offsets.npy (see docstore.py)
        ...             kind-specific files: index.faiss (dense), the BM25 matrices (keyword)

`ragfan ingest` writes to a fixed path instead (`OUT/dense`), and rebuilds it in place when the
source changes. `swap_in` keeps that path valid throughout: the path is a symlink to a version
directory, and a rebuild writes a new version and replaces the link with one rename:

    OUT/dense -> .dense.v20250101T120000.000123-1a2b    what readers open, through the link
    OUT/.dense.v20250101T120000.000123-1a2b/            the current version
    OUT/.dense.v20241231T090000.456789-9f8e/            the one before, kept for a reader that opened it

Older versions are deleted, but for one that a running replica marks as in use (`mark_in_use`): a
replica that starts later must be able to open the version its siblings serve (actors/versions.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from actors.errors import DataError

FORMAT_VERSION = 2  # 2: documents in a DocStore (docs.jsonl + docs.offsets.npy)
MANIFEST = "manifest.json"
# A version a running replica serves is kept by `swap_in`, however many rebuilds come after it, while
# this file in it is younger than IN_USE_TTL_S; replicas renew it (actors/versions.py).
IN_USE = ".in-use"
IN_USE_TTL_S = 120.0
T = TypeVar("T")


def default_cache_dir() -> Path:
    return Path(os.environ.get("RAGFAN_CACHE_DIR", Path.home() / ".cache" / "ragfan"))


def build_key(**parts: Any) -> str:
    """A short stable key over the JSON form of the parts that shape an index."""
    blob = json.dumps({"format_version": FORMAT_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def sha256_file(path: Path) -> str:
    """A file's sha256, what `sha256sum` prints."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_or_build(
    target: Path,
    *,
    build: Callable[[Path], dict[str, Any]],
    load: Callable[[Path, dict[str, Any]], T],
) -> tuple[T, bool]:
    """Load the artifacts at `target`, building them first if they are absent.

    `build(tmpdir)` writes the kind's files and returns the manifest fields it knows; `load(dir,
    manifest)` opens a verified directory. Returns (loaded object, whether it was built now).
    """
    if (target / MANIFEST).is_file():
        return load(target, verify(target)), False
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        started = time.time()
        fields = build(tmp)
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = {
            "format_version": FORMAT_VERSION,
            **fields,
            "build_seconds": round(time.time() - started, 3),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "files": files,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        try:
            tmp.rename(target)
        except OSError:
            # Another replica finished the same build first; theirs is as good as ours.
            if not (target / MANIFEST).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return load(target, verify(target)), True


def verify(directory: Path) -> dict[str, Any]:
    """Check the manifest and every file's checksum; raise DataError naming the bad file."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{directory / MANIFEST}: unreadable manifest ({exc}); delete {directory} to rebuild") from exc
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{directory}: index format {manifest.get('format_version')}, this ragfan reads {FORMAT_VERSION}; "
            f"delete {directory} to rebuild"
        )
    for name, expected in manifest.get("files", {}).items():
        path = directory / name
        if not path.is_file() or sha256_file(path) != expected:
            raise DataError(f"{path}: missing or corrupt (checksum mismatch); delete {directory} to rebuild")
    return manifest


def swap_in(target: Path, *, build: Callable[[Path], dict[str, Any]]) -> Path:
    """Build a new version of `target` beside it, then point `target` at it in one atomic rename.

    A reader of `target` sees the old version or the new one, never a missing or half-written
    directory (`rename(2)` replaces the link in one step). The version before stays, for a reader
    that resolved the link just before the swap; older versions are deleted. Returns the version.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    # A plain directory was written by an older ragfan, before versions: it becomes the version before.
    legacy = target.with_name(_version_name(target)) if target.is_dir() and not target.is_symlink() else None
    previous = target.parent / os.readlink(target) if target.is_symlink() else legacy
    version = target.with_name(_version_name(target))
    load_or_build(version, build=build, load=lambda d, m: None)
    if legacy is not None:
        # Moving it aside leaves the path missing for an instant, this once; every later swap is atomic.
        target.rename(legacy)
    link = target.with_name(f".{target.name}.link-{secrets.token_hex(4)}")
    os.symlink(version.name, link)  # relative: the output directory can be moved or mounted elsewhere
    os.replace(link, target)
    for old in versions(target):
        if old not in (version, previous) and not in_use(old):
            shutil.rmtree(old, ignore_errors=True)
    return version


def mark_in_use(directory: Path) -> None:
    """Say that a running replica serves this version: `swap_in` keeps it while the mark is fresh.

    Replicas renew it while they serve the version (actors/deployment.py). Best effort: on storage
    this process cannot write, nothing is marked, and an old version goes as before."""
    try:
        (directory / IN_USE).touch()
    except OSError:
        pass


def in_use(directory: Path) -> bool:
    """Whether a replica marked this version within IN_USE_TTL_S."""
    try:
        return time.time() - (directory / IN_USE).stat().st_mtime < IN_USE_TTL_S
    except OSError:
        return False


def versions(target: Path) -> list[Path]:
    """The version directories `swap_in` wrote for `target`, oldest first."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.v\d{{8}}T\d{{6}}\.\d{{6}}-[0-9a-f]{{4}}")
    return sorted(p for p in target.parent.iterdir() if pattern.fullmatch(p.name) and p.is_dir())


def _version_name(target: Path) -> str:
    # Sorted by build time, and unique: microseconds, then a random tag for builds racing each other.
    now = datetime.now(UTC)
    return f".{target.name}.v{now:%Y%m%dT%H%M%S.%f}-{secrets.token_hex(2)}"
