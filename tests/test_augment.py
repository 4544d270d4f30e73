"""Training-time augmentation: what a user would see in the augmented images."""

import numpy as np

from tlcore.data.augment import AugmentedView, augment_batch, batch_rng

RNG = np.random.default_rng(0)


def _square(n=16, size=48):
    """Dark images with a bright square in the middle."""
    images = np.full((n, size, size, 3), 20, np.uint8)
    images[:, size // 2 - 6:size // 2 + 6, size // 2 - 6:size // 2 + 6] = 230
    return images


def _center_of_brightness(image):
    weight = image[..., 0].astype(float) - 20
    ys, xs = np.indices(weight.shape)
    return np.array([(ys * weight).sum(), (xs * weight).sum()]) / weight.sum()


def test_flip_mirrors_about_half_the_images_exactly():
    images = RNG.integers(0, 256, (64, 20, 20, 3), dtype=np.uint8)
    out = augment_batch(images, ["flip"], batch_rng(0, 0, 0))
    mirrored = [np.array_equal(o, i[:, ::-1]) for o, i in zip(out, images)]
    unchanged = [np.array_equal(o, i) for o, i in zip(out, images)]
    assert all(m or u for m, u in zip(mirrored, unchanged))
    assert 16 < sum(mirrored) < 48


def test_rotation_and_zoom_keep_the_subject_centred_and_add_no_black_corners():
    images = _square()
    out = augment_batch(images, ["rotate", "zoom"], batch_rng(1, 0, 0))
    assert any(not np.array_equal(o, i) for o, i in zip(out, images))
    for image in out:
        assert np.abs(_center_of_brightness(image) - 23.5).max() < 1.0
    # Borders are mirrored, not filled with black: a flat image stays flat.
    flat = np.full((8, 32, 32, 3), 97, np.uint8)
    assert (augment_batch(flat, ["rotate", "zoom", "translate"], batch_rng(2, 0, 0)) == 97).all()


def test_translation_moves_the_subject_by_at_most_a_tenth_of_the_side():
    out = augment_batch(_square(), ["translate"], batch_rng(3, 0, 0))
    shifts = np.array([_center_of_brightness(image) - 23.5 for image in out])
    assert np.abs(shifts).max() <= 0.1 * 48 + 0.5
    assert np.abs(shifts).max() > 1.0


def test_contrast_scales_each_channel_around_its_mean():
    images = RNG.integers(60, 190, (16, 24, 24, 3), dtype=np.uint8)
    out = augment_batch(images, ["contrast"], batch_rng(4, 0, 0))
    ratio = out.reshape(16, -1, 3).std(axis=1) / images.reshape(16, -1, 3).std(axis=1)
    assert ((ratio > 0.78) & (ratio < 1.22)).all() and ratio.std() > 0.01
    np.testing.assert_allclose(out.reshape(16, -1, 3).mean(axis=1), images.reshape(16, -1, 3).mean(axis=1), atol=1)


def test_draws_repeat_for_the_same_batch_and_change_with_the_epoch_or_the_step():
    images = _square(8)
    first = augment_batch(images, ["flip", "rotate", "zoom"], batch_rng(5, 2, 3))
    again = augment_batch(images, ["flip", "rotate", "zoom"], batch_rng(5, 2, 3))
    next_epoch = augment_batch(images, ["flip", "rotate", "zoom"], batch_rng(5, 3, 3))
    next_step = augment_batch(images, ["flip", "rotate", "zoom"], batch_rng(5, 2, 4))
    assert np.array_equal(first, again)
    assert not np.array_equal(first, next_epoch) and not np.array_equal(first, next_step)


def test_an_augmented_view_of_an_image_depends_on_its_content_and_the_view_alone():
    images = RNG.integers(0, 256, (4, 24, 24, 3), dtype=np.uint8)
    shas = [f"{i:064x}" for i in (11, 22, 33, 44)]
    first = AugmentedView(("rotate", "zoom"), 0)
    out = first.apply(images, shas)
    assert all(not np.array_equal(o, i) for o, i in zip(out, images))
    # The same image is the same view in any batch, in any order (so its activations can be cached) ...
    np.testing.assert_array_equal(first.apply(images[[2, 0]], [shas[2], shas[0]]), out[[2, 0]])
    # ... and another view index draws another transform.
    assert not np.array_equal(AugmentedView(("rotate", "zoom"), 1).apply(images, shas), out)
    assert first.key == "view0-rotate-zoom" == AugmentedView(("zoom", "rotate"), 0).key
