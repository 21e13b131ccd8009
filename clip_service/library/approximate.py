"""The approximate (HNSW) index of a photo index's vectors, for libraries too large to scan per query.

usearch builds it (measured against faiss in bench/RESULTS.md: the same recall, and usearch can search
an index it has not loaded, straight from a memory-mapped file, so gunicorn's workers share one copy
through the page cache as they share the vectors; faiss reads an HNSW index into each process). Its
bytes are a tensor of the photo index file itself (photo_index.py), so the vectors and their graph are
written, replaced by rename and read together, and can never belong to two different runs.

Vectors are stored in f16 (about 1.2 KB per image with the graph). A search asks the graph for a few
more candidates than wanted and ranks them by the exact float32 similarity, so scores are the exact
search's to the digit and the order among the candidates is exact.
"""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

import numpy as np

APPROXIMATE_FROM = 100_000  # images; below this the exact scan answers in a few milliseconds
CONNECTIVITY = 16  # graph edges per vector (HNSW's M)
EXPANSION_ADD = 128  # candidates kept while building (efConstruction)
EXPANSION_SEARCH = 256  # candidates kept while searching (ef). At 1,000,000 x 512 (bench/search.py):
# 128 found 0.9945 of the true top-10 of photo-like queries, 256 0.9995 with p99 under 5 ms for every
# kind of query; queries far from every photo (a text's) find far less of theirs (0.64 at 256).
SCALAR = "f16"
MIN_CANDIDATES = 20


class ApproximateIndexError(ValueError):
    """Bytes that are not a usable HNSW index of these vectors."""


def build(embeddings: np.ndarray, threads: int = 0) -> np.ndarray:
    """The HNSW index of (N, D) unit `embeddings` (row n has key n), serialised as uint8 bytes.

    It is saved to a temporary file and mapped back, so its bytes are not held twice in memory."""
    from usearch.index import Index  # only `index` and readers of large indexes need it

    index = Index(ndim=embeddings.shape[1], metric="cos", dtype=SCALAR, connectivity=CONNECTIVITY,
                  expansion_add=EXPANSION_ADD, expansion_search=EXPANSION_SEARCH, enable_key_lookups=False)
    index.add(np.arange(len(embeddings), dtype=np.uint64), np.asarray(embeddings, dtype=np.float32),
              threads=threads or (os.cpu_count() or 1), log=False)
    handle, temporary = tempfile.mkstemp(prefix="clip-hnsw-")
    os.close(handle)
    try:
        index.save(temporary)
        del index
        data = np.fromfile(temporary, dtype=np.uint8)
    finally:
        os.unlink(temporary)
    return data


class ApproximateIndex:
    """An HNSW index viewed in place (no copy) over `data`, a read-only mapping of its bytes."""

    def __init__(self, data: np.ndarray, count: int, dimensions: int, source: Path):
        from usearch.index import Index

        buffer = memoryview(data)
        try:
            meta = Index.metadata(buffer)
        except Exception:  # usearch raises plain RuntimeError/ValueError on bytes it cannot parse
            meta = None
        if not meta or meta.get("dimensions") != dimensions or meta.get("count_present") != count:
            raise ApproximateIndexError(f"the approximate index in {source} does not match its {count} "
                                        f"vectors of {dimensions} dimensions")
        self._index = Index(ndim=dimensions, metric=meta["kind_metric"], dtype=meta["kind_scalar"],
                            expansion_search=EXPANSION_SEARCH, enable_key_lookups=False)
        self._index.view(buffer)
        self._data = data  # the mapping must outlive the view
        self._lock = threading.Lock()  # one search context: a worker's threads take turns (< 1 ms each)
        self.count = count

    @property
    def depth(self) -> int:
        """Candidates the graph search keeps (HNSW's ef): more finds more of the true top-k, slower."""
        return self._index.expansion_search

    @depth.setter
    def depth(self, value: int) -> None:
        self._index.expansion_search = value

    def candidates(self, query: np.ndarray, k: int) -> np.ndarray:
        """Rows of the vectors likely nearest the (D,) `query`: a few more than k, unordered."""
        wanted = min(self.count, max(2 * k, MIN_CANDIDATES))
        with self._lock:
            found = self._index.search(np.asarray(query, dtype=np.float32), wanted, threads=1)
        return np.asarray(found.keys, dtype=np.int64)
