"""What `ragfan ingest` reads: collections in three layouts, cut into chunks that fit a model.

- BEIR `corpus.jsonl` (`_id`, `title`, `text`, `metadata`) or any JSONL with an id and a text
  field (see `data.read_documents`);
- a directory of `.txt` / `.md` files: the id is the path relative to the directory, the title the
  first Markdown heading or the file name.

Long documents are split into overlapping word windows. A chunk's id is `<doc id>#<n>` and its
metadata keeps the document's id under `parent_id`, so hits can be grouped back to documents.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path

from actors.data import read_documents
from actors.errors import DataError
from actors.index import sha256_file
from actors.types import Document

TEXT_SUFFIXES = (".txt", ".md")
PARENT = "parent_id"


def source_files(source: Path) -> list[Path]:
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.suffix.lower() in TEXT_SUFFIXES and p.is_file())
        if not files:
            raise DataError(f"{source}: no .txt or .md files in this directory")
        return files
    if source.is_file():
        return [source]
    raise DataError(f"source not found: {source}")


def source_sha256(source: Path) -> str:
    """A file's sha256 (what `sha256sum` prints), or one over a directory's text files, names and bytes."""
    if source.is_file():
        return sha256_file(source)
    digest = hashlib.sha256()
    for path in source_files(source):
        digest.update(str(path.relative_to(source)).encode() + b"\0" + sha256_file(path).encode())
    return digest.hexdigest()


def read_source(source: Path, *, text_field: str = "text") -> list[Document]:
    if source.is_file():
        if source.suffix.lower() in TEXT_SUFFIXES:
            return [_text_file(source, source.parent)]
        return read_documents(source, text_field=text_field)
    docs = [_text_file(path, source) for path in source_files(source)]
    return [d for d in docs if d.text.strip()]


def _text_file(path: Path, root: Path) -> Document:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    title = next((line.lstrip("#").strip() for line in text.splitlines() if line.startswith("# ")), path.stem)
    return Document(doc_id=str(path.relative_to(root)), text=text, metadata={"title": title})


def chunk(docs: Iterable[Document], *, max_words: int = 256, overlap: int = 32) -> Iterator[Document]:
    """Split documents longer than `max_words` into windows that overlap by `overlap` words."""
    if not 0 <= overlap < max_words:
        raise ValueError(f"need 0 <= overlap < max_words, got overlap={overlap}, max_words={max_words}")
    step = max_words - overlap
    for doc in docs:
        words = doc.text.split()
        if len(words) <= max_words:
            yield Document(doc.doc_id, doc.text, {**doc.metadata, PARENT: doc.doc_id})
            continue
        for n, start in enumerate(range(0, len(words) - overlap, step)):
            yield Document(
                f"{doc.doc_id}#{n}",
                " ".join(words[start : start + max_words]),
                {**doc.metadata, PARENT: doc.doc_id},
            )
