"""Documents on disk, read one at a time: a JSONL file plus a byte-offset array.

A large corpus is never held in memory as Python objects: a replica keeps the offsets (8 bytes a
document, memory-mapped) and reads a document's line with `os.pread` when a hit needs its text.
`pread` needs no shared file position, so the worker threads of a replica can read concurrently.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from actors.types import Document

DOCS = "docs.jsonl"
OFFSETS = "docs.offsets.npy"


def write_docstore(directory: Path, docs: Iterable[Document]) -> int:
    """Write documents and their offsets into `directory`; return how many were written."""
    offsets = [0]
    with (directory / DOCS).open("wb") as fh:
        for doc in docs:
            line = json.dumps({"id": doc.doc_id, "text": doc.text, "metadata": dict(doc.metadata)}) + "\n"
            fh.write(line.encode("utf-8"))
            offsets.append(offsets[-1] + len(line.encode("utf-8")))
    np.save(directory / OFFSETS, np.asarray(offsets, dtype=np.int64))
    return len(offsets) - 1


class DocStore(Sequence[Document]):
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._offsets = np.load(directory / OFFSETS, mmap_mode="r")
        self._fd = os.open(directory / DOCS, os.O_RDONLY)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        start, end = int(self._offsets[i]), int(self._offsets[i + 1])
        obj = json.loads(os.pread(self._fd, end - start, start))
        return Document(obj["id"], obj["text"], obj["metadata"])

    def __iter__(self) -> Iterator[Document]:
        with (self.directory / DOCS).open(encoding="utf-8") as fh:
            for line in fh:
                obj = json.loads(line)
                yield Document(obj["id"], obj["text"], obj["metadata"])

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)


def metadata_index(docs: Iterable[Document]) -> dict[tuple[str, str], np.ndarray]:
    """(key, value) -> sorted positions of the documents carrying it, from one pass over the docs."""
    values: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, doc in enumerate(docs):
        for key, value in doc.metadata.items():
            values[(key, value)].append(i)
    return {kv: np.asarray(ids, dtype=np.int64) for kv, ids in values.items()}
