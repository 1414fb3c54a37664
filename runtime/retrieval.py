"""BM25 retrieval over the chunk texts of a release (bm25s)."""

from __future__ import annotations

import os
import sys

# bm25s runs a JAX top-k at import when JAX is installed, and JAX then takes 75% of every GPU's
# memory (seen on the H200: 105 of 140 GB, the benchmarks ran out of memory). Unless the host has
# already set JAX up, keep it on the CPU; BM25 top-k is tiny.
if "jax" not in sys.modules:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import bm25s  # noqa: E402


class BM25Retriever:
    def __init__(self, texts: list[str]):
        if not texts:
            raise ValueError("nothing to retrieve from: the release has no chunks")
        self.n = len(texts)
        self.index = bm25s.BM25()
        self.index.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)

    def top(self, query: str, k: int) -> list[int]:
        """Indices of the k best texts, best first."""
        k = max(1, min(k, self.n))
        docs, _ = self.index.retrieve(bm25s.tokenize([query], stopwords="en", show_progress=False), k=k,
                                      show_progress=False)
        return [int(i) for i in docs[0]]
