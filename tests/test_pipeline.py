"""The pixel pipeline: batches from the uint8 cache, and augmentation that keeps images recognisable."""

from __future__ import annotations

import numpy as np

from tlcore.data import pipeline


def _images(n=6, size=32):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_batches_read_the_chosen_rows_in_order_with_their_labels():
    images = _images()
    rows = np.array([4, 1, 3])
    data = pipeline.batches(images, rows, np.array([7, 8, 9]), 2, shuffle=False, seed=0)
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in data])
    np.testing.assert_array_equal(np.concatenate(xs), images[rows].astype("float32"))
    assert np.concatenate(ys).tolist() == [7, 8, 9]


def test_flip_augmentation_gives_the_image_or_its_exact_mirror():
    images = _images(16)
    data = pipeline.batches(images, np.arange(16), np.zeros(16, np.int64), 16, shuffle=False, seed=3,
                            augment=("flip",))
    out = next(iter(data))[0].numpy()
    same = [np.allclose(o, i, atol=1e-3) for o, i in zip(out, images)]
    mirrored = [np.allclose(o, i[:, ::-1], atol=1e-3) for o, i in zip(out, images)]
    assert all(s or m for s, m in zip(same, mirrored))
    assert any(mirrored) and any(same)


def test_rotate_and_zoom_keep_pixel_values_in_range_and_change_the_image():
    images = _images(8, 48)
    data = pipeline.batches(images, np.arange(8), np.zeros(8, np.int64), 8, shuffle=False, seed=1,
                            augment=("flip", "rotate", "zoom", "contrast"))
    out = next(iter(data))[0].numpy()
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 255.0 + 1e-3
    assert not np.allclose(out, images)
