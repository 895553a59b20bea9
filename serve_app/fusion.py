"""Fusing several ranked lists into one.

Weighted reciprocal rank fusion (Cormack, Clarke and Büttcher, SIGIR 2009): a document's fused
score is the sum, over the retrievers that returned it, of `weight / (k + rank)`, with 1-based
ranks. It needs no score calibration between retrievers, which is why it is the default: BM25
scores, cosine similarities and graph path weights live on unrelated scales.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from actors.types import Hit


@dataclass(slots=True)
class FusedHit:
    doc_id: str
    score: float
    text: str
    metadata: Mapping[str, str]
    sources: list[tuple[str, int, float]] = field(default_factory=list)  # (retriever, rank, score)


def reciprocal_rank_fusion(
    ranked: Mapping[str, Sequence[Hit]],
    *,
    weights: Mapping[str, float] | None = None,
    k: int = 60,
    top_k: int = 10,
) -> list[FusedHit]:
    """Fuse each retriever's ranked hits; deduplicate by doc id; best first.

    A document keeps the text and metadata of the retriever with the largest contribution. Ties
    are broken by the best single rank, then by doc id, so the order is deterministic.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    fused: dict[str, FusedHit] = {}
    best_share: dict[str, float] = {}
    for name, hits in ranked.items():
        weight = 1.0 if weights is None else weights.get(name, 1.0)
        seen: set[str] = set()
        for rank, hit in enumerate(hits, start=1):
            if hit.doc_id in seen:  # a retriever counts once per document, at its best rank
                continue
            seen.add(hit.doc_id)
            share = weight / (k + rank)
            entry = fused.get(hit.doc_id)
            if entry is None:
                entry = fused[hit.doc_id] = FusedHit(hit.doc_id, 0.0, hit.text, hit.metadata)
                best_share[hit.doc_id] = -1.0
            entry.score += share
            entry.sources.append((name, rank, hit.score))
            if share > best_share[hit.doc_id]:
                best_share[hit.doc_id] = share
                entry.text, entry.metadata = hit.text, hit.metadata
    order = sorted(fused.values(), key=lambda h: (-h.score, min(s[1] for s in h.sources), h.doc_id))
    return order[:top_k]
