"""Sharding a dense retriever by document: which shard holds a document, where its index lives,
and how the shards' answers merge back into one.

A document goes to shard `crc32(doc_id) % N`: stable across runs and machines, and independent of
the order of the collection. Each shard is its own Serve deployment holding one part of the index;
the gateway sends a query to every shard and merges their hits. Inner-product scores of a flat
index do not depend on which other vectors share the index, so the merged top-k of N shards is the
unsharded top-k, hit for hit (tests/unit/test_shards.py checks it).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

from actors.types import Hit


def shard_of(doc_id: str, num_shards: int) -> int:
    return zlib.crc32(doc_id.encode("utf-8")) % num_shards


def shard_dir(directory: Path, index: int, count: int) -> Path:
    """`ragfan ingest --shards N` writes shard i of N here, under the kind's directory."""
    return directory / f"shard-{index}-of-{count}"


def merge(answers: Iterable[Sequence[Hit]], top_k: int) -> list[Hit]:
    """The best `top_k` hits over every shard's answer, best first (ties: by doc id)."""
    hits = [hit for answer in answers for hit in answer]
    return sorted(hits, key=lambda h: (-h.score, h.doc_id))[:top_k]
