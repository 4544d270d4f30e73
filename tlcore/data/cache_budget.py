"""The caches' size budget: `$TLCORE_CACHE_GB` bounds the data home's pixel and feature caches.

The caches (`tlcore.data.content_cache`) grow with every dataset version and image size. With a budget
set, `enforce` removes whole cache files, least recently used first (a file's `.keys` time is
touched each time it is read), until the caches fit, but never a file holding an image a queued
or running run trains on. Without a budget nothing is removed; `usage` still reports the size.
`prune` is that rule over any list of cached things (a Ray node's cache uses it for its image
files and caches, `tlcore.cluster`).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable

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


def budget_bytes(env: str = ENV) -> int | None:
    """The budget from the variable `env` (`$TLCORE_CACHE_GB`) in bytes, or None when unset.

    Raises:
        InvalidInput: the variable is not a non-negative number.
    """
    raw = os.environ.get(env, "").strip()
    if not raw:
        return None
    try:
        gigabytes = float(raw)
    except ValueError:
        gigabytes = -1.0
    if not gigabytes >= 0:
        raise InvalidInput(f"`{env}` must be a number of gigabytes (0 or more), such as 20. Received: {raw!r}")
    return int(gigabytes * 1e9)


@dataclasses.dataclass(frozen=True)
class Cached:
    """One removable thing in a cache: its files (removed in this order), size, last use, its images."""

    files: tuple[Path, ...]
    bytes: int
    used_at: float
    images: Callable[[], list[str]]  # content hashes of the images it holds, read only when needed


def cache_files(folder: Path) -> list[Cached]:
    """Every complete pixel or feature cache file under `folder` (the keys first: a listed file is complete)."""
    files = []
    for keys in folder.rglob("*.keys"):
        array = keys.with_suffix(".npy")
        try:
            files.append(Cached((keys, array), array.stat().st_size + keys.stat().st_size, keys.stat().st_mtime,
                                lambda keys=keys: keys.read_text().split()))
        except FileNotFoundError:  # removed meanwhile, or an array without its keys yet
            continue
    return files


def usage() -> CacheUsage:
    files = cache_files(home.data_home() / "cache")
    return CacheUsage(sum(f.bytes for f in files), len(files), budget_bytes())


def needed_images(store: Store) -> set[str]:
    """Content hashes of every image of the datasets queued or running runs train on."""
    needed: set[str] = set()
    for dataset_id in {r.dataset_id for r in store.list_runs({RunStatus.QUEUED, RunStatus.RUNNING})}:
        try:
            needed.update(e.sha256 for e in load_manifest(dataset_id))
        except FileNotFoundError:
            continue
    return needed


def prune(items: list[Cached], budget: int | None, needed: Callable[[], set[str]]) -> Pruned:
    """Remove the least recently used of `items` until they fit `budget` bytes, never one holding an
    image of `needed()` (asked only when something must go)."""
    items = sorted(items, key=lambda item: item.used_at)
    total = sum(item.bytes for item in items)
    if budget is None or total <= budget:
        return Pruned(0, 0, 0)
    keep = needed()
    removed = freed = kept = 0
    for item in items:
        if total <= budget:
            break
        if keep and not keep.isdisjoint(item.images()):
            kept += 1
            continue
        for path in item.files:
            path.unlink(missing_ok=True)
        total -= item.bytes
        freed += item.bytes
        removed += 1
    return Pruned(removed, freed, kept)


def enforce(store: Store | None = None) -> Pruned:
    """Remove least recently used cache files until the caches fit the budget; see the module doc."""
    return prune(cache_files(home.data_home() / "cache"), budget_bytes(),
                 lambda: needed_images(store or Store()))
