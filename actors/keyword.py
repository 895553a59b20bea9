"""Keyword retrieval: BM25 (bm25s) over stemmed, stopword-filtered tokens.

Built in memory from a `data` file when a replica starts (a second or two for tens of thousands of
documents), or loaded from artifacts that `ragfan ingest` wrote: the BM25 sparse matrices and the
on-disk document store. A search stops between queries when its caller cancels it (`cancel`,
see actors/base.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import bm25s
import numpy as np
import Stemmer

from actors.docstore import DocStore, metadata_index, write_docstore
from actors.errors import RetrieverFailed
from actors.types import CancelToken, Document, Hit, Query, filter_text


class KeywordRetriever:
    kind = "keyword"

    def __init__(
        self,
        *,
        name: str,
        documents: Sequence[Document],
        language: str = "english",
        k1: float = 1.5,
        b: float = 0.75,
        bm25: bm25s.BM25 | None = None,
        avg_doc_len: float | None = None,
    ) -> None:
        self.name = name
        self.documents = documents  # a list, or a DocStore that reads from disk on demand
        self.language = language
        try:
            self._stemmer = Stemmer.Stemmer(language)
        except KeyError as exc:
            raise RetrieverFailed(f"{name}: no Snowball stemmer for language {language!r}") from exc
        self._stopwords = "en" if language == "english" else None
        self.avg_doc_len = avg_doc_len  # the average document length in tokens, for scoring writes (actors/delta.py)
        if bm25 is None:
            corpus_tokens = bm25s.tokenize(
                [d.text for d in documents], stopwords=self._stopwords, stemmer=self._stemmer, show_progress=False
            )
            bm25 = bm25s.BM25(k1=k1, b=b)
            bm25.index(corpus_tokens, show_progress=False)
            self.avg_doc_len = sum(map(len, corpus_tokens.ids)) / max(1, len(corpus_tokens.ids))
        self._bm25 = bm25
        self.k1, self.b = bm25.k1, bm25.b
        self._vocab = bm25.vocab_dict
        self._by_value = metadata_index(documents)

    def save(self, directory: Path) -> dict[str, Any]:
        write_docstore(directory, self.documents)
        self._bm25.save(directory, show_progress=False)
        return {"kind": self.kind, "num_docs": len(self.documents), "language": self.language,
                "avg_doc_len": self.statistics()[1]}

    @classmethod
    def load(cls, directory: Path, manifest: dict[str, Any], *, name: str) -> KeywordRetriever:
        return cls(
            name=name,
            documents=DocStore(directory),
            language=manifest.get("language", "english"),
            bm25=bm25s.BM25.load(directory, mmap=True),
            avg_doc_len=manifest.get("avg_doc_len"),
        )

    def tokenize(self, texts: list[str]) -> list[list[str]]:
        """Texts as this index's terms: stemmed, stopwords out."""
        return bm25s.tokenize(texts, stopwords=self._stopwords, stemmer=self._stemmer, return_ids=False,
                              show_progress=False)

    def statistics(self) -> tuple[int, float, Callable[[str], int]]:
        """(documents, their average length in terms, a term's document frequency), as the index was built.

        An index saved by an older ragfan has no average length: it is estimated from up to 2,000
        of its documents."""
        if self.avg_doc_len is None:
            sample = [d.text for d in self.documents[:: max(1, len(self.documents) // 2000)]]
            self.avg_doc_len = sum(map(len, self.tokenize(sample))) / max(1, len(sample))
        indptr = self._bm25.scores["indptr"]

        def df(term: str) -> int:
            i = self._vocab.get(term)
            return 0 if i is None else int(indptr[i + 1] - indptr[i])

        return len(self.documents), self.avg_doc_len, df

    def search(self, queries: Sequence[Query], *, cancel: CancelToken | None = None,
               hidden: np.ndarray | None = None) -> list[list[Hit]]:
        """`hidden`: positions of documents never to answer (the tombstones of actors/delta.py)."""
        if not queries:
            return []
        cancel = cancel or CancelToken()
        tokens = self.tokenize([q.text for q in queries])
        results: list[list[Hit]] = []
        for query, words in zip(queries, tokens, strict=True):
            cancel.check()  # between queries: the caller may have stopped waiting
            words = [w for w in words if w and w in self._vocab]
            if not words:  # nothing in the query occurs in the collection
                results.append([])
                continue
            mask = self._mask(query)
            if mask is not None and not mask.any():
                results.append([])
                continue
            scores = self._bm25.get_scores(words, weight_mask=mask)
            if hidden is not None:
                scores[hidden] = 0.0
            k = min(query.top_k, len(self.documents))
            top = np.argpartition(-scores, k - 1)[:k]
            top = top[np.argsort(-scores[top], kind="stable")]
            results.append([self.documents[int(i)].hit(float(scores[i])) for i in top if scores[i] > 0])
        return results

    def _mask(self, query: Query) -> np.ndarray | None:
        if not query.filters:
            return None
        mask = np.ones(len(self.documents), dtype=np.float32)
        for key, value in query.filters.items():
            keep = np.zeros_like(mask)
            keep[self._by_value.get((key, filter_text(value)), [])] = 1.0
            mask *= keep
        return mask


    def describe(self) -> dict[str, Any]:
        return {"num_docs": len(self.documents), "language": self.language, "vocab_size": len(self._vocab)}

    def check(self) -> None:
        if not self.documents or not self._vocab:
            raise RetrieverFailed(f"{self.name}: keyword index is empty")
