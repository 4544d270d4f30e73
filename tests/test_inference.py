"""Inference: safe-mode loading, predict on files and images, Grad-CAM."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from tlcore.evaluate.calibration import apply_temperature
from tlcore.records.run_folder import RunFolder


def save_fake_run(run_id: str = "run-fake", size: int = 32, labels=("ants", "bees"), seed: int = 0):
    """A run folder holding a model in the saved-model layout (Input -> BackbonePreprocessing ->
    nested backbone -> GlobalAveragePooling2D -> Dropout -> Dense softmax) and labels.json."""
    import keras

    from tlcore.backbones.preprocessing import BackbonePreprocessing

    keras.utils.set_random_seed(seed)
    b_in = keras.Input((size, size, 3))
    h = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(b_in)
    h = keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu")(h)
    backbone = keras.Model(b_in, h, name="tiny_backbone")
    inputs = keras.Input((size, size, 3))
    x = BackbonePreprocessing("lite")(inputs)
    x = backbone(x, training=False)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.2)(x)
    outputs = keras.layers.Dense(len(labels), activation="softmax", dtype="float32")(x)
    model = keras.Model(inputs, outputs)
    folder = RunFolder(run_id).created().path
    model.save(folder / "model.keras")
    (folder / "labels.json").write_text(json.dumps(list(labels)))
    return model, folder


def write_images(folder, n=3, size=48):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        arr = rng.integers(0, 255, (size, size + 8, 3), dtype=np.uint8)
        p = folder / f"img {i}.png"
        Image.fromarray(arr).save(p)
        paths.append(p)
    return paths


def test_predict_files_matches_model_on_load_resized_pixels(tmp_path):
    from tlcore.data.images import load_resized
    from tlcore.deploy import inference

    model, _ = save_fake_run()
    paths = write_images(tmp_path / "imgs")
    loaded = inference.load_run_model("run-fake")
    assert loaded.image_size == 32 and loaded.labels == ["ants", "bees"]
    preds = loaded.predict_files(paths, top_k=2)
    expected = model.predict(np.stack([load_resized(p, 32) for p in paths]).astype("float32"), verbose=0)
    for pred, exp in zip(preds, expected):
        assert [label for label, _ in pred.top_k] == [["ants", "bees"][i] for i in np.argsort(-exp)]
        np.testing.assert_allclose([p for _, p in pred.top_k], np.sort(exp)[::-1], atol=1e-5)
        assert pred.latency_ms > 0

    # Bytes, a PIL image and a file all give the same pixels and the same answer.
    raw = paths[0].read_bytes()
    by_bytes = loaded.predict_image(raw, top_k=2)
    by_pil = loaded.predict_image(Image.open(io.BytesIO(raw)), top_k=2)
    np.testing.assert_allclose([p for _, p in by_bytes.top_k], [p for _, p in preds[0].top_k], atol=1e-6)
    np.testing.assert_allclose([p for _, p in by_pil.top_k], [p for _, p in preds[0].top_k], atol=1e-6)
    with pytest.raises(ValueError, match="top_k"):
        loaded.predict_files(paths, top_k=0)


def test_load_run_model_is_cached_and_thread_safe(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from tlcore.deploy import inference

    save_fake_run()
    paths = write_images(tmp_path / "imgs", n=2)
    a = inference.load_run_model("run-fake")
    assert inference.load_run_model("run-fake") is a
    single = a.predict_files(paths, top_k=1)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: a.predict_files(paths, top_k=1), range(8)))
    for r in results:
        assert [p.top_k for p in r] == [p.top_k for p in single]


def test_a_warmed_up_model_answers_its_first_photo_at_full_speed(tmp_path):
    from tlcore.deploy import inference

    _, folder = save_fake_run()
    raw = write_images(tmp_path / "imgs", n=1)[0].read_bytes()

    def fresh():
        return inference.LoadedModel(inference.load_model_file(folder / "model.keras"), ["ants", "bees"], name="m")

    cold = fresh().predict_image(raw)
    warmed = fresh()
    warmed.warm_up()
    # Warming up builds the compiled predict step; the first photo then reuses it.
    compiled = warmed._predictor.predict_function
    assert compiled is not None
    first = warmed.predict_image(raw)
    assert warmed._predictor.predict_function is compiled

    assert [label for label, _ in first.top_k] == [label for label, _ in cold.top_k]
    np.testing.assert_allclose([p for _, p in first.top_k], [p for _, p in cold.top_k], atol=1e-6)
    print(f"first photo: {first.latency_ms:.1f} ms warmed up, {cold.latency_ms:.1f} ms cold")


def test_after_warm_up_no_batch_size_traces_the_forward_pass_again(tmp_path):
    """What the server's batcher sends (1..32 images) runs in the warmed buckets: on a GPU each new
    input shape would be a compile in a request's latency. Counted as traces, not seconds."""
    from tlcore.deploy import inference

    _, folder = save_fake_run()
    loaded = inference.LoadedModel(inference.load_model_file(folder / "model.keras"), ["ants", "bees"], name="m")
    predictor = loaded._predictor
    traces, shapes = [], set()
    step, on_batch = predictor.predict_step, predictor.predict_on_batch
    predictor.predict_step = lambda data: (traces.append(1), step(data))[1]  # runs only while tracing
    predictor.predict_on_batch = lambda x: (shapes.add(x.shape), on_batch(x))[1]
    loaded.warm_up(inference.BATCH_BUCKETS)  # what the server does at start
    warmed = len(traces)
    size = loaded.image_size
    for n in range(1, 33):
        probs = loaded.probabilities(np.zeros((n, size, size, 3), np.uint8))
        assert probs.shape == (n, 2)
    print(f"traces: {warmed} at warm-up, {len(traces) - warmed} after it for batch sizes 1..32")
    assert len(traces) == warmed
    assert {shape[0] for shape in shapes} == set(inference.BATCH_BUCKETS)
    assert predictor.jit_compile is False


