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
    data = pipeline.batches(images, rows, np.array([7, 8, 9]), 2)
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in data])
    np.testing.assert_array_equal(np.concatenate(xs), images[rows].astype("float32"))
    assert np.concatenate(ys).tolist() == [7, 8, 9]


def test_flip_augmentation_gives_the_image_or_its_exact_mirror():
    images = _images(16)
    data = pipeline.batches(images, np.arange(16), np.zeros(16, np.int64), 16, seed=3,
                            augment=("flip",))
    out = next(iter(data))[0].numpy()
    same = [np.allclose(o, i, atol=1e-3) for o, i in zip(out, images)]
    mirrored = [np.allclose(o, i[:, ::-1], atol=1e-3) for o, i in zip(out, images)]
    assert all(s or m for s, m in zip(same, mirrored))
    assert any(mirrored) and any(same)


def test_rotate_and_zoom_keep_pixel_values_in_range_and_change_the_image():
    images = _images(8, 48)
    data = pipeline.batches(images, np.arange(8), np.zeros(8, np.int64), 8, seed=1,
                            augment=("flip", "rotate", "zoom", "contrast"))
    out = next(iter(data))[0].numpy()
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 255.0 + 1e-3
    assert not np.allclose(out, images)


def test_epoch_order_depends_only_on_seed_and_epoch_and_fills_the_last_batch():
    first = pipeline.epoch_order(10, 4, seed=7, epoch=0)
    assert first.shape == (3, 4)  # 10 images, batches of 4: the last two slots wrap round
    assert sorted(set(first.ravel().tolist())) == list(range(10))
    np.testing.assert_array_equal(first, pipeline.epoch_order(10, 4, seed=7, epoch=0))
    assert not np.array_equal(first, pipeline.epoch_order(10, 4, seed=7, epoch=1))
    assert not np.array_equal(first, pipeline.epoch_order(10, 4, seed=8, epoch=0))


def test_every_training_batch_has_one_shape_and_a_new_iterator_starts_at_the_first_epoch():
    images, labels = _images(10), np.arange(10)
    data, steps = pipeline.epoch_batches(images, np.arange(10), labels, 4, seed=3, epochs=3, initial_epoch=1,
                                         augment=("flip",))
    assert steps == 3 and tuple(data.element_spec[0].shape) == (4, 32, 32, 3)  # static: one compiled step
    extra = iter(data)  # what Keras opens under any distribution strategy, before training
    next(extra)
    seen = [y.numpy().tolist() for _, y in data]
    assert len(seen) == 2 * steps
    expected = [pipeline.epoch_order(10, 4, 3, epoch)[step].tolist() for epoch in (1, 2) for step in range(steps)]
    assert seen == expected
    again = [x.numpy() for x, _ in data.take(2)]
    np.testing.assert_array_equal(again[1], next(iter(data.skip(1)))[0].numpy())  # same augmentation draws


def _fit_tiny_model(strategy, data, steps):
    import keras

    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(),
                                  keras.layers.Dense(2, activation="softmax")])
        model.compile(optimizer=keras.optimizers.SGD(0.001), loss="sparse_categorical_crossentropy")
    traces = []
    step = model.train_step
    model.train_step = lambda batch: (traces.append(1), step(batch))[1]  # runs only while tracing
    model.fit(data, epochs=3, steps_per_epoch=steps, verbose=0)
    return model.get_weights()[0], len(traces)


def test_the_same_seed_trains_on_the_same_batches_on_the_default_and_a_one_device_strategy():
    import tensorflow as tf

    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (24, 8, 8, 3), dtype=np.uint8), rng.integers(0, 2, 24)
    one_device = tf.distribute.OneDeviceStrategy("/cpu:0")

    def fresh():
        return pipeline.epoch_batches(images, np.arange(24), labels, 5, seed=0, epochs=3, augment=("flip",))

    (default, default_traces), (one, one_traces) = (_fit_tiny_model(tf.distribute.get_strategy(), *fresh()),
                                                    _fit_tiny_model(one_device, *fresh()))
    gap = np.abs(default - one)
    assert gap.max() < 1e-6
    # 24 images in batches of 5: the short last batch is filled up, one step shape, one trace.
    assert default_traces == one_traces == 1

    # The pipeline it replaced: tf.data reshuffling each iteration. Keras' extra iterator under the
    # one-device strategy eats the first order, so the two trained on different batches.
    def reshuffling():
        order = tf.data.Dataset.range(24).shuffle(24, seed=0, reshuffle_each_iteration=True).batch(5)
        pixels = tf.constant(images, tf.float32)
        return order.map(lambda p: (tf.gather(pixels, p), tf.gather(labels, p))), None

    old_gap = np.abs(_fit_tiny_model(tf.distribute.get_strategy(), *reshuffling())[0]
                     - _fit_tiny_model(one_device, *reshuffling())[0])
    print(f"default vs one-device weight gap: {gap.max():.1e} now, {old_gap.max():.1e} with reshuffling")
    assert old_gap.max() > 1e-3


def test_view_batches_take_each_row_or_one_of_its_views_the_same_way_every_time():
    rows = np.arange(10 * 4, dtype=np.float32).reshape(10, 2, 2, 1)
    indices = np.array([1, 3, 5, 7, 9])
    # Two views of the images, in the order of `indices`, told apart from the rows by sign and size.
    views = [-rows[indices] - 1, rows[indices] + 1000]

    def drawn():
        data, steps = pipeline.view_batches(rows, indices, views, np.arange(5), 5, seed=0, epochs=8)
        assert steps == 1
        return [(x.numpy(), y.numpy()) for x, y in data]

    picks = []
    for x, positions in drawn():
        for item, p in zip(x, positions):
            candidates = [rows[indices[p]], *(view[p] for view in views)]
            matches = [number for number, c in enumerate(candidates) if np.array_equal(item, c)]
            assert len(matches) == 1
            picks.append(matches[0])
    assert set(picks) == {0, 1, 2}  # the plain row and every view, at random
    for first, second in zip(drawn(), drawn()):
        np.testing.assert_array_equal(np.concatenate(first, axis=None), np.concatenate(second, axis=None))
    plain_only, _ = pipeline.view_batches(rows, indices, [], np.arange(5), 5, seed=0, epochs=1)
    x, y = next(iter(plain_only))
    np.testing.assert_array_equal(x.numpy(), rows[indices[y.numpy()]])


def test_stacked_rows_read_like_the_stacked_arrays_from_memory_maps(tmp_path):
    """The head's training rows (features of the training images, then their mirrored features) are
    read batch by batch from the memory-mapped caches, and are the rows a stacked copy would hold."""
    rng = np.random.default_rng(0)
    features, mirrored = rng.normal(size=(20, 3)).astype(np.float32), rng.normal(size=(6, 3)).astype(np.float32)
    np.save(tmp_path / "f.npy", features)
    np.save(tmp_path / "m.npy", mirrored)
    train = np.array([17, 2, 9, 4, 11, 0])
    stacked = pipeline.StackedRows((np.load(tmp_path / "f.npy", mmap_mode="r"), train),
                                   (np.load(tmp_path / "m.npy", mmap_mode="r"), np.arange(6)))
    copy = np.concatenate([features[train], mirrored])
    assert len(stacked) == 12 and stacked.shape == copy.shape
    for positions in (np.array([11, 0, 6, 5, 3]), rng.permutation(12), np.array([], int)):
        np.testing.assert_array_equal(stacked[positions], copy[positions])
