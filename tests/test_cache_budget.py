"""The caches' size budget ($TLCORE_CACHE_GB): least recently used files go first, never one a queued run needs."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from tlcore.data import cache_budget
from tlcore.data.content_cache import ContentCache
from tlcore.data.manifest import ManifestEntry, write_manifest
from tlcore.errors import InvalidInput
from tlcore.records import home
from tlcore.records.config import RunSpec

ROW = (32, 32, 3)  # 3 KB a row


def cached(shas: list[str], used_at: float):
    """The path of one cache file of `shas` (pixels at 32 px), last used at `used_at`."""
    found = ContentCache(home.cache_dir("pixels") / "32").rows(
        shas, ROW, np.uint8, lambda positions, out: out.__setitem__(positions, 7))
    os.utime(found.path.with_suffix(".keys"), (used_at, used_at))
    return found.path


def test_the_least_recently_used_files_go_until_the_caches_fit_but_not_what_a_queued_run_needs(store, monkeypatch):
    now = time.time()
    oldest = cached([f"{i:064x}" for i in range(0, 10)], now - 400)
    needed = cached([f"{i:064x}" for i in range(10, 20)], now - 300)  # old, but a queued run trains on it
    older = cached([f"{i:064x}" for i in range(20, 30)], now - 200)
    recent = cached([f"{i:064x}" for i in range(30, 40)], now - 100)
    size = oldest.stat().st_size
    dataset = store.add_dataset("d", "x", ["a"], {"train": {"a": 1}}, {})
    write_manifest(dataset.id, [ManifestEntry(path=home.blobs_dir() / "x.jpg", label="a", split="train",
                                              sha256=f"{15:064x}", source="a/x.jpg", width=32, height=32)])
    store.create_run("queued", RunSpec.from_dict({}, dataset_id=dataset.id))

    monkeypatch.delenv(cache_budget.ENV, raising=False)
    assert cache_budget.enforce(store).removed == 0  # no budget: nothing removed
    assert "no budget" in cache_budget.usage().describe()

    monkeypatch.setenv(cache_budget.ENV, str(2.5 * size / 1e9))
    pruned = cache_budget.enforce(store)

    assert pruned.removed == 2 and pruned.kept_for_runs == 1
    assert not oldest.exists() and not older.exists() and needed.exists() and recent.exists()
    assert not oldest.with_suffix(".keys").exists()
    usage = cache_budget.usage()
    assert usage.files == 2 and "of a 0.00 GB budget (TLCORE_CACHE_GB)" in usage.describe()

    # Reading a file makes it the most recently used.
    ContentCache(home.cache_dir("pixels") / "32").rows([f"{i:064x}" for i in range(10, 20)], ROW, np.uint8, None)
    assert needed.with_suffix(".keys").stat().st_mtime > recent.with_suffix(".keys").stat().st_mtime


def test_a_budget_that_is_not_a_number_is_one_sentence(monkeypatch):
    monkeypatch.setenv(cache_budget.ENV, "lots")
    with pytest.raises(InvalidInput, match="must be a number of gigabytes.*Received: 'lots'"):
        cache_budget.budget_bytes()
