"""Per-image arrays (decoded pixels, backbone features) keyed by image content.

A `ContentCache` is one folder per key (e.g. `pixels/224`, `features/<backbone>-<size>-<weights>`).
Each request for the rows of an ordered list of images (by sha256) is one `.npy` file named by
the digest of that list, with a `.keys` file beside it naming the image of each row. Asking for
the same list again (the same dataset version, or an unchanged folder imported again) opens that
one file, as fast as a cache keyed by dataset. Asking for a new list (a fixed version, a new
split) copies the rows of images any earlier file holds and computes only the unseen ones.
The `.keys` file is written after its array, so a listed file is always complete; its time is
touched on each use, so `tlcore.data.cache_budget` removes the least recently used files first.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from tlcore.records.atomic import write_atomically, write_text_atomically

COPY_CHUNK = 256  # rows copied per step: bounds memory when reusing large pixel rows


@dataclasses.dataclass(frozen=True)
class CachedRows:
    """Rows for the requested images, in request order, and how many were reused."""

    array: np.ndarray
    path: Path
    reused: int  # rows copied or loaded from earlier files rather than computed

    @property
    def all_reused(self) -> bool:
        return self.reused == len(self.array)


class ContentCache:
    """Arrays of one row per image, found by image content (sha256) in `folder`."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def rows(self, shas: Sequence[str], row_shape: tuple[int, ...], dtype,
             compute: Callable[[np.ndarray, np.ndarray], None], *, mmap: bool = False) -> CachedRows:
        """The rows of `shas` (in order): loaded, copied from earlier files, or computed.

        `compute(positions, out)` must fill `out[positions]` (positions into `shas`, sorted) for
        the images no file holds yet. With `mmap`, the result is a read-only memory map.
        """
        shas = list(shas)
        path = self.folder / f"{_digest(shas)}.npy"
        keys_path = path.with_suffix(".keys")
        if path.exists() and keys_path.exists():
            _touch(keys_path)
            return CachedRows(self._open(path, mmap), path, len(shas))
        known = self._index(exclude=keys_path)
        reused = 0

        def build(tmp: Path) -> None:
            nonlocal reused
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(len(shas), *row_shape))
            by_file: dict[Path, list[tuple[int, int]]] = {}
            missing = []
            for position, sha in enumerate(shas):
                if sha in known:
                    source, row = known[sha]
                    by_file.setdefault(source, []).append((position, row))
                else:
                    missing.append(position)
            for source, pairs in by_file.items():
                reused += _copy_rows(source, pairs, out)
            if missing:
                compute(np.array(missing, dtype=np.int64), out)
            out.flush()
            del out

        write_atomically(path, build)
        write_text_atomically(keys_path, "\n".join(shas) + "\n")
        return CachedRows(self._open(path, mmap), path, reused)

    def complete(self, shas: Sequence[str], *, mmap: bool = False) -> CachedRows | None:
        """The rows of `shas` if every image is cached already (no computing needed), else None."""
        shas = list(shas)
        path = self.folder / f"{_digest(shas)}.npy"
        if path.exists() and path.with_suffix(".keys").exists():
            _touch(path.with_suffix(".keys"))
            return CachedRows(self._open(path, mmap), path, len(shas))
        known = self._index(exclude=path.with_suffix(".keys"))
        if not shas or any(sha not in known for sha in shas):
            return None
        sample = np.load(known[shas[0]][0], mmap_mode="r")
        return self.rows(shas, sample.shape[1:], sample.dtype, _nothing_missing, mmap=mmap)

    def _index(self, exclude: Path) -> dict[str, tuple[Path, int]]:
        """sha256 -> (file, row) over every complete file in the folder."""
        index: dict[str, tuple[Path, int]] = {}
        for keys_path in sorted(self.folder.glob("*.keys")):
            array_path = keys_path.with_suffix(".npy")
            if keys_path == exclude or not array_path.exists():
                continue
            for row, sha in enumerate(keys_path.read_text().split()):
                index.setdefault(sha, (array_path, row))
        return index

    @staticmethod
    def _open(path: Path, mmap: bool) -> np.ndarray:
        return np.load(path, mmap_mode="r") if mmap else np.load(path)


def _copy_rows(source: Path, pairs: list[tuple[int, int]], out: np.ndarray) -> int:
    """Copy rows of `source` into `out` ((out position, source row) pairs); returns rows copied."""
    array = np.load(source, mmap_mode="r")
    _touch(source.with_suffix(".keys"))
    pairs.sort(key=lambda pair: pair[1])  # sequential reads
    for start in range(0, len(pairs), COPY_CHUNK):
        chunk = np.array(pairs[start:start + COPY_CHUNK])
        out[chunk[:, 0]] = array[chunk[:, 1]]
    return len(pairs)


def _touch(keys_path: Path) -> None:
    # The `.keys` file's time is when its rows were last used: the cache budget removes the oldest first.
    try:
        os.utime(keys_path)
    except OSError:  # removed meanwhile, or a read-only cache: its age only orders pruning
        pass


def _nothing_missing(positions: np.ndarray, out: np.ndarray) -> None:
    raise AssertionError(f"{len(positions)} rows were expected in the cache")  # `complete` checked them all


def _digest(shas: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(shas).encode()).hexdigest()[:32]
