"""The feature cache: one forward pass per image content, reused; mirrored features for flip augmentation."""

from __future__ import annotations

import keras
import numpy as np

from tlcore.backbones.features import cached_features, extract_features, feature_cache


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


def test_features_are_computed_once_per_image_content_then_read_from_the_cache(tlcore_home):
    images = np.random.default_rng(1).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    shas = [f"sha{i}" for i in range(5)]
    model = _feature_model()
    cache = feature_cache("toy", 16, "imagenet", 0)
    first, _ = cached_features(cache, shas, model, images, 4)
    calls = []
    second, _ = cached_features(cache, shas, model, images, 4, on_batch=lambda *a: calls.append(a))
    assert first.reused == 0 and second.all_reused and not calls
    np.testing.assert_array_equal(first.array, second.array)

    # A new version: two images dropped, one new image; only the new one goes through the backbone.
    new_images = np.concatenate([images[[4, 0, 2]], np.full((1, 16, 16, 3), 7, np.uint8)])
    new_shas = ["sha4", "sha0", "sha2", "sha-new"]
    third, _ = cached_features(cache, new_shas, model, new_images, 4, on_batch=lambda *a: calls.append(a))
    assert third.reused == 3 and calls == [(1, 1)]
    np.testing.assert_allclose(third.array, extract_features(model, new_images, 4), rtol=1e-5, atol=1e-5)

    mirrored, _ = cached_features(feature_cache("toy", 16, "imagenet", 0, mirror=True), shas, model, images, 4,
                                  rows=np.array([0, 2]), mirror=True)
    assert mirrored.reused == 0  # mirrored features are not the plain ones
    np.testing.assert_allclose(mirrored.array, extract_features(model, images, 4, rows=np.array([0, 2]), mirror=True),
                               rtol=1e-5, atol=1e-5)
