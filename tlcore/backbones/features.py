"""The feature cache: pooled backbone features per image content × (backbone, size, weights).

With the backbone frozen and no augmentation, its output for an image never changes, so it
is computed once per image content (`tlcore.data.content_cache`): every later head-only run, on the
same dataset version or on a new version sharing images with it, extracts only unseen images.
A horizontal flip is the one augmentation that is just as deterministic: the features of the
mirrored images are cached beside the plain ones, under their own key.
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from tlcore.data.augment import AugmentedView
from tlcore.data.content_cache import CachedRows, ContentCache
from tlcore.records import home


def feature_cache(backbone: str, size: int, weights: str, seed: int, *, mirror: bool = False,
                  mixed_precision: bool = False) -> ContentCache:
    """The content-addressed cache of one backbone's features (of mirrored images with `mirror`).

    Features computed in mixed precision (float16 convolutions) are kept apart from float32
    ones: a float32 run never trains its head on float16 features, nor the other way round.
    """
    # Random-init weights depend on the seed; ImageNet weights do not.
    weights_key = weights if weights == "imagenet" else f"{weights}-seed{seed}"
    variant = ("-fp16" if mixed_precision else "") + ("-mirror" if mirror else "")
    return ContentCache(home.cache_dir("features") / f"{backbone}-{size}-{weights_key}{variant}")


def activation_cache(backbone: str, size: int, weights: str, seed: int, layer: str, *,
                     mirror: bool = False, view: AugmentedView | None = None) -> ContentCache:
    """The content-addressed cache of one backbone's activations at `layer` (`FineTuneCut`), float32,
    of the images, their mirrored twins (`mirror`) or one augmented `view` of them.

    The fine-tune trains only the layers above the cut, so these are the same for every epoch and
    every run that cuts there: computed once per image, like the pooled features.
    """
    weights_key = weights if weights == "imagenet" else f"{weights}-seed{seed}"
    variant = ("-mirror" if mirror else "") + (f"-{view.key}" if view is not None else "")
    return ContentCache(home.cache_dir("activations") / f"{backbone}-{size}-{weights_key}-{layer}{variant}")


def pad_batch(x: np.ndarray, batch_size: int) -> np.ndarray:
    """Pad a short last batch with zeros so a compiled forward pass keeps one input shape."""
    if len(x) == batch_size:
        return x
    return np.concatenate([x, np.zeros((batch_size - len(x), *x.shape[1:]), x.dtype)])


def extract_features(feature_model, images: np.ndarray, batch_size: int, *, rows: np.ndarray | None = None,
                     mirror: bool = False, transform=None, on_batch=None, strategy=None) -> np.ndarray:
    """Run `feature_model` (RGB 0-255 in, or the activations `FineTuneCut.features` takes; pooled
    vectors or activations out) over an array, batch by batch.

    `rows` picks (sorted) rows of `images`, default all; `mirror` flips each image left-right;
    `transform(batch, batch_rows)` returns a new batch of those rows of `images` (an augmented view).
    `on_batch(done, total)` is called after every batch; an exception it raises stops the pass.
    With a multi-replica `strategy` (the model built in its scope) each batch is split evenly
    across its replicas (`batch_size` is rounded up to a multiple of them).
    """
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def one_device(x):
        return feature_model(tf.cast(x, tf.float32), training=False)

    forward = one_device
    replicas = strategy.num_replicas_in_sync if strategy is not None else 1
    if replicas > 1:
        batch_size = -(-batch_size // replicas) * replicas
        forward = _across_replicas(feature_model, strategy, batch_size // replicas)

    out = None
    rows = np.arange(len(images)) if rows is None else np.asarray(rows)
    total = len(rows)
    for start in range(0, total, batch_size):
        batch = np.asarray(images[rows[start:start + batch_size]])
        if mirror:
            batch = batch[:, :, ::-1]
        if transform is not None:
            batch = transform(batch, rows[start:start + batch_size])
        count = len(batch)
        chunk = np.asarray(forward(pad_batch(batch, batch_size)))[:count]
        if out is None:
            out = np.empty((total, *chunk.shape[1:]), np.float32)
        out[start:start + count] = chunk
        if on_batch is not None:
            on_batch(min(start + batch_size, total), total)
    return out


def _across_replicas(feature_model, strategy, per_replica: int):
    """A forward pass that runs slice i of each batch on replica i and returns the whole batch's outputs."""
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def step(x):
        return feature_model(tf.cast(x, tf.float32), training=False)

    def forward(batch: np.ndarray) -> np.ndarray:
        parts = strategy.experimental_distribute_values_from_function(
            lambda context: batch[context.replica_id_in_sync_group * per_replica:
                                  (context.replica_id_in_sync_group + 1) * per_replica])
        outputs = strategy.run(step, args=(parts,))
        return np.concatenate([np.asarray(o) for o in strategy.experimental_local_results(outputs)])

    return forward


def cached_features(cache: ContentCache, shas: Sequence[str], feature_model, images: np.ndarray,
                    batch_size: int, *, rows: np.ndarray | None = None, mirror: bool = False,
                    view: AugmentedView | None = None, on_batch=None, strategy=None,
                    mmap: bool = False) -> tuple[CachedRows, float]:
    """Features of `images` (or their `rows`, optionally mirrored or an augmented `view`), whose contents are `shas`
    (one per image of `images`), from `cache` where known, the rest extracted and cached.
    Returns (cached rows, memory-mapped with `mmap`, and seconds); `on_batch` sees only the
    batches actually extracted."""
    started = time.perf_counter()
    rows = np.arange(len(images)) if rows is None else np.asarray(rows)
    row_shape = tuple(int(d) for d in feature_model.output.shape[1:])

    transform = None if view is None else lambda batch, batch_rows: view.apply(batch, [shas[r] for r in batch_rows])

    def compute(positions: np.ndarray, out: np.ndarray) -> None:
        out[positions] = extract_features(feature_model, images, batch_size, rows=rows[positions],
                                          mirror=mirror, transform=transform, on_batch=on_batch, strategy=strategy)

    found = cache.rows([shas[r] for r in rows], row_shape, np.float32, compute, mmap=mmap)
    return found, time.perf_counter() - started
