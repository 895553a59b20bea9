"""Dense retrieval: sentence-transformers embeddings in a FAISS inner-product index.

Vectors are L2-normalised, so inner product is cosine similarity. `flat` is exact; `hnsw` is an
approximate graph index for large collections.

Metadata filters restrict the search to the matching documents, so a match ranked below `top_k` by
an unfiltered search is still found. What holds depends on the index:

- `flat`: a filtered search is exact. A FAISS ID selector keeps only the matches, and every
  document is scored, so it returns the `top_k` best matches, hit for hit.
- `hnsw`: a selector alone is not enough. The graph walk keeps `efSearch` candidates but counts only
  matches, so a filter that matches few documents finds few of them: on 5,000 clustered vectors, a
  filter matching 0.5% of them recalled 49% of flat's top 10 (docs/QUALITY.md). So a filter that
  matches at most `EXACT_FILTER_MAX` documents scores just those, exactly: the same answer as
  flat. A broader filter walks the graph with `efSearch` widened by the inverse of the share it
  matches. That finds matches spread over the collection, but not always matches that all lie far
  from the query: approximate, like an unfiltered HNSW search.

A search stops between encoding and the index, and between its index calls, when its caller
cancels it (`cancel`, see actors/base.py).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np
from tqdm.auto import tqdm

from actors.docstore import DocStore, metadata_index, write_docstore
from actors.embedder import Embedder, query_vectors
from actors.errors import RetrieverFailed
from actors.types import CancelToken, Document, Filters, Hit, Query, filter_text

IndexType = Literal["flat", "hnsw"]
ENCODE_BATCH = 64
# faiss's type stubs lack the HNSW search parameters and the `sel` keyword; both exist at run time.
SearchParametersHNSW: Any = faiss.SearchParametersHNSW  # type: ignore[attr-defined]
SearchParameters: Any = faiss.SearchParameters
# An hnsw filter matching at most this many documents scores them all (about a millisecond per
# query at 384 dimensions) instead of walking the graph, so its answer is flat's.
EXACT_FILTER_MAX = 20_000


def embed_texts(embedder: Embedder, texts: Sequence[str], *, progress: bool, desc: str) -> np.ndarray:
    """Encode texts in batches in this process, with a progress bar a person can watch."""
    out = np.zeros((len(texts), embedder.dim), dtype=np.float32)
    with tqdm(total=len(texts), desc=desc, unit="doc", disable=not progress) as bar:
        for start in range(0, len(texts), ENCODE_BATCH):
            batch = texts[start : start + ENCODE_BATCH]
            out[start : start + len(batch)] = embedder.encode(batch)
            bar.update(len(batch))
    return out


def make_index(vectors: np.ndarray, index_type: IndexType, *, hnsw_m: int = 32) -> faiss.Index:
    dim = vectors.shape[1]
    index: faiss.Index
    if index_type == "flat":
        index = faiss.IndexFlatIP(dim)
    elif index_type == "hnsw":
        hnsw = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = 200
        index = hnsw
    else:
        raise ValueError(f"unknown index type {index_type!r}; valid: flat, hnsw")
    index.add(vectors)
    return index


class DenseRetriever:
    kind = "dense"

    def __init__(
        self,
        *,
        name: str,
        documents: Sequence[Document],
        index: faiss.Index,
        embedder: Embedder,
        index_type: IndexType = "flat",
        ef_search: int = 128,
    ) -> None:
        if index.ntotal != len(documents):
            raise RetrieverFailed(f"{name}: index holds {index.ntotal} vectors for {len(documents)} documents")
        if index.d != embedder.dim:
            raise RetrieverFailed(
                f"{name}: index dimension {index.d} does not match model {embedder.name} ({embedder.dim}); "
                "rebuild the index with this model"
            )
        self.name = name
        self.documents = documents  # a list, or a DocStore that reads from disk on demand
        self.index = index
        self.embedder = embedder
        self.index_type = index_type
        self.ef_search = ef_search
        self._by_value = metadata_index(documents)

    # -- building and storing ------------------------------------------------------------
    @classmethod
    def from_documents(
        cls,
        *,
        name: str,
        documents: Sequence[Document],
        embedder: Embedder,
        index_type: IndexType = "flat",
        progress: bool = False,
    ) -> DenseRetriever:
        vectors = embed_texts(embedder, [d.text for d in documents], progress=progress, desc=f"embedding {name}")
        return cls(
            name=name,
            documents=documents,
            index=make_index(vectors, index_type),
            embedder=embedder,
            index_type=index_type,
        )

    def save(self, directory: Path) -> dict[str, Any]:
        write_docstore(directory, self.documents)
        faiss.write_index(self.index, str(directory / "index.faiss"))
        return {
            "kind": self.kind,
            "model": self.embedder.name,
            "dim": self.embedder.dim,
            "num_docs": len(self.documents),
            "index_type": self.index_type,
        }

    @classmethod
    def load(cls, directory: Path, manifest: dict[str, Any], *, name: str, embedder: Embedder) -> DenseRetriever:
        if manifest.get("dim") != embedder.dim:
            raise RetrieverFailed(
                f"{directory / 'index.faiss'}: built with dimension {manifest.get('dim')} "
                f"({manifest.get('model')}), but the model {embedder.name} has {embedder.dim}; "
                f"delete {directory} or point `model` at the model the index was built with"
            )
        return cls(
            name=name,
            documents=DocStore(directory),
            index=faiss.read_index(str(directory / "index.faiss")),
            embedder=embedder,
            index_type=manifest["index_type"],
        )

    # -- serving -------------------------------------------------------------------------
    def search(self, queries: Sequence[Query], *, cancel: CancelToken | None = None,
               hidden: np.ndarray | None = None) -> list[list[Hit]]:
        """`hidden`: sorted positions of documents never to answer (the tombstones of actors/delta.py).
        They leave a filter's allowed set; an unfiltered search asks for that many more hits and drops
        them, so a flat index stays exact."""
        if not queries:
            return []
        cancel = cancel or CancelToken()
        vectors = query_vectors(self.embedder, queries, self.index.d)
        results: list[list[Hit]] = [[] for _ in queries]
        # One FAISS call per distinct filter: unfiltered queries of a batch go together.
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, q in enumerate(queries):
            groups[_filter_key(q.filters)].append(i)
        for key, members in groups.items():
            cancel.check()  # after encoding, and between the index calls of a batch
            allowed = self._allowed(dict(key))
            if allowed is not None and hidden is not None:
                allowed = np.setdiff1d(allowed, hidden, assume_unique=True)
            if allowed is not None and allowed.size == 0:  # the filter matches no document
                continue
            k = max(queries[i].top_k for i in members)
            extra = hidden.size if hidden is not None and allowed is None else 0
            scores, ids = self._search(vectors[members], k + extra, allowed)
            for row, i in enumerate(members):
                keep = ids[row] >= 0
                if extra and hidden is not None:
                    keep &= ~np.isin(ids[row], hidden)
                top = queries[i].top_k
                results[i] = [self.documents[int(doc)].hit(float(score))
                              for score, doc in zip(scores[row][keep][:top], ids[row][keep][:top], strict=True)]
        return results

    def _allowed(self, filters: Filters) -> np.ndarray | None:
        """Positions of the documents that match every filter (sorted); None when there is no filter."""
        if not filters:
            return None
        allowed: np.ndarray | None = None
        for key, value in filters.items():
            ids = self._by_value.get((key, filter_text(value)), np.empty(0, dtype=np.int64))
            allowed = ids if allowed is None else np.intersect1d(allowed, ids)
        return allowed

    def _search(self, vectors: np.ndarray, k: int, allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of the top k, each row best first; ids of -1 pad a short row."""
        hnsw = self.index_type == "hnsw"
        if allowed is None:
            params = SearchParametersHNSW(efSearch=self.ef_search) if hnsw else None
            return self.index.search(vectors, min(k, self.index.ntotal), params=params)
        k = min(k, allowed.size)
        if hnsw and allowed.size <= EXACT_FILTER_MAX:
            return self._exact(vectors, k, allowed)
        selector = faiss.IDSelectorBatch(allowed)  # referenced until the search returns: params hold a raw pointer
        if hnsw:
            # The walk keeps efSearch candidates but counts only matches: widen it by the inverse of the
            # share of documents the filter matches, so about efSearch of them are among the candidates.
            ef = min(self.index.ntotal, math.ceil(self.ef_search * self.index.ntotal / allowed.size))
            params = SearchParametersHNSW(sel=selector, efSearch=max(self.ef_search, ef))
        else:
            params = SearchParameters(sel=selector)
        return self.index.search(vectors, k, params=params)

    def _exact(self, vectors: np.ndarray, k: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Score every allowed document: what a flat index answers, without walking the graph."""
        storage: faiss.Index = self.index.storage  # type: ignore[attr-defined]  # the HNSW graph's flat vectors
        scores = vectors @ storage.reconstruct_batch(allowed).T
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        top_scores = np.take_along_axis(scores, top, axis=1)
        order = np.argsort(-top_scores, axis=1, kind="stable")
        return np.take_along_axis(top_scores, order, axis=1), allowed[np.take_along_axis(top, order, axis=1)]

    def describe(self) -> dict[str, Any]:
        return {
            "num_docs": len(self.documents),
            "model": self.embedder.name,
            "dim": self.embedder.dim,
            "device": getattr(self.embedder, "device", "cpu"),
            "index_type": self.index_type,
            "metadata_keys": sorted({key for key, _ in self._by_value}),
        }

    def check(self) -> None:
        if self.index is None or self.index.ntotal == 0 or self.index.ntotal != len(self.documents):
            raise RetrieverFailed(f"{self.name}: dense index is not loaded or is empty")


def _filter_key(filters: Filters | None) -> tuple:
    return tuple(sorted((k, filter_text(v)) for k, v in (filters or {}).items()))
