"""Nearest neighbours of unit-length feature rows by cosine similarity, for the audit's near-duplicates
and outliers.

Up to `exact_up_to` rows the search compares every pair (faiss' flat index, in blocks it bounds).
Above that, comparing every pair makes the time per photo grow with the dataset (100,000 photos are
5 billion pairs), so an inverted-file index takes over: k-means on a sample groups the rows into
cells of about `cell_rows`, and each row is compared only with the rows of the `probes` cells whose
centres are nearest to it. Work per photo then stays the same whatever the dataset's size; the price
is that a neighbour in a cell no probe reaches is missed (bench/audit_neighbours.py measures how often).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

EXACT_UP_TO = 20_000  # rows searched exactly; 20,000 rows are 2e8 pairs, under 2 s per search on one core
CELL_ROWS = 128  # rows per cell of the inverted-file index, on average
PROBES = 8  # cells each query compares with: about 1,000 rows, 1 % of 100,000
TRAIN_PER_CELL = 40  # k-means sample per cell (faiss warns below 39)
QUERY_ROWS = 4096  # rows queried at once: bounds the results held in memory


class NeighbourIndex:
    """The rows of `unit` (float32, unit length), searchable by inner product (= cosine similarity)."""

    def __init__(self, unit: np.ndarray, *, exact_up_to: int = EXACT_UP_TO, cell_rows: int = CELL_ROWS,
                 probes: int = PROBES, query_rows: int = QUERY_ROWS, seed: int = 0):
        import faiss

        self.unit = np.ascontiguousarray(unit, dtype=np.float32)
        self.query_rows = max(1, query_rows)
        n, dims = self.unit.shape
        self.exact = n <= exact_up_to
        if self.exact:
            self.index = faiss.IndexFlatIP(dims)
        else:
            cells = max(1, n // cell_rows)
            self.index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dims), dims, cells, faiss.METRIC_INNER_PRODUCT)
            self.index.cp.seed = seed
            self.index.cp.niter = 10
            sample = np.sort(np.random.default_rng(seed).choice(n, min(n, TRAIN_PER_CELL * cells), replace=False))
            self.index.train(self.unit[sample])
            self.index.nprobe = min(probes, cells)
        self.index.add(self.unit)

    def _queries(self) -> Iterator[tuple[int, np.ndarray]]:
        for start in range(0, len(self.unit), self.query_rows):
            yield start, self.unit[start:start + self.query_rows]

    def pairs_at_least(self, threshold: float) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(rows i, rows j, similarities) of the pairs with similarity >= `threshold`, i < j, each pair
        once, a batch of queries at a time (i ascending). Each pair is taken from row i's search: with
        the inverted-file index, a pair that only row j's probes reach is missed."""
        for start, queries in self._queries():
            limits, similarity, found = self.index.range_search(queries, float(np.nextafter(threshold, -1)))
            rows = start + np.repeat(np.arange(len(queries)), np.diff(limits.astype(np.int64)))
            keep = (rows < found) & (similarity >= threshold)
            yield rows[keep], found[keep], similarity[keep]

    def mean_nearest_similarity(self, k: int) -> np.ndarray:
        """Per row, the mean similarity to its `k` most similar other rows."""
        means = np.empty(len(self.unit), np.float32)
        for start, queries in self._queries():
            similarity, found = self.index.search(queries, k + 1)
            rows = start + np.arange(len(queries))[:, None]
            # Drop each row itself (an exact copy of it may come first) and what no probed cell held.
            others = (found != rows) & (found >= 0)
            others &= np.cumsum(others, axis=1) <= k
            means[start:start + len(queries)] = np.where(others, similarity, 0).sum(axis=1) / \
                np.maximum(others.sum(axis=1), 1)
        return means
