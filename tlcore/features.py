"""The feature cache: pooled backbone features per (dataset version, backbone, size, weights).

With the backbone frozen and no augmentation, its output for an image never changes, so it
is computed once; every later head-only run on the same dataset trains in seconds. A
horizontal flip is the one augmentation that is just as deterministic: the features of the
mirrored training images are cached beside the plain ones.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np

from tlcore import home
from tlcore.atomic import write_atomically


def feature_cache_path(dataset_id: str, backbone: str, size: int, weights: str, seed: int,
                       mirrored_rows: np.ndarray | None = None, *, mixed_precision: bool = False) -> Path:
    """Where the features of a dataset live; with `mirrored_rows`, those of these rows mirrored.

    Features computed in mixed precision (float16 convolutions) are kept apart from float32
    ones: a float32 run never trains its head on float16 features, nor the other way round.
    """
    # Random-init weights depend on the seed; ImageNet weights do not.
    weights_key = weights if weights == "imagenet" else f"{weights}-seed{seed}"
    variant = "-fp16" if mixed_precision else ""
    if mirrored_rows is not None:
        digest = hashlib.sha1(np.ascontiguousarray(mirrored_rows, dtype=np.int64).tobytes()).hexdigest()[:10]
        variant += f"-mirror-{digest}"
    return home.cache_dir("features") / f"{dataset_id}-{backbone}-{size}-{weights_key}{variant}.npy"


def pad_batch(x: np.ndarray, batch_size: int) -> np.ndarray:
    """Pad a short last batch with zeros so a compiled forward pass keeps one input shape."""
    if len(x) == batch_size:
        return x
    return np.concatenate([x, np.zeros((batch_size - len(x), *x.shape[1:]), x.dtype)])


def extract_features(feature_model, images: np.ndarray, batch_size: int, *, rows: np.ndarray | None = None,
                     mirror: bool = False, on_batch=None) -> np.ndarray:
    """Run `feature_model` (RGB 0-255 in, pooled vector out) over a uint8 array, batch by batch.

    `rows` picks (sorted) rows of `images`, default all; `mirror` flips each image left-right.
    `on_batch(done, total)` is called after every batch; an exception it raises stops the pass.
    """
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def forward(x):
        return feature_model(tf.cast(x, tf.float32), training=False)

    out = None
    rows = np.arange(len(images)) if rows is None else np.asarray(rows)
    total = len(rows)
    for start in range(0, total, batch_size):
        batch = np.asarray(images[rows[start:start + batch_size]])
        if mirror:
            batch = batch[:, :, ::-1]
        count = len(batch)
        chunk = forward(pad_batch(batch, batch_size)).numpy()[:count]
        if out is None:
            out = np.empty((total, chunk.shape[-1]), np.float32)
        out[start:start + count] = chunk
        if on_batch is not None:
            on_batch(min(start + batch_size, total), total)
    return out


def cached_features(path: Path, feature_model, images: np.ndarray, batch_size: int, *,
                    rows: np.ndarray | None = None, mirror: bool = False,
                    on_batch=None) -> tuple[np.ndarray, bool, float]:
    """Features for `images` (or their `rows`, optionally mirrored) from `path` if cached,
    else extracted and saved. Returns (features, reused, seconds)."""
    started = time.perf_counter()
    expected = len(images) if rows is None else len(rows)
    if path.exists():
        features = np.load(path)
        if len(features) == expected:
            return features, True, time.perf_counter() - started
    features = extract_features(feature_model, images, batch_size, rows=rows, mirror=mirror, on_batch=on_batch)
    write_atomically(path, lambda tmp: np.save(tmp, features))
    return features, False, time.perf_counter() - started
