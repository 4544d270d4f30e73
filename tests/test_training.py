"""The two-phase recipe on a small real slice of hymenoptera (ants vs bees), tiny images."""

from __future__ import annotations

import json
import re
import shutil

import keras
import numpy as np
import pytest
from conftest import SHARED_DATASETS

from tlcore.backbones import get_backbone, resolve_weights
from tlcore.backbones.classifier import build_classifier, unfreeze_top
from tlcore.data.images import load_resized
from tlcore.data.importer import import_dataset
from tlcore.data.manifest import load_manifest
from tlcore.records.config import RunSpec, TrainConfig
from tlcore.records.run_folder import RunFolder
from tlcore.records.store import RunStatus
from tlcore.train.training import RunCancelled, execute_run

SIZE = 64


@pytest.fixture
def ants_bees(tmp_path, store):
    """6 train and 4 val photos per class from the real hymenoptera set, given splits kept."""
    src = SHARED_DATASETS / "hymenoptera"
    root = tmp_path / "hymenoptera_slice"
    for split, n in (("train", 6), ("val", 4)):
        for label in ("ants", "bees"):
            dest = root / split / label
            dest.mkdir(parents=True)
            for photo in sorted((src / split / label).iterdir())[:n]:
                shutil.copy(photo, dest / photo.name)
    return import_dataset(root, name="ants-bees", store=store).dataset


def _running(store, dataset, name="test", extra=None, **overrides):
    """A stored run in state `running` for `TrainConfig(**overrides)` (tiny images by default)."""
    config = TrainConfig(**{"dataset": dataset.id, "image_size": SIZE, "batch_size": 4, **overrides})
    return store.create_run(name, RunSpec.from_dict({**config.to_dict(), **(extra or {})}), status=RunStatus.RUNNING)


def _run(store, dataset, **overrides):
    run = _running(store, dataset, **overrides)
    return run, execute_run(run.id, store)


def _log_text(store, run_id):
    return "\n".join(line.message for line in store.logs(run_id))


def test_head_phase_caches_features_the_model_predicts_as_evaluated_and_a_second_run_reuses_them(store, ants_bees):
    first, summary = _run(store, ants_bees, head_epochs=2)

    assert summary.eval_split == "val" and summary.eval_images == 8
    assert summary.backbone == "efficientnet_lite0" and summary.weights == "imagenet"
    assert 0.0 <= summary.metrics.accuracy <= 1.0
    assert set(summary.metrics.per_class) == {"ants", "bees"}
    assert [(e.phase, e.epoch) for e in store.epochs(first.id)] == [("head", 1), ("head", 2)]
    # Train and val only: val is the evaluation split, so nothing is chosen on it (no head search,
    # class weighting auto trains unweighted).
    assert summary.head_search is None and summary.class_weight == "none"
    assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(store.epochs(first.id)[0].metrics)
    folder = RunFolder(first.id).created().path
    for artifact in ("model.keras", "labels.json", "config.json", "predictions.jsonl", "tensorboard"):
        assert (folder / artifact).exists(), artifact
    assert "Backbone features: 0 of 20 images reused" in _log_text(store, first.id)
    # Given splits train/val only: val is the evaluation split, so no temperature is fitted on it.
    assert summary.calibration.temperature is None and "no test split" in summary.calibration.reason
    assert 0 <= summary.calibration.ece_before <= 1 and summary.threshold is None

    # The saved model, loaded and given the raw files, predicts exactly what the evaluation recorded.
    model = keras.saving.load_model(summary.model_path, safe_mode=True)
    labels = json.loads(RunFolder(first.id).labels_file.read_text())
    rows = [json.loads(line) for line in RunFolder(first.id).predictions.read_text().splitlines()]
    assert len(rows) == 8
    probs = model.predict(np.stack([load_resized(r["path"], SIZE) for r in rows]).astype("float32"), verbose=0)
    for row, p in zip(rows, probs):
        assert labels[int(np.argmax(p))] == row["pred"]
        assert abs(float(p.max()) - row["confidence"]) < 1e-4

    # The second run also averages each evaluated image with its mirror (checked in `_assert_flip_tta`).
    second, summary2 = _run(store, ants_bees, head_epochs=1, tta="flip")
    assert "Backbone features: 20 of 20 images reused" in _log_text(store, second.id)
    assert summary2.timings.features_reused and not summary.timings.features_reused
    _assert_flip_tta_averages_each_image_with_its_mirror_in_evaluation_prediction_and_export(second, summary2)


