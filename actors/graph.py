"""Knowledge-graph retrieval: link the query to entities, expand k hops, rank the facts reached.

Linking has two routes. Exact: any run of query words that equals an entity name or one of its
aliases links with score 1. Semantic: the query embedding's cosine similarity to every entity name
links the closest entities above a threshold, which catches paraphrases and word order changes.

From the linked (seed) entities a breadth-first walk over the facts reaches facts up to `hops`
away. A fact's score is

    seed score * decay ** (hop - 1) * (0.5 + 0.5 * cosine(query, fact sentence))

so near facts outrank far ones, and among facts at the same distance the ones that read like the
query come first. Each hit is one fact, or the path from a seed to it when it is more than one hop
away, with the entities, relation and source document in its metadata. A search stops after
encoding and between queries when its caller cancels it (`cancel`, see actors/base.py).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from actors.data import Triple
from actors.embedder import Embedder, SharedEncoderVectors, query_vectors
from actors.errors import RetrieverFailed
from actors.types import CancelToken, Hit, Query, matches

_WORD = re.compile(r"[\w\-']+")
MAX_NGRAM = 6


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def fact_sentence(t: Triple) -> str:
    return f"{t.head} {t.relation.replace('_', ' ')} {t.tail}"


def entity_names(triples: Sequence[Triple]) -> list[str]:
    """Every entity of the graph, in the order its vectors are stored."""
    return sorted({t.head for t in triples} | {t.tail for t in triples})


class GraphRetriever:
    kind = "graph"

    def __init__(
        self,
        *,
        name: str,
        triples: Sequence[Triple],
        embedder: Embedder,
        aliases: dict[str, list[str]] | None = None,
        hops: int = 2,
        decay: float = 0.5,
        link_threshold: float = 0.45,
        max_links: int = 3,
        vectors: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        if hops < 1:
            raise ValueError(f"hops must be >= 1, got {hops}")
        self.name = name
        self.triples = list(triples)
        self.embedder = embedder
        self.hops = hops
        self.decay = decay
        self.link_threshold = link_threshold
        self.max_links = max_links
        self.entities = entity_names(self.triples)
        self._entity_id = {e: i for i, e in enumerate(self.entities)}
        # surface form (entity name or alias, as a tuple of words) -> entity
        self._surface: dict[tuple[str, ...], str] = {}
        for entity in self.entities:
            self._surface[tuple(_words(entity))] = entity
        for entity, names in (aliases or {}).items():
            if entity in self._entity_id:
                for alias in names:
                    self._surface.setdefault(tuple(_words(alias)), entity)
        # entity -> indices of facts that touch it
        self._facts_of: dict[str, list[int]] = defaultdict(list)
        for i, t in enumerate(self.triples):
            self._facts_of[t.head].append(i)
            self._facts_of[t.tail].append(i)
        # (entity vectors, fact vectors), computed once elsewhere (graph_vectors) or here, with the model
        self._entity_vectors, self._fact_vectors = vectors or (
            embedder.encode(self.entities),
            embedder.encode([fact_sentence(t) for t in self.triples]),
        )
        if self._entity_vectors.shape[0] != len(self.entities) or self._fact_vectors.shape[0] != len(self.triples):
            raise RetrieverFailed(f"{name}: the precomputed vectors do not match the graph; delete them to rebuild")

    # -- linking -------------------------------------------------------------------------
    def link(self, text: str, vector: np.ndarray | None) -> dict[str, float]:
        """Entities the query mentions, with a link score in (0, 1]; exact links only without a vector."""
        words = _words(text)
        seeds: dict[str, float] = {}
        for n in range(min(MAX_NGRAM, len(words)), 0, -1):
            for start in range(len(words) - n + 1):
                entity = self._surface.get(tuple(words[start : start + n]))
                if entity is not None:
                    seeds[entity] = 1.0
        if vector is None:
            return seeds
        sims = self._entity_vectors @ vector
        for i in np.argsort(-sims)[: self.max_links]:
            if sims[i] >= self.link_threshold:
                entity = self.entities[int(i)]
                seeds[entity] = max(seeds.get(entity, 0.0), float(sims[i]))
        return seeds

    # -- expansion -------------------------------------------------------------------------
    def _expand(self, seeds: dict[str, float]) -> dict[int, tuple[float, list[int]]]:
        """Breadth-first from the seeds: fact index -> (best path weight, path of fact indices)."""
        reached: dict[int, tuple[float, list[int]]] = {}
        frontier: dict[str, tuple[float, list[int]]] = {entity: (score, []) for entity, score in seeds.items()}
        visited = set(frontier)
        for hop in range(1, self.hops + 1):
            nxt: dict[str, tuple[float, list[int]]] = {}
            for entity, (score, path) in frontier.items():
                weight = score * self.decay ** (hop - 1)
                for f in self._facts_of[entity]:
                    if f in path:
                        continue
                    if f not in reached or reached[f][0] < weight:
                        reached[f] = (weight, [*path, f])
                    t = self.triples[f]
                    other = t.tail if t.head == entity else t.head
                    if other not in visited and (other not in nxt or nxt[other][0] < score):
                        nxt[other] = (score, [*path, f])
            visited |= set(nxt)
            frontier = nxt
        return reached

    def search(self, queries: Sequence[Query], *, cancel: CancelToken | None = None) -> list[list[Hit]]:
        if not queries:
            return []
        cancel = cancel or CancelToken()
        vectors: Sequence[np.ndarray | None] | np.ndarray
        if isinstance(self.embedder, SharedEncoderVectors) and any(q.vector is None for q in queries):
            # The gateway sends no vector when the shared encoder failed: link by name only, and
            # still answer, rather than fail with the encoder.
            vectors = [q.vector for q in queries]
        else:
            vectors = query_vectors(self.embedder, queries, self._entity_vectors.shape[1])
        results = []
        for query, vector in zip(queries, vectors, strict=True):
            cancel.check()  # after encoding, and between queries: the caller may have stopped waiting
            seeds = self.link(query.text, vector)
            reached = self._expand(seeds)
            best: dict[str, Hit] = {}  # the same fact may be stated by several sources
            for f, (weight, path) in reached.items():
                similarity = float(self._fact_vectors[f] @ vector) if vector is not None else 0.0
                hit = self._hit(path, weight * (0.5 + 0.5 * similarity), seeds)
                if matches(hit.metadata, query.filters) and (
                    hit.doc_id not in best or best[hit.doc_id].score < hit.score
                ):
                    best[hit.doc_id] = hit
            hits = sorted(best.values(), key=lambda h: (-h.score, h.doc_id))
            results.append(hits[: query.top_k])
        return results

    def _hit(self, path: list[int], score: float, seeds: dict[str, float]) -> Hit:
        fact = self.triples[path[-1]]
        steps = [fact_sentence(self.triples[i]) for i in path]
        text = "; ".join(steps) if len(steps) > 1 else steps[0]
        if fact.text:
            text = f"{text}. Source: {fact.text}"
        metadata = {
            "head": fact.head,
            "relation": fact.relation,
            "tail": fact.tail,
            "hops": str(len(path)),
            "linked_entities": ", ".join(sorted(seeds)),
        }
        if len(path) > 1:
            metadata["path"] = " -> ".join(steps)
        if fact.doc_id:
            metadata["source_id"] = fact.doc_id
        return Hit(doc_id=f"kg:{fact.head}|{fact.relation}|{fact.tail}", score=score, text=text, metadata=metadata)

    def describe(self) -> dict[str, Any]:
        return {
            "num_facts": len(self.triples),
            "num_entities": len(self.entities),
            "num_aliases": len(self._surface) - len(self.entities),
            "hops": self.hops,
            "model": self.embedder.name,
            "dim": int(self._entity_vectors.shape[1]),
        }

    def check(self) -> None:
        if not self.triples or self._entity_vectors.shape[0] != len(self.entities):
            raise RetrieverFailed(f"{self.name}: knowledge graph is not loaded")
