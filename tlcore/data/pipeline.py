"""Pixels for training: decode and resize each image once into a uint8 cache, then stream batches.

The cache is keyed by image content (`tlcore.data.content_cache`): a `.npy` file per list of images
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

from tlcore.data.augment import augment_batch, batch_rng
from tlcore.data.content_cache import ContentCache
from tlcore.data.images import load_resized
from tlcore.records import home

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


def epoch_order(count: int, batch_size: int, seed: int, epoch: int) -> np.ndarray:
    """Positions (into the training rows) of every batch of epoch `epoch`: shape (steps, batch_size).

    A pure function of (seed, epoch): the same on the CPU, one GPU or N replicas, however many
    iterators the caller opens. The last batch is filled up by wrapping round to the start of
    the epoch's order, so every batch has one shape (one compiled step) and no image is left out.
    """
    order = np.random.default_rng([int(seed), int(epoch)]).permutation(count)
    steps = -(-count // batch_size)
    return np.resize(order, steps * batch_size).reshape(steps, batch_size)


def epoch_batches(images: np.ndarray, indices: np.ndarray, labels: np.ndarray, batch_size: int, *,
                  seed: int, epochs: int, initial_epoch: int = 0, augment: Sequence[str] = ()):
    """Shuffled, augmented training batches of the cached pixel rows `indices` (see `shuffled_batches`).

    Returns (dataset of float32 RGB 0-255 images and int labels, steps per epoch).
    """
    def gather(epoch, step, positions):
        x = _gather(images, indices, positions)
        if augment:
            x = augment_batch(x, augment, batch_rng(seed, epoch, step))
        return x, labels[positions].astype(np.int32)

    return shuffled_batches(len(indices), batch_size, gather, images.shape[1:], "uint8",
                            seed=seed, epochs=epochs, initial_epoch=initial_epoch)


def view_batches(rows: np.ndarray, indices: np.ndarray, views: Sequence[np.ndarray], labels: np.ndarray,
                 batch_size: int, *, seed: int, epochs: int, initial_epoch: int = 0):
    """Shuffled training batches of precomputed per-image arrays (the fine-tune's cached activations):
    rows `indices` of `rows`, or, with `views` (other arrays of the same images, in the order of
    `indices`: mirrored, augmented), each image's row drawn at random among its plain row and its
    views, anew per epoch. Batches as `shuffled_batches` makes them; returns (dataset, steps per epoch)."""
    in_order = np.arange(len(indices))

    def gather(epoch, step, positions):
        x = _gather(rows, indices, positions)
        if views:
            drawn = batch_rng(seed, epoch, step).integers(0, len(views) + 1, len(positions))
            for number, view in enumerate(views, 1):
                x[drawn == number] = _gather(view, in_order, positions[drawn == number])
        return x, labels[positions].astype(np.int32)

    return shuffled_batches(len(indices), batch_size, gather, rows.shape[1:], str(rows.dtype),
                            seed=seed, epochs=epochs, initial_epoch=initial_epoch)


def shuffled_batches(count: int, batch_size: int, gather, x_shape: tuple, x_dtype: str, *,
                     seed: int, epochs: int, initial_epoch: int = 0):
    """Batches for epochs `initial_epoch`..`epochs - 1`, one after the other, in `epoch_order`.

    `gather(epoch, step, positions)` returns the (x, int32 y) numpy batch of those positions; x
    has per-item shape `x_shape` and dtype `x_dtype` and reaches the model as float32.
    Returns (dataset, steps per epoch); pass both to `fit` (`steps_per_epoch`), so Keras keeps
    one iterator across epochs. Every new iterator starts again at `initial_epoch`: the batches
    and their augmentation draws depend only on (seed, epoch, step), never on how many
    iterators Keras opened before (it opens an extra one under any distribution strategy).
    """
    import tensorflow as tf

    steps = -(-count // batch_size)

    def one_epoch(epoch):
        order = tf.numpy_function(lambda e: epoch_order(count, batch_size, seed, int(e)), [epoch], tf.int64)
        return tf.data.Dataset.from_tensor_slices((tf.fill([steps], epoch), tf.range(steps, dtype=tf.int64),
                                                   tf.ensure_shape(order, (steps, batch_size))))

    def load(epoch, step, positions):
        x, y = tf.numpy_function(gather, [epoch, step, positions], (tf.as_dtype(x_dtype), tf.int32))
        x = tf.cast(tf.ensure_shape(x, (batch_size, *x_shape)), tf.float32)
        return x, tf.ensure_shape(y, (batch_size,))

    data = tf.data.Dataset.range(initial_epoch, epochs).flat_map(one_epoch)
    return data.map(load, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE), steps


def batches(images: np.ndarray, indices: np.ndarray, labels: np.ndarray, batch_size: int, *,
            seed: int = 0, augment: Sequence[str] = ()):
    """A `tf.data.Dataset` of (float32 RGB 0-255 images, int labels) in the order of `indices`
    (`images` may hold other per-image arrays, such as cached activations, without `augment`).

    Batches are gathered from the memory map by index, so only one batch at a time is in
    memory, then augmented (`augment` names, see `tlcore.data.augment`) with draws that depend
    on `seed` and the batch's number. The last batch may be short (evaluation pads its rows to
    whole batches: `tlcore.train.training.model_probabilities`).
    """
    import tensorflow as tf

    order = tf.data.Dataset.from_tensor_slices(np.arange(len(indices), dtype=np.int64)).batch(batch_size)

    def gather(step, positions):
        x = _gather(images, indices, positions)
        if augment:
            x = augment_batch(x, augment, batch_rng(seed, 0, step))
        return x, labels[positions].astype(np.int32)

    def load(step, positions):
        x, y = tf.numpy_function(gather, [step, positions], (tf.as_dtype(images.dtype), tf.int32))
        x = tf.cast(tf.ensure_shape(x, (None, *images.shape[1:])), tf.float32)
        return x, tf.ensure_shape(y, (None,))

    return order.enumerate().map(load, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


class StackedRows:
    """Rows of cached arrays stacked as one array, without a copy: `x[positions]` gathers just those
    rows, each array's in file order (they may be memory maps). The head trains on the training
    images' features followed by their mirrored features; at 100,000 images, stacking them in
    memory would take 0.7 GB beside the feature matrix."""

    def __init__(self, *parts: tuple[np.ndarray, np.ndarray]):
        self.parts = parts  # (array, the rows of it to take), stacked in this order
        self.starts = np.cumsum([0] + [len(rows) for _, rows in parts])
        self.shape = (int(self.starts[-1]), *parts[0][0].shape[1:])
        self.dtype = parts[0][0].dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, positions: np.ndarray) -> np.ndarray:
        positions = np.asarray(positions)
        part = np.searchsorted(self.starts, positions, side="right") - 1
        x = np.empty((len(positions), *self.shape[1:]), self.dtype)
        for k, (array, rows) in enumerate(self.parts):
            mine = np.flatnonzero(part == k)
            if len(mine):
                x[mine] = _gather(array, rows, positions[mine] - self.starts[k])
        return x


def _gather(images: np.ndarray, indices: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """The cached rows `indices[positions]` of `images`, read in row order (sequential on disk)."""
    rows = indices[positions]
    sort = np.argsort(rows)
    x = np.empty((len(rows), *images.shape[1:]), images.dtype)
    x[sort] = images[rows[sort]]
    return x
