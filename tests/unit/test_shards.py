import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from actors.dense import DenseRetriever
from actors.errors import ConfigError
from actors.shards import merge, shard_dir, shard_of
from actors.spec import DenseOptions, RetrieverSpec
from actors.types import Document, Query
from serve_app.config import parse_config
from tests.unit.fakes import HashingEmbedder

WORDS = ("vitamin insulin cancer tumour aspirin glucose exercise sclerosis statin malaria vaccine gut "
         "microbiota obesity p53 metformin running risk children heart").split()


class JitteredEmbedder(HashingEmbedder):
    """The hashing embedder plus a small per-text offset: no two documents score exactly alike."""

    def _vector(self, text: str) -> np.ndarray:
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
        v = super()._vector(text) + 0.05 * np.random.default_rng(seed).standard_normal(self.dim).astype(np.float32)
        return v / np.linalg.norm(v)


def collection(n: int = 120) -> list[Document]:
    # every document a different mix of words, so scores rarely tie
    return [
        Document(f"doc{i}", " ".join(WORDS[(i * k) % len(WORDS)] for k in range(1, 2 + i % 7)) + f" item{i}",
        {"domain": ["neuro", "onco", "metab"][i % 3]})
        for i in range(n)
    ]


def test_shard_of_is_stable_and_spreads_documents():
    assert shard_of("doc7", 4) == shard_of("doc7", 4)
    counts = Counter(shard_of(f"doc{i}", 4) for i in range(1000))
    assert set(counts) == {0, 1, 2, 3} and min(counts.values()) > 200
    assert shard_dir(Path("out/dense"), 1, 4) == Path("out/dense/shard-1-of-4")


@pytest.mark.parametrize("num_shards", [2, 3, 5])
def test_shard_merge_equals_the_unsharded_answer_exactly(num_shards):
    embedder = JitteredEmbedder()
    docs = collection()
    whole = DenseRetriever.from_documents(name="whole", documents=docs, embedder=embedder)
    shards = [
        DenseRetriever.from_documents(
            name=f"s{i}", documents=[d for d in docs if shard_of(d.doc_id, num_shards) == i], embedder=embedder
        )
        for i in range(num_shards)
    ]
    assert sum(len(s.documents) for s in shards) == len(docs)
    queries = [Query("insulin and glucose", top_k=10), Query("tumour p53 cancer", top_k=25),
               Query("vaccine for children", top_k=5, filters={"domain": "onco"})]
    for q in queries:
        [expected] = whole.search([q])
        merged = merge((s.search([q])[0] for s in shards), q.top_k)
        assert [(h.doc_id, h.score) for h in merged] == [(h.doc_id, h.score) for h in expected]


def test_sharding_is_dense_only_and_names_one_deployment_per_shard():
    raw = {"retrievers": [{"name": "corpus", "kind": "dense", "data": "d.jsonl", "shards": 3}]}
    r = parse_config(raw, base_dir=Path(".")).retrievers[0]
    assert r.deployment_names() == ["corpus-shard0", "corpus-shard1", "corpus-shard2"]
    assert [s.shard for s in r.specs(None)] == [(0, 3), (1, 3), (2, 3)]
    raw["retrievers"][0]["kind"] = "keyword"
    with pytest.raises(ConfigError, match="`shards` applies to kind 'dense' only"):
        parse_config(raw, base_dir=Path("."))
    with pytest.raises(ValueError, match="shard 3 of 3"):
        RetrieverSpec(name="c", options=DenseOptions(), data="d.jsonl", shard=(3, 3))
