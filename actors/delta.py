"""A retriever that takes writes: an immutable base version, plus the writes after it, searched as one.

Neither index under ragfan changes in place: bm25s cannot add a document without changing every
other's score, and FAISS HNSW cannot remove a vector. So, as search engines do, a replica keeps
its base version as it was opened and puts the writes of the log (actors/wal.py) beside it:

- the *delta*: the documents upserted since the base, each with its vector (dense) or its terms
  (keyword), searched exhaustively: it stays small, because it is merged away;
- the *tombstones*: the base's documents that a write replaced or deleted (by id, or by the id of
  the document a chunk was cut from, `metadata.parent`), which the base search skips.

A search asks the base for `top_k` plus the number of tombstones (a flat index is then still
exact) and drops them, or, with a metadata filter, removes them from the filter's allowed set;
then it merges the base's and the delta's hits by score, as the shards' answers are merged.

Scoring the delta:
- dense: the same cosine against the same model's vectors as the base: exact.
- keyword: BM25 with the base's statistics, as bm25s scored the base (Lucene's idf, Robertson's tf
  part, k1 and b of the base): document frequency and count of the base plus the delta's own, and
  the base's average length. The base's scores stay as built. So a delta document scores about
  what it would if it had been in the base; the merge rebuilds the index with exact statistics.
  docs/BENCHMARKS.md measures the difference in nDCG.

`save` writes the merged state (base minus tombstones, plus the delta) as a new version; the
version's manifest records `log_seq`, the last record it holds, and a replica that opens it
replays the log from the record after.
"""

from __future__ import annotations

import math
import threading
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from actors.base import Retriever
from actors.dense import DenseRetriever, make_index
from actors.embedder import query_vectors
from actors.errors import RetrieverFailed
from actors.keyword import KeywordRetriever
from actors.shards import merge
from actors.sources import PARENT
from actors.types import CancelToken, Document, Hit, Query, matches
from actors.wal import LogReader, decode_vector, encode_vector  # noqa: F401  (encode_vector: re-exported)


