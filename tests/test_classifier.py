"""The classifier's parts: what trains on cached features is what the saved model predicts with."""

from __future__ import annotations

from types import SimpleNamespace

import keras
import numpy as np

from tlcore.backbones import get_backbone
from tlcore.backbones.classifier import build_classifier, compile_classifier

RNG = np.random.default_rng(0)


def _tiny_backbone(size, weights_path):
    return keras.Sequential([keras.Input((size, size, 3)), keras.layers.Conv2D(8, 3, activation="relu")],
                            name="tiny_backbone")


def test_a_head_trained_on_features_is_the_saved_models_head(tmp_path):
    # A tiny backbone (the classifier around it is the real one), with MobileNetV2's preprocessing.
    spec = SimpleNamespace(name="tiny", preprocessing=get_backbone("mobilenet_v2").preprocessing, build=_tiny_backbone)
    classifier = build_classifier(spec, 16, None, 3, 0.2)
    x = RNG.integers(0, 256, (6, 16, 16, 3)).astype("float32")
    features = classifier.features_model()(x).numpy()
    head = classifier.head_on_features()
    before = classifier.model(x).numpy()
    np.testing.assert_allclose(head(features).numpy(), before, atol=1e-6)

    compile_classifier(head, 0.05, label_smoothing=0.1)
    head.fit(features, np.arange(6) % 3, epochs=3, verbose=0)
    after = classifier.model(x).numpy()
    assert np.abs(after - before).max() > 1e-3  # training the head on features trained the classifier
    np.testing.assert_allclose(head(features).numpy(), after, atol=1e-6)

    chosen = [w * 0 for w in classifier.head.get_weights()]  # a head that answers 1/3 for everything
    classifier.set_head(chosen, 0.5)
    path = tmp_path / "model.keras"
    classifier.model.save(path)
    saved = keras.saving.load_model(path, safe_mode=True, compile=False)
    assert [layer.name for layer in saved.layers][-3:] == ["pool", "head_dropout", "head"]
    assert saved.layers[-2].rate == 0.5
    np.testing.assert_allclose(saved(x).numpy(), 1 / 3, atol=1e-6)


def test_the_fine_tune_cut_splits_the_classifier_where_nothing_below_trains():
    from tlcore.backbones.classifier import unfreeze_top

    classifier = build_classifier(get_backbone("efficientnet_lite0"), 32, None, 3, 0.2)
    x = RNG.integers(0, 256, (4, 32, 32, 3)).astype("float32")
    whole, features = classifier.model(x).numpy(), classifier.features_model()(x).numpy()
    # The top 20 weighted layers begin at a block's start; 22 begin inside the block before, whose
    # skip connection needs that block's input: the cut moves down to it.
    for layers, at in ((20, "block6b_add"), (22, "block6a_project_bn")):
        cut = classifier.fine_tune_cut(layers)
        assert cut.layer == at
        activations = cut.prefix(x).numpy()
        assert activations.shape[1:] == cut.activation_shape
        np.testing.assert_allclose(cut.top()(activations).numpy(), whole, atol=1e-5)
        np.testing.assert_allclose(cut.features(activations).numpy(), features, atol=1e-4)

    assert unfreeze_top(classifier.backbone, 22) > 0
    assert not cut.prefix.trainable_weights  # everything that trains is above the cut
    assert {v.path for v in cut.top().trainable_weights} == {v.path for v in classifier.model.trainable_weights}
    assert classifier.fine_tune_cut(0) is None and classifier.fine_tune_cut(10_000) is None
