"""The feature cache: one forward pass per image, reused; mirrored features for flip augmentation."""

from __future__ import annotations

import keras
import numpy as np

from tlcore.features import cached_features, extract_features, feature_cache_path


def _feature_model():
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3, kernel_initializer=keras.initializers.RandomNormal(seed=1))(inputs)
    return keras.Model(inputs, keras.layers.Flatten()(x))


def test_mirrored_rows_are_the_features_of_the_flipped_images(tlcore_home):
    images = np.random.default_rng(0).integers(0, 256, (7, 16, 16, 3), dtype=np.uint8)
    model = _feature_model()
    rows = np.array([1, 4, 6])
    mirrored = extract_features(model, images, 2, rows=rows, mirror=True)
    expected = np.asarray(model(images[rows][:, :, ::-1].astype("float32")))
    np.testing.assert_allclose(mirrored, expected, rtol=1e-5, atol=1e-5)


def test_features_are_computed_once_then_read_from_the_cache(tlcore_home):
    images = np.random.default_rng(1).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    model = _feature_model()
    path = feature_cache_path("ds-x", "toy", 16, "imagenet", 0)
    first, reused_first, _ = cached_features(path, model, images, 4)
    calls = []
    second, reused_second, _ = cached_features(path, model, images, 4, on_batch=lambda *a: calls.append(a))
    assert not reused_first and reused_second and not calls
    np.testing.assert_array_equal(first, second)
    mirror_path = feature_cache_path("ds-x", "toy", 16, "imagenet", 0, mirrored_rows=np.array([0, 2]))
    assert mirror_path != path and mirror_path != feature_cache_path(
        "ds-x", "toy", 16, "imagenet", 0, mirrored_rows=np.array([0, 3]))
