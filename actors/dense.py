"""Dense retrieval: sentence-transformers embeddings in a FAISS inner-product index.

Vectors are L2-normalised, so inner product is cosine similarity. `flat` is exact; `hnsw` is an
approximate graph index for large collections. Metadata filters restrict the search to matching
documents with a FAISS ID selector, so a filter never drops a match that an unfiltered search would
have ranked lower than `top_k`.
"""

from __future__ import annotations

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
from actors.types import Document, Filters, Hit, Query, filter_text

IndexType = Literal["flat", "hnsw"]
ENCODE_BATCH = 64


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
    if index_type == "flat":
        index = faiss.IndexFlatIP(dim)
    elif index_type == "hnsw":
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 200
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
    def search(self, queries: Sequence[Query]) -> list[list[Hit]]:
        if not queries:
            return []
        vectors = query_vectors(self.embedder, queries, self.index.d)
        results: list[list[Hit]] = [[] for _ in queries]
        # One FAISS call per distinct filter: unfiltered queries of a batch go together.
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, q in enumerate(queries):
            groups[_filter_key(q.filters)].append(i)
        for key, members in groups.items():
            k = max(queries[i].top_k for i in members)
            params = self._search_params(dict(key))
            if params is False:  # the filter matches no document
                continue
            k = min(k, self.index.ntotal)
            scores, ids = self.index.search(vectors[members], k, params=params)
            for row, i in enumerate(members):
                results[i] = [
                    self.documents[int(doc)].hit(float(score))
                    for score, doc in zip(scores[row][: queries[i].top_k], ids[row][: queries[i].top_k], strict=True)
                    if doc >= 0
                ]
        return results

    def _search_params(self, filters: Filters) -> faiss.SearchParameters | None | bool:
        if not filters:
            return faiss.SearchParametersHNSW(efSearch=self.ef_search) if self.index_type == "hnsw" else None
        allowed: np.ndarray | None = None
        for key, value in filters.items():
            ids = self._by_value.get((key, filter_text(value)))
            if ids is None:
                return False
            allowed = ids if allowed is None else np.intersect1d(allowed, ids)
        if allowed is None or allowed.size == 0:
            return False
        selector = faiss.IDSelectorBatch(allowed)
        if self.index_type == "hnsw":
            params = faiss.SearchParametersHNSW(sel=selector, efSearch=self.ef_search)
        else:
            params = faiss.SearchParameters(sel=selector)
        params._selector_ref = selector  # the C++ params keep a raw pointer; keep the selector alive
        return params


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
