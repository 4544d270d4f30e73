"""Pixels for training: decode and resize each image once into a uint8 cache, then stream batches.

The cache is a `.npy` file per (dataset version, image size), opened as a memory map, so a
dataset larger than memory streams from disk. Augmentation runs on the fly on each gathered
uint8 batch (`tlcore.data.augment`), outside the model, so saved models stay plain.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from tlcore import home
from tlcore.atomic import write_atomically, write_json_atomically
from tlcore.data.augment import augment_batch, batch_rng
from tlcore.data.images import load_resized

SPLITS = ("train", "val", "test")


@dataclasses.dataclass(frozen=True)
class PixelCache:
    """Decoded images of one dataset version at one size, in manifest order."""

    images: np.ndarray  # (N, size, size, 3) uint8, memory-mapped
    path: Path
    size: int

    def __len__(self) -> int:
        return len(self.images)


def pixel_cache(dataset_id: str, entries: Sequence, size: int, *, workers: int | None = None,
                on_progress=None) -> tuple[PixelCache, bool]:
    """The uint8 cache for `entries` at `size`, built if missing. Returns (cache, reused)."""
    path, meta_path = _cache_paths(dataset_id, size)
    if path.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("count") == len(entries) and meta.get("first") == _entry_key(entries[0]):
            return PixelCache(np.load(path, mmap_mode="r"), path, size), True

    workers = workers or min(8, (os.cpu_count() or 2) * 2)

    def decode_all(tmp: Path) -> None:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(entries), size, size, 3))
        # PIL releases the GIL while decoding and resizing, so threads use every core.
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            for done, (index, pixels) in enumerate(pool.map(
                    lambda item: (item[0], load_resized(item[1].path, size)), enumerate(entries)), 1):
                out[index] = pixels
                if on_progress and done % 64 == 0:
                    on_progress(done, len(entries))
        out.flush()
        del out

    write_atomically(path, decode_all)
    write_json_atomically(meta_path, {"count": len(entries), "first": _entry_key(entries[0]), "size": size})
    return PixelCache(np.load(path, mmap_mode="r"), path, size), False


def adopt_pixel_cache(dataset_id: str, entries: Sequence, images: np.ndarray) -> None:
    """Make `images` (decoded elsewhere, in `entries` order) this data home's cache for them.

    A Ray node receives a dataset's pixels through the object store instead of its image files;
    with the cache in place, `pixel_cache` reuses it and never opens a file.
    """
    size = images.shape[1]
    path, meta_path = _cache_paths(dataset_id, size)
    write_atomically(path, lambda tmp: np.save(tmp, images))
    write_json_atomically(meta_path, {"count": len(entries), "first": _entry_key(entries[0]), "size": size})


def _cache_paths(dataset_id: str, size: int) -> tuple[Path, Path]:
    path = home.cache_dir("pixels") / f"{dataset_id}-{size}.npy"
    return path, path.with_suffix(".json")


def _entry_key(entry) -> str:
    return getattr(entry, "sha256", str(entry.path))


def split_indices(entries: Sequence) -> dict[str, np.ndarray]:
    """Row indices of each split, in manifest order."""
    return {split: np.array([i for i, e in enumerate(entries) if e.split == split], dtype=np.int64)
            for split in SPLITS}


def batches(images: np.ndarray, indices: np.ndarray, labels: np.ndarray, batch_size: int, *,
            shuffle: bool, seed: int, augment: Sequence[str] = ()):
    """A `tf.data.Dataset` of (float32 RGB 0-255 images, int labels) read from the memory map.

    Batches are gathered from the cache by index (sorted within a batch for sequential reads),
    so only one batch at a time is in memory, then augmented (`augment` names, see
    `tlcore.data.augment`) with draws that depend on `seed` and the batch.
    """
    import tensorflow as tf

    size = images.shape[1]
    order = tf.data.Dataset.from_tensor_slices(np.arange(len(indices), dtype=np.int64))
    if shuffle:
        order = order.shuffle(len(indices), seed=seed, reshuffle_each_iteration=True)
    order = order.batch(batch_size)

    def gather(positions):
        rows = indices[positions]
        sort = np.argsort(rows)
        x = np.empty((len(rows), size, size, 3), np.uint8)
        x[sort] = images[rows[sort]]
        if augment:
            x = augment_batch(x, augment, batch_rng(seed, positions))
        return x, labels[positions].astype(np.int32)

    def load(positions):
        x, y = tf.numpy_function(gather, [positions], (tf.uint8, tf.int32))
        x = tf.cast(tf.ensure_shape(x, (None, size, size, 3)), tf.float32)
        return x, tf.ensure_shape(y, (None,))

    return order.map(load, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
