"""Reading document collections and knowledge-graph triples from disk.

Documents come from JSONL, one object per line. BEIR's layout (`_id`, `title`, `text`, `metadata`)
is read as is; `id` is accepted for `_id`. Title and text are joined for indexing, and the title is
kept in the metadata.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from actors.errors import DataError
from actors.types import Document


@dataclass(frozen=True, slots=True)
class Triple:
    head: str
    relation: str
    tail: str
    doc_id: str | None = None
    text: str | None = None


def _json_lines(path: Path) -> Iterator[tuple[int, dict]]:
    if not path.is_file():
        raise DataError(f"file not found: {path} (a JSONL file is expected here)")
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def read_documents(path: str | Path, *, text_field: str = "text") -> list[Document]:
    """Read a JSONL collection. Raises DataError naming the file and line on bad input."""
    path = Path(path)
    docs: list[Document] = []
    seen: set[str] = set()
    for lineno, obj in _json_lines(path):
        doc_id = obj.get("_id", obj.get("id"))
        body = obj.get(text_field)
        if doc_id is None or not isinstance(body, str):
            raise DataError(f"{path}:{lineno}: each line needs an `_id` (or `id`) and a string `{text_field}`")
        doc_id = str(doc_id)
        if doc_id in seen:
            raise DataError(f"{path}:{lineno}: duplicate document id {doc_id!r}")
        seen.add(doc_id)
        metadata = {str(k): str(v) for k, v in (obj.get("metadata") or {}).items()}
        title = obj.get("title") or ""
        if title:
            metadata["title"] = str(title)
        sep = " " if str(title).rstrip()[-1:] in {".", "?", "!"} else ". "
        text = f"{title}{sep}{body}" if title else body
        docs.append(Document(doc_id=doc_id, text=text, metadata=metadata))
    if not docs:
        raise DataError(f"{path}: no documents found")
    return docs


def _tsv_lines(path: Path) -> Iterator[tuple[int, dict]]:
    """head, relation, tail[, doc_id[, text]] per tab-separated line; a `head` header line is skipped."""
    if not path.is_file():
        raise DataError(f"triples file not found: {path}")
    keys = ("head", "relation", "tail", "doc_id", "text")
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            cells = line.rstrip("\n").split("\t")
            if not line.strip() or (lineno == 1 and cells[0].strip().lower() == "head"):
                continue
            if len(cells) < 3:
                raise DataError(f"{path}:{lineno}: expected head<TAB>relation<TAB>tail, got {len(cells)} column(s)")
            yield lineno, dict(zip(keys, cells, strict=False))


def read_triples(path: str | Path) -> list[Triple]:
    """Read knowledge-graph triples from JSONL or TSV (`head`, `relation`, `tail`, optional `doc_id`, `text`)."""
    path = Path(path)
    triples: list[Triple] = []
    lines = _tsv_lines(path) if path.suffix.lower() == ".tsv" else _json_lines(path)
    for lineno, obj in lines:
        try:
            head, relation, tail = (str(obj[key]).strip() for key in ("head", "relation", "tail"))
        except KeyError as exc:
            raise DataError(f"{path}:{lineno}: a triple needs `head`, `relation` and `tail`") from exc
        if not (head and relation and tail):
            raise DataError(f"{path}:{lineno}: `head`, `relation` and `tail` must be non-empty")
        doc_id = obj.get("doc_id")
        triples.append(
            Triple(head.lower(), relation, tail.lower(), str(doc_id) if doc_id else None, obj.get("text"))
        )
    if not triples:
        raise DataError(f"{path}: no triples found")
    return triples


def read_aliases(path: str | Path | None) -> dict[str, list[str]]:
    """Read `{entity: [alias, ...]}`; a missing path means no aliases."""
    if path is None:
        return {}
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise DataError(f"aliases file not found: {path}") from exc
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg})") from exc
    if not isinstance(raw, dict) or not all(isinstance(v, list) for v in raw.values()):
        raise DataError(f"{path}: expected an object mapping each entity to a list of aliases")
    return {str(k).lower(): [str(a).lower() for a in v] for k, v in raw.items()}
