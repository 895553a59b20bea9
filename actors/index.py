"""Index artifacts on disk: one directory per retriever build, with a manifest, written atomically.

A build goes into a temporary directory beside its target and is renamed into place only when
complete, so a crashed build never leaves a directory that loads. The directory name carries a key
derived from everything that shapes the index (source bytes, model, parameters), so a changed
source or model builds a new index and an unchanged one is reused.

    <cache_dir>/<retriever name>/<key>/
        manifest.json   format version, kind, model, dim, doc count, index type, checksums
        docs.jsonl      the documents (id, text, metadata), with docs.offsets.npy (see docstore.py)
        ...             kind-specific files: index.faiss (dense), the BM25 matrices (keyword)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from actors.errors import DataError

FORMAT_VERSION = 2  # 2: documents in a DocStore (docs.jsonl + docs.offsets.npy)
MANIFEST = "manifest.json"
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
