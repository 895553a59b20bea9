"""Fusing several ranked lists into one.

Three methods, each deduplicating by doc id and recording which retrievers found each document:

- `rrf`, weighted reciprocal rank fusion (Cormack, Clarke and Büttcher, SIGIR 2009): a document
  scores the sum over retrievers of `weight / (k + rank)`, ranks from 1. It uses ranks only, so it
  needs no calibration between BM25 scores, cosine similarities and graph path weights.
- `minmax`, a convex combination of min-max normalised scores: each retriever's scores are mapped
  to [0, 1] over the hits it returned, and a document scores the weighted mean of those values
  (weights normalised to sum to 1; a retriever that did not return the document adds 0).
- `dbsf`, distribution-based score fusion: like `minmax`, but each retriever's range is taken as
  its mean ± 3 standard deviations, clipped, so one outlying score does not squash the rest.

Both score-based methods keep what ranks throw away: how far ahead the first hit is.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from actors.types import Hit
from serve_app.types import FUSION_METHODS, FusionMethod


@dataclass(slots=True)
class FusedHit:
    doc_id: str
    score: float
    text: str
    metadata: Mapping[str, str]
    sources: list[tuple[str, int, float]] = field(default_factory=list)  # (retriever, rank, score)


def _minmax(scores: np.ndarray) -> np.ndarray:
    lo, hi = scores.min(), scores.max()
    return np.ones_like(scores) if hi == lo else (scores - lo) / (hi - lo)


def _dbsf(scores: np.ndarray) -> np.ndarray:
    mean, std = scores.mean(), scores.std()
    if std == 0:
        return np.ones_like(scores)
    lo, hi = mean - 3 * std, mean + 3 * std
    return np.clip((scores - lo) / (hi - lo), 0.0, 1.0)


_NORMALISE: dict[str, Callable[[np.ndarray], np.ndarray]] = {"minmax": _minmax, "dbsf": _dbsf}


def fuse(
    ranked: Mapping[str, Sequence[Hit]],
    *,
    method: FusionMethod = "rrf",
    weights: Mapping[str, float] | None = None,
    k: int = 60,
    top_k: int = 10,
) -> list[FusedHit]:
    """Fuse each retriever's ranked hits into one list, best first.

    A document keeps the text and metadata of the retriever with the largest contribution. Ties
    are broken by the best single rank, then by doc id, so the order is deterministic.
    """
    if method not in FUSION_METHODS:
        raise ValueError(f"unknown fusion method {method!r}; valid: {', '.join(FUSION_METHODS)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    weight = {name: 1.0 if weights is None else float(weights.get(name, 1.0)) for name in ranked}
    if method != "rrf":
        total = sum(weight.values())
        weight = {n: (w / total if total > 0 else 0.0) for n, w in weight.items()}

    fused: dict[str, FusedHit] = {}
    best_share: dict[str, float] = {}
    for name, hits in ranked.items():
        first: dict[str, Hit] = {}
        for h in hits:  # a document counts once, at its best rank
            first.setdefault(h.doc_id, h)
        unique = list(first.values())
        if not unique:
            continue
        if method == "rrf":
            shares = [weight[name] / (k + rank) for rank in range(1, len(unique) + 1)]
        else:
            normalised = _NORMALISE[method](np.asarray([h.score for h in unique], dtype=np.float64))
            shares = list(weight[name] * normalised)
        for rank, (hit, share) in enumerate(zip(unique, shares, strict=True), start=1):
            entry = fused.get(hit.doc_id)
            if entry is None:
                entry = fused[hit.doc_id] = FusedHit(hit.doc_id, 0.0, hit.text, hit.metadata)
                best_share[hit.doc_id] = -1.0
            entry.score += float(share)
            entry.sources.append((name, rank, hit.score))
            if share > best_share[hit.doc_id]:
                best_share[hit.doc_id] = share
                entry.text, entry.metadata = hit.text, hit.metadata
    order = sorted(fused.values(), key=lambda h: (-h.score, min(s[1] for s in h.sources), h.doc_id))
    return order[:top_k]