def _assert_flip_tta_averages_each_image_with_its_mirror_in_evaluation_prediction_and_export(run, summary):
    from tlcore.deploy.export import answering_model, export_run
    from tlcore.deploy.inference import load_run_model

    assert summary.metrics.tta == "flip"
    rows = [json.loads(line) for line in RunFolder(run.id).predictions.read_text().splitlines()]
    model = keras.saving.load_model(summary.model_path, safe_mode=True)
    pixels = np.stack([load_resized(r["path"], SIZE) for r in rows]).astype("float32")
    plain = model.predict(pixels, verbose=0)
    mirrored = model.predict(pixels[:, :, ::-1], verbose=0)  # left-right: the width axis of (n, h, w, 3)
    expected = (plain + mirrored) / 2
    assert np.abs(plain - expected).max() > 1e-4  # the mirror changes the answer, so the test can tell
    np.testing.assert_allclose([r["confidence"] for r in rows], expected.max(axis=1), atol=1e-4)

    loaded = load_run_model(run.id)
    assert loaded.tta == "flip"
    predictions = loaded.predict_files([r["path"] for r in rows])
    np.testing.assert_allclose([p.confidence for p in predictions], expected.max(axis=1), atol=1e-4)
    single = loaded.probabilities(pixels[0].astype(np.uint8))  # one (h, w, 3) image: a batch of one
    np.testing.assert_allclose(single[0], expected[0], atol=1e-4)

    # The model the SavedModel, TFLite and ONNX exports hold answers as the evaluation did, and the card says so.
    np.testing.assert_allclose(answering_model(loaded).predict(pixels, verbose=0), expected, atol=1e-4)
    assert "- Test-time augmentation: flip: the SavedModel, TFLite and ONNX files average" in \
        export_run(run.id, "card").read_text()


def test_a_new_dataset_version_computes_only_the_images_it_has_not_seen(store, ants_bees, tmp_path):
    _run(store, ants_bees, head_epochs=1)
    entries = load_manifest(ants_bees.id)
    # The same photos plus one new bee photo in train, imported as a new version.
    root = tmp_path / "next"
    for e in entries:
        dest = root / e.split / e.label / e.source.split("/")[-1]
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(e.path, dest)
    new_photo = sorted((SHARED_DATASETS / "hymenoptera" / "train" / "bees").iterdir())[-1]
    shutil.copy(new_photo, root / "train" / "bees" / new_photo.name)
    version2 = import_dataset(root, name="ants-bees", store=store).dataset
    assert version2.version == 2

    run, summary = _run(store, version2, head_epochs=1)
    log = _log_text(store, run.id)
    assert "Pixel cache: 20 of 21 images" in log and "Backbone features: 20 of 21 images reused" in log
    assert not summary.timings.features_reused


def test_fine_tune_unfreezes_top_layers_but_never_batchnorm():
    spec = get_backbone("efficientnet_lite0")
    base = build_classifier(spec, SIZE, None, 2, 0.2).backbone
    assert unfreeze_top(base, 10) > 0
    trainable = [layer for layer in base.layers if layer.trainable]
    assert trainable and not any(isinstance(layer, keras.layers.BatchNormalization) for layer in trainable)
    assert not any(layer.trainable for layer in base.layers[:10])