class LiveRetriever:
    """`base` and the log's writes to `deployment` after `base_seq` (see the module docstring)."""

    def __init__(self, base: Retriever, *, deployment: str, base_seq: int = 0, touched: int = 0,
                 log_dir: Path | None = None) -> None:
        """`base_seq`: the last log record the base holds; `touched`: of those, the last addressed to this
        deployment. `log_dir`: the log to read on from `base_seq` (`catch_up`); None: records come
        through `apply`."""
        if not isinstance(base, DenseRetriever | KeywordRetriever):
            raise RetrieverFailed(f"{base.name}: a {base.kind} retriever does not take writes")
        self.base = base
        self.name, self.kind = base.name, base.kind
        self.deployment = deployment
        self.base_seq = base_seq
        self.applied = base_seq  # the last record read from the log
        self.touched = touched  # the last record that changed what this retriever answers
        self._lock = threading.Lock()
        self._positions: dict[str, list[int]] | None = None  # base id (and parent id) -> positions, when first needed
        self._hidden: set[int] = set()
        self.hidden = np.empty(0, dtype=np.int64)  # replaced, never changed in place: a search reads one snapshot
        self._docs: dict[str, Document] = {}  # the delta, by id, in the order written
        self._vectors: dict[str, np.ndarray] = {}
        self._matrix: tuple[list[str], np.ndarray] | None = None  # the delta's vectors stacked, rebuilt on change
        self._terms: dict[str, Counter] = {}  # keyword: each delta document's term counts
        self._df: Counter = Counter()
        self._stats: tuple[int, float, Any] | None = None  # keyword: base N, average length, df lookup
        self._reader = LogReader(log_dir, after=base_seq) if log_dir is not None else None

    def catch_up(self, upto: int) -> int:
        """Read the log on up to seq `upto` and apply it; returns how many records changed this retriever.
        One caller at a time (the replica's writes loop, or its opening)."""
        changed = self.apply(self._reader.read(upto) if self._reader is not None else [])
        # Every record up to `upto` that the log still holds is applied now. One it no longer holds was
        # merged away before this version was pinned: waiting for it would ask the hub again forever.
        with self._lock:
            self.applied = max(self.applied, upto)
        if self._reader is not None:
            self._reader.after = max(self._reader.after, upto)
        return changed

    # -- applying the log ---------------------------------------------------------------------
    def apply(self, records: Iterable[Mapping[str, Any]]) -> int:
        """Apply the log's records in order (those after `applied` and addressed here); returns how many
        changed this retriever."""
        changed = 0
        with self._lock:
            for record in records:
                seq = record["seq"]
                if seq <= self.applied:
                    continue
                self.applied = seq
                if self.deployment not in record["to"]:
                    continue
                self._remove(record["id"])
                if record["op"] == "upsert":
                    self._add(record)
                self.touched = seq
                changed += 1
            if changed:
                self.hidden = np.fromiter(sorted(self._hidden), dtype=np.int64, count=len(self._hidden))
                self._matrix = None
        return changed

    def _base_positions(self) -> dict[str, list[int]]:
        if self._positions is None:
            positions: dict[str, list[int]] = defaultdict(list)
            for i, doc in enumerate(self.base.documents):
                positions[doc.doc_id].append(i)
                parent = doc.metadata.get(PARENT)
                if parent and parent != doc.doc_id:
                    positions[parent].append(i)
            self._positions = dict(positions)
        return self._positions

    def _remove(self, doc_id: str) -> None:
        self._hidden.update(self._base_positions().get(doc_id, ()))
        if self._docs.pop(doc_id, None) is not None:
            self._vectors.pop(doc_id, None)
            terms = self._terms.pop(doc_id, None)
            if terms is not None:
                self._df.subtract(terms.keys())

    def _add(self, record: Mapping[str, Any]) -> None:
        doc = Document(record["id"], record["text"], dict(record.get("metadata") or {}))
        if isinstance(self.base, DenseRetriever):
            model = self.base.embedder.name
            encoded = (record.get("vectors") or {}).get(model)
            if encoded is None:
                raise RetrieverFailed(f"{self.name}: log record {record['seq']} carries no vector for {model}")
            vector = decode_vector(encoded)
            if vector.shape[0] != self.base.index.d:
                raise RetrieverFailed(f"{self.name}: log record {record['seq']} has a {vector.shape[0]}-dimension "
                                      f"vector, the index {self.base.index.d}")
            self._vectors[doc.doc_id] = vector
        else:
            terms = Counter(self._tokens([doc.text])[0])
            self._terms[doc.doc_id] = terms
            self._df.update(terms.keys())
        self._docs[doc.doc_id] = doc

    # -- searching ----------------------------------------------------------------------------
    def search(self, queries: Sequence[Query], *, cancel: CancelToken | None = None) -> list[list[Hit]]:
        if not queries:
            return []
        if isinstance(self.base, DenseRetriever):  # encode once, for the base and the delta
            vectors = query_vectors(self.base.embedder, queries, self.base.index.d)
            queries = [replace(q, vector=v) for q, v in zip(queries, vectors, strict=True)]
        with self._lock:
            hidden = self.hidden
            extra = self._search_delta(queries) if self._docs else None
        found = self.base.search(queries, cancel=cancel, hidden=hidden if hidden.size else None)
        if extra is None:
            return found
        return [merge((a, b), q.top_k) for a, b, q in zip(found, extra, queries, strict=True)]

    def _search_delta(self, queries: Sequence[Query]) -> list[list[Hit]]:
        if isinstance(self.base, DenseRetriever):
            if self._matrix is None:
                ids = list(self._vectors)
                self._matrix = ids, np.stack([self._vectors[i] for i in ids])
            ids, matrix = self._matrix
            scores = np.stack([q.vector for q in queries]) @ matrix.T
            return [self._top(ids, row, q) for row, q in zip(scores, queries, strict=True)]
        tokens = self._tokens([q.text for q in queries])
        ids = list(self._terms)
        out = []
        for q, words in zip(queries, tokens, strict=True):
            row = np.array([self._bm25(words, self._terms[i]) for i in ids], dtype=np.float32)
            out.append(self._top(ids, row, q, positive=True))
        return out

    def _top(self, ids: list[str], scores: np.ndarray, query: Query, *, positive: bool = False) -> list[Hit]:
        order = np.argsort(-scores, kind="stable")
        hits = []
        for i in order:
            doc = self._docs[ids[i]]
            if (positive and scores[i] <= 0) or not matches(doc.metadata, query.filters):
                continue
            hits.append(doc.hit(float(scores[i])))
            if len(hits) == query.top_k:
                break
        return hits

    def _tokens(self, texts: list[str]) -> list[list[str]]:
        assert isinstance(self.base, KeywordRetriever)
        return self.base.tokenize(texts)

    def _bm25(self, words: list[str], terms: Counter) -> float:
        """BM25 of one delta document for the query's words, with the base's statistics (see above)."""
        assert isinstance(self.base, KeywordRetriever)
        if self._stats is None:
            self._stats = self.base.statistics()
        n_base, avg_len, df_base = self._stats
        n = n_base + len(self._docs)
        length = sum(terms.values())
        k1, b = self.base.k1, self.base.b
        score = 0.0
        for w in words:
            tf = terms.get(w, 0)
            if tf:
                df = df_base(w) + self._df[w]
                idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
                score += idf * tf / (k1 * (1 - b + b * length / avg_len) + tf)
        return score

    # -- merging ------------------------------------------------------------------------------
    def save(self, directory: Path) -> dict[str, Any]:
        """Write the merged state as a complete version into `directory`: its manifest fields."""
        with self._lock:  # the delta as of one record: searches wait only for this copy, not the write-out
            seq, touched, hidden = self.applied, self.touched, self.hidden
            written = list(self._docs.values())
            delta = [self._vectors[d.doc_id] for d in written] if self._vectors else []
        gone = set(hidden.tolist())  # the base never changes: read it without the lock
        docs = [d for i, d in enumerate(self.base.documents) if i not in gone] + written
        if not docs:
            raise RetrieverFailed(f"{self.name}: every document was deleted; a version needs at least one")
        merged: DenseRetriever | KeywordRetriever
        if isinstance(self.base, DenseRetriever):
            index = self.base.index
            base_vectors = index.reconstruct_n(0, index.ntotal)  # exact for flat, and HNSW's flat storage
            keep = np.setdiff1d(np.arange(index.ntotal), hidden)
            vectors = np.vstack([base_vectors[keep], *([np.stack(delta)] if delta else [])]).astype(np.float32)
            merged = DenseRetriever(name=self.name, documents=docs, index=make_index(vectors, self.base.index_type),
                                    embedder=self.base.embedder, index_type=self.base.index_type)
        else:
            merged = KeywordRetriever(name=self.name, documents=docs, language=self.base.language,
                                      k1=self.base.k1, b=self.base.b)
        return {**merged.save(directory), "log_seq": seq, "log_touched": touched, "build": "merge"}

    # -- the rest of the Retriever protocol --------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        described = self.base.describe()
        return {**described, "num_docs": described["num_docs"] - int(self.hidden.size) + len(self._docs),
                "writes": {"applied": self.applied, "touched": self.touched, "base_seq": self.base_seq,
                           "delta_docs": len(self._docs), "tombstones": int(self.hidden.size)}}

    def check(self) -> None:
        self.base.check()
