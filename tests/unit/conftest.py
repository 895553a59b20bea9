from __future__ import annotations

import pytest

from actors.types import Document
from tests.unit.fakes import HashingEmbedder


@pytest.fixture
def embedder() -> HashingEmbedder:
    return HashingEmbedder()


@pytest.fixture
def docs() -> list[Document]:
    return [
        Document("d1", "Vitamin D deficiency and multiple sclerosis risk", {"domain": "neuro"}),
        Document("d2", "Metformin lowers blood glucose in type 2 diabetes", {"domain": "metabolism"}),
        Document("d3", "Aspirin reduces the risk of colorectal cancer", {"domain": "oncology"}),
        Document("d4", "Running and exercise improve insulin sensitivity", {"domain": "metabolism"}),
        Document("d5", "Tumour suppressor p53 is mutated in many cancers", {"domain": "oncology"}),
    ]