def test_the_default_fine_tune_trains_on_cached_activations_and_saves_the_whole_tuned_model(store, ants_bees):
    run, summary = _run(store, ants_bees, head_epochs=1, finetune_epochs=1, finetune_layers=10, lr=0.01,
                        augment=("flip", "rotate"), finetune_views=4, tta="flip")
    assert summary.finetune_inputs == "cached"
    log = _log_text(store, run.id)
    assert "The fine-tune trains on the activations of block" in log
    assert "rotate as 4 augmented views of each training image, drawn once" in log
    assert "Backbone activations at block" in log and "0 of 20 images reused" in log
    assert "Augmented view 4's activations at block" in log and summary.finetune_views == 4

    # Evaluation ran the tuned top layers on the cached activations; the saved model, preprocessing
    # inside, gives the same answers on the raw files (with the flip TTA of the recipe).
    model = keras.saving.load_model(summary.model_path, safe_mode=True)
    rows = [json.loads(line) for line in RunFolder(run.id).predictions.read_text().splitlines()]
    pixels = np.stack([load_resized(r["path"], SIZE) for r in rows]).astype("float32")
    expected = (model.predict(pixels, verbose=0) + model.predict(pixels[:, :, ::-1], verbose=0)) / 2
    np.testing.assert_allclose([r["confidence"] for r in rows], expected.max(axis=1), atol=1e-4)
    # ... and holds the fine-tuned top layers, not ImageNet's.
    imagenet = build_classifier(get_backbone("efficientnet_lite0"), SIZE, resolve_weights(
        get_backbone("efficientnet_lite0"), "imagenet"), 2, 0.2).backbone
    unfreeze_top(imagenet, 10)
    saved = next(layer for layer in model.layers if isinstance(layer, keras.Model))
    tuned = [layer.name for layer in imagenet.layers if layer.trainable]
    assert all(not np.allclose(saved.get_layer(name).get_weights()[0], imagenet.get_layer(name).get_weights()[0])
               for name in tuned)
    frozen = [layer.name for layer in imagenet.layers if layer.weights and not layer.trainable]
    assert all(np.allclose(saved.get_layer(name).get_weights()[0], imagenet.get_layer(name).get_weights()[0])
               for name in frozen)

    # A fine-tune alone (no head phase) on the same images reads every activation from the cache, the
    # augmented views' too: a view is a function of the image's content, not of the run's seed.
    again, _ = _run(store, ants_bees, head_epochs=0, finetune_epochs=1, finetune_layers=10, augment=("flip", "rotate"),
                    finetune_views=4, seed=7)
    log = _log_text(store, again.id)
    assert re.search(r"Backbone activations at block\w+: 20 of 20 images reused", log)
    assert len(re.findall(r"Augmented view \d's activations at block\w+: (\d+) of \1 images reused", log)) == 4


def test_fine_tune_checkpoints_each_epoch_and_a_cancel_stops_between_batches_keeping_logged_epochs(store, ants_bees):
    run = _running(store, ants_bees, "cancel-me", batch_size=2, head_epochs=1, finetune_epochs=5, finetune_layers=10,
                   augment=("flip", "zoom"))
    with pytest.raises(RunCancelled):
        execute_run(run.id, store, should_stop=lambda: len(store.epochs(run.id)) >= 2)
    assert [e.phase for e in store.epochs(run.id)] == ["head", "finetune"]
    log = _log_text(store, run.id)
    assert "Mirrored training-image features: 0 of 12 images reused" in log  # flip: the head
    assert "zoom not at all (augmented views 0; fine-tune inputs \"pixels\" applies every augmentation" in log
    assert json.loads(RunFolder(run.id).checkpoint_state.read_text()) == {"phase": "finetune", "epoch": 1}
    assert not RunFolder(run.id).model.exists()


def test_cancel_requested_in_the_store_stops_a_run(store, ants_bees):
    run = _running(store, ants_bees, "cancel-in-store", batch_size=2, head_epochs=3)
    store.request_cancel(run.id)
    with pytest.raises(RunCancelled):
        execute_run(run.id, store)


