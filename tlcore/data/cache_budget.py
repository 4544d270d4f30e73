"""The caches' size budget: `$TLCORE_CACHE_GB` bounds the data home's pixel and feature caches.

The caches (`tlcore.data.content_cache`) grow with every dataset version and image size. With a budget
set, `enforce` removes whole cache files, least recently used first (a file's `.keys` time is
touched each time it is read), until the caches fit, but never a file holding an image a queued
or running run trains on. Without a budget nothing is removed; `usage` still reports the size.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from tlcore.data.manifest import load_manifest
from tlcore.errors import InvalidInput
from tlcore.records import home
from tlcore.records.store import RunStatus, Store

ENV = "TLCORE_CACHE_GB"


@dataclasses.dataclass(frozen=True)
class CacheUsage:
    bytes: int
    files: int
    budget: int | None  # bytes; None when no budget is set

    def describe(self) -> str:
        used = f"{self.bytes / 1e9:.2f} GB in {self.files} file(s)"
        if self.budget is None:
            return f"Pixel and feature caches: {used}; no budget (set {ENV} to bound them)."
        return f"Pixel and feature caches: {used} of a {self.budget / 1e9:.2f} GB budget ({ENV})."


@dataclasses.dataclass(frozen=True)
class Pruned:
    removed: int  # cache files removed
    freed: int  # bytes
    kept_for_runs: int  # files over the budget kept because a queued or running run needs them


def budget_bytes() -> int | None:
    """The budget from `$TLCORE_CACHE_GB` in bytes, or None when unset.

    Raises:
        InvalidInput: the variable is not a non-negative number.
    """
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return None
    try:
        gigabytes = float(raw)
    except ValueError:
        gigabytes = -1.0
    if not gigabytes >= 0:
        raise InvalidInput(f"`{ENV}` must be a number of gigabytes (0 or more), such as 20. Received: {raw!r}")
    return int(gigabytes * 1e9)


def _cache_files() -> list[tuple[Path, Path, int, float]]:
    """(array, keys, bytes, last used) of every complete cache file."""
    files = []
    for keys in (home.data_home() / "cache").rglob("*.keys"):
        array = keys.with_suffix(".npy")
        try:
            files.append((array, keys, array.stat().st_size + keys.stat().st_size, keys.stat().st_mtime))
        except FileNotFoundError:  # removed meanwhile, or an array without its keys yet
            continue
    return files


def usage() -> CacheUsage:
    files = _cache_files()
    return CacheUsage(sum(f[2] for f in files), len(files), budget_bytes())


def needed_images(store: Store) -> set[str]:
    """Content hashes of every image of the datasets queued or running runs train on."""
    needed: set[str] = set()
    for dataset_id in {r.dataset_id for r in store.list_runs({RunStatus.QUEUED, RunStatus.RUNNING})}:
        try:
            needed.update(e.sha256 for e in load_manifest(dataset_id))
        except FileNotFoundError:
            continue
    return needed


def enforce(store: Store | None = None) -> Pruned:
    """Remove least recently used cache files until the caches fit the budget; see the module doc."""
    budget = budget_bytes()
    files = sorted(_cache_files(), key=lambda f: f[3])
    total = sum(f[2] for f in files)
    if budget is None or total <= budget:
        return Pruned(0, 0, 0)
    needed = needed_images(store or Store())
    removed = freed = kept = 0
    for array, keys, size, _ in files:
        if total <= budget:
            break
        if needed and not needed.isdisjoint(keys.read_text().split()):
            kept += 1
            continue
        keys.unlink(missing_ok=True)  # the keys first: a listed file is always complete
        array.unlink(missing_ok=True)
        total -= size
        freed += size
        removed += 1
    return Pruned(removed, freed, kept)
