"""Pixels for training: decode and resize each image once into a uint8 cache, then stream batches.

The cache is keyed by image content (`tlcore.content_cache`): a `.npy` file per list of images
at one size, opened as a memory map, so a dataset larger than memory streams from disk; a new
dataset version decodes only the images no earlier version had. Augmentation runs on the fly on each gathered
uint8 batch (`tlcore.data.augment`), outside the model, so saved models stay plain.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from tlcore import home
from tlcore.content_cache import ContentCache
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


def pixel_cache(entries: Sequence, size: int, *, workers: int | None = None,
                on_progress=None) -> tuple[PixelCache, int]:
    """The uint8 cache for `entries` at `size`, decoding only images not cached before.


    Returns (cache, images reused from earlier caches).
    """
    workers = workers or min(8, (os.cpu_count() or 2) * 2)

    def decode(positions: np.ndarray, out: np.ndarray) -> None:
        # PIL releases the GIL while decoding and resizing, so threads use every core.
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            for done, (index, pixels) in enumerate(pool.map(
                    lambda i: (i, load_resized(entries[i].path, size)), positions), 1):
                out[index] = pixels
                if on_progress and done % 64 == 0:
                    on_progress(done, len(positions))

    found = _pixel_store(size).rows([e.sha256 for e in entries], (size, size, 3), np.uint8, decode, mmap=True)
    return PixelCache(found.array, found.path, size), found.reused


def _pixel_store(size: int) -> ContentCache:
    return ContentCache(home.cache_dir("pixels") / str(size))


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