def test_random_initialisation_is_said_plainly(store, ants_bees):
    run, summary = _run(store, ants_bees, weights="none", head_epochs=1)
    assert summary.weights == "none"
    assert "random initialisation" in _log_text(store, run.id)


def test_too_small_image_size_for_a_backbone_is_refused(store, ants_bees):
    run = _running(store, ants_bees, "small", backbone="inception_v3", weights="none", image_size=64)
    with pytest.raises(ValueError, match="at least 75"):
        execute_run(run.id, store)


def test_eta_counts_the_current_epoch_and_reaches_zero_at_the_end():
    import types

    from tlcore.train.training import _StoreProgress

    now = [100.0]  # an injected clock: each epoch takes exactly ten seconds, however busy the machine
    beats = []
    ctx = types.SimpleNamespace(step=0, run_id="r", sink=types.SimpleNamespace(log_epoch=lambda *a: None),
                                beat=lambda progress, force=False: beats.append(progress) or False,
                                log=lambda message: None)
    callback = _StoreProgress(ctx, "finetune", 3, checkpoint=False, clock=lambda: now[0])
    callback.set_model(types.SimpleNamespace(optimizer=None, stop_training=False))
    callback.on_epoch_begin(0)
    now[0] += 10.0
    callback.on_epoch_end(0, {"loss": 1.0})
    after_first = beats[-1]
    assert after_first.epoch == 2 and after_first.eta_s == 20.0
    callback.on_epoch_begin(1)
    now[0] += 4.0  # four seconds into the second epoch: 6 s of it and 10 s of the third are left
    assert callback._progress(batch=3).eta_s == 16.0
    now[0] += 6.0
    callback.on_epoch_end(1, {"loss": 1.0})
    callback.on_epoch_begin(2)
    now[0] += 10.0
    callback.on_epoch_end(2, {"loss": 1.0})
    assert beats[-1].eta_s == 0.0


@pytest.fixture
def few_bees(tmp_path, store):
    """hymenoptera with a small class: 6 ants and 2 bees to train on, 2 + 2 to evaluate."""
    src = SHARED_DATASETS / "hymenoptera"
    root = tmp_path / "few_bees"
    for split, counts in (("train", {"ants": 6, "bees": 2}), ("val", {"ants": 2, "bees": 2})):
        for label, n in counts.items():
            dest = root / split / label
            dest.mkdir(parents=True)
            for photo in sorted((src / split / label).iterdir())[:n]:
                shutil.copy(photo, dest / photo.name)
    return import_dataset(root, name="few-bees", store=store).dataset


def test_balanced_class_weights_reach_both_phases_and_the_small_class_is_reported(store, few_bees, monkeypatch):
    seen = []
    fit = keras.Model.fit

    def recording_fit(self, *args, **kwargs):
        seen.append(kwargs.get("class_weight"))
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "fit", recording_fit)
    # The fine-tune on pixels (the path mixed precision and several devices take) to its end.
    run, summary = _run(store, few_bees, head_epochs=1, finetune_epochs=1, finetune_layers=4, class_weight="balanced",
                        head_search="off", finetune_inputs="pixels")
    # n / (classes * count): 8 / (2 * 6) for ants, 8 / (2 * 2) for bees.
    assert seen == [pytest.approx({0: 8 / 12, 1: 2.0})] * 2
    assert [e.phase for e in store.epochs(run.id)] == ["head", "finetune"] and summary.timings.finetune_s is not None
    assert summary.finetune_inputs == "pixels"
    assert "Class weights (balanced, both phases): ants 0.67, bees 2.00." in _log_text(store, run.id)
    metrics = summary.metrics
    assert metrics.smallest_class == min(("ants", "bees"), key=lambda c: metrics.per_class[c].recall)  # a 2-2 tie
    assert metrics.smallest_class_recall == metrics.per_class[metrics.smallest_class].recall

    seen.clear()
    _run(store, few_bees, head_epochs=1, class_weight="none", head_search="off")
    assert seen == [None]
