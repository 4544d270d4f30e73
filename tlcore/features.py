"""The feature cache: pooled backbone features per (dataset version, backbone, size, weights).

With the backbone frozen and no augmentation, its output for an image never changes, so it
is computed once; every later head-only run on the same dataset trains in seconds.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from tlcore import home


def feature_cache_path(dataset_id: str, backbone: str, size: int, weights: str, seed: int) -> Path:
    # Random-init weights depend on the seed; ImageNet weights do not.
    weights_key = weights if weights == "imagenet" else f"{weights}-seed{seed}"
    return home.cache_dir("features") / f"{dataset_id}-{backbone}-{size}-{weights_key}.npy"


def pad_batch(x: np.ndarray, batch_size: int) -> np.ndarray:
    """Pad a short last batch with zeros so a compiled forward pass keeps one input shape."""
    if len(x) == batch_size:
        return x
    return np.concatenate([x, np.zeros((batch_size - len(x), *x.shape[1:]), x.dtype)])


def extract_features(feature_model, images: np.ndarray, batch_size: int, *, on_batch=None,
                     should_stop=None) -> np.ndarray:
    """Run `feature_model` (RGB 0-255 in, pooled vector out) over a uint8 array, batch by batch."""
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def forward(x):
        return feature_model(tf.cast(x, tf.float32), training=False)

    out = None
    total = len(images)
    for start in range(0, total, batch_size):
        if should_stop is not None and should_stop():
            from tlcore.training import RunCancelled

            raise RunCancelled("Cancelled during feature extraction.")
        rows = min(batch_size, total - start)
        chunk = forward(pad_batch(np.asarray(images[start:start + batch_size]), batch_size)).numpy()[:rows]
        if out is None:
            out = np.empty((total, chunk.shape[-1]), np.float32)
        out[start:start + rows] = chunk
        if on_batch is not None:
            on_batch(min(start + batch_size, total), total)
    return out


def cached_features(path: Path, feature_model, images: np.ndarray, batch_size: int, *,
                    on_batch=None, should_stop=None) -> tuple[np.ndarray, bool, float]:
    """Features for `images` from `path` if cached, else extracted and saved. Returns
    (features, reused, seconds)."""
    started = time.perf_counter()
    if path.exists():
        features = np.load(path)
        if len(features) == len(images):
            return features, True, time.perf_counter() - started
    features = extract_features(feature_model, images, batch_size, on_batch=on_batch, should_stop=should_stop)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
    np.save(tmp, features)
    os.replace(tmp, path)
    return features, False, time.perf_counter() - started
