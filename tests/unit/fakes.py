"""A deterministic stand-in for sentence-transformers, so unit tests need no model and no Ray.

Each word hashes to a signed bucket; a text is the normalised sum of its words. Texts that share
words are similar, texts that share none are (nearly) orthogonal: enough to test ranking logic.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

import numpy as np


class HashingEmbedder:
    def __init__(self, dim: int = 256, name: str = "fake-hashing") -> None:
        self.dim = dim
        self.name = name
        self.calls: list[int] = []  # batch sizes seen, to check batching

    def _vector(self, text: str) -> np.ndarray:
        v = np.zeros(self.dim, dtype=np.float32)
        for word in re.findall(r"\w+", text.lower()):
            h = int.from_bytes(hashlib.sha256(word.encode()).digest()[:8], "little")
            v[h % self.dim] += 1.0 if (h >> 32) & 1 else -1.0
        norm = np.linalg.norm(v)
        return v / norm if norm else v

    def encode(self, texts: Sequence[str], *, batch_size: int = 32) -> np.ndarray:
        self.calls.append(len(texts))
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([self._vector(t) for t in texts])