def test_lambda_model_is_refused_in_safe_mode_and_runs_no_code(tmp_path):
    import keras

    from tlcore.deploy import inference

    sentinel = tmp_path / "pwned"
    folder = RunFolder("run-evil").created().path

    # The lambda writes the sentinel whenever it runs (the path is baked into its code).
    evil = eval(f"lambda x: (open({str(sentinel)!r}, 'w').write('ran'), x)[1]")  # noqa: S307
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Lambda(evil)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x))
    model.save(folder / "model.keras")
    (folder / "labels.json").write_text('["a", "b"]')
    assert sentinel.exists()  # building the model ran it once: the sentinel works
    sentinel.unlink()

    with pytest.raises(inference.ModelLoadError, match="safe mode"):
        inference.load_run_model("run-evil")
    assert not sentinel.exists()

    # Control: without safe mode the same file would have run the lambda.
    unsafe = keras.saving.load_model(folder / "model.keras", safe_mode=False, compile=False)
    unsafe(np.zeros((1, 32, 32, 3), "float32"))
    assert sentinel.exists()


def test_missing_and_corrupt_models_give_plain_errors(store):
    from tlcore.deploy import inference

    with pytest.raises(KeyError, match="No run"):
        inference.load_run_model("run-nothing")
    folder = RunFolder("run-corrupt").created().path
    (folder / "model.keras").write_bytes(b"this is not a zip file")
    (folder / "labels.json").write_text('["a", "b"]')
    with pytest.raises(inference.ModelLoadError, match="could not be loaded"):
        inference.load_run_model("run-corrupt")
    save_fake_run("run-badlabels", labels=("a", "b", "c"))
    (RunFolder("run-badlabels").created().path / "labels.json").write_text('["a", "b"]')
    with pytest.raises(inference.ModelLoadError, match="labels"):
        inference.load_run_model("run-badlabels")


def test_gradcam_heatmap_shape_range_and_focus():
    from tlcore.deploy import inference

    save_fake_run()
    loaded = inference.load_run_model("run-fake")
    image = np.zeros((32, 32, 3), np.uint8)
    image[4:14, 4:14] = 255
    heat = inference.gradcam(loaded, image)
    assert heat.shape == (32, 32) and heat.dtype == np.float32
    assert 0.0 <= heat.min() and heat.max() <= 1.0
    big = np.tile(image, (2, 2, 1))  # any size in, heatmap at that size out
    assert inference.gradcam(loaded, big, class_index=1).shape == (64, 64)
    with pytest.raises(ValueError, match="class_index"):
        inference.gradcam(loaded, image, class_index=5)


def test_imagenet_model_names_a_photo():
    from skimage import data

    from tlcore.deploy import inference

    loaded = inference.load_imagenet_model("efficientnet_lite0")
    assert len(loaded.labels) == 1000
    pred = loaded.predict_image(Image.fromarray(data.chelsea()), top_k=5)
    assert pred.indices[0] in range(281, 286), pred.top_k  # the domestic-cat classes
    heat = inference.gradcam(loaded, data.chelsea())
    assert heat.shape == data.chelsea().shape[:2]


def test_predict_on_raw_files_equals_evaluation_and_gradcam_on_a_trained_run(tmp_path, store):
    from tests.test_jobs import make_image_folder, tiny
    from tlcore.data.images import load_resized
    from tlcore.deploy import inference
    from tlcore.queue import jobs

    folder = make_image_folder(tmp_path / "colours", per_class=6, size=48)
    run = jobs.run_foreground(tiny(str(folder), head_epochs=2), store)
    assert run.status.value == "succeeded", run.error
    stored = [json.loads(line) for line in RunFolder(run.id).predictions.read_text().splitlines()]
    loaded = inference.load_run_model(run.id)
    assert loaded.image_size == 32 and loaded.labels == store.get_dataset(run.dataset_id).classes
    preds = loaded.predict_files([row["path"] for row in stored], top_k=2)
    # predictions.jsonl keeps the raw softmax; a loaded run model applies the run's temperature.
    assert loaded.temperature and loaded.temperature == loaded.point.calibration.temperature
    for row, pred in zip(stored, preds):
        assert pred.label == row["pred"]
        calibrated = apply_temperature(np.array([p for _, p in row["topk"]]), loaded.temperature)
        assert pred.confidence == pytest.approx(calibrated[0], abs=1e-5)
        assert [[label, pytest.approx(p, abs=1e-5)] for label, p in pred.top_k] == [
            [label, c] for (label, _), c in zip(row["topk"][:2], calibrated)]
    heat = inference.gradcam(loaded, load_resized(stored[0]["path"], 32))
    assert heat.shape == (32, 32) and 0.0 <= heat.min() and heat.max() <= 1.0
