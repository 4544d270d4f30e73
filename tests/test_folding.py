"""BatchNorm folding: the faster twin computes what the model computes, and trains the model."""

import keras
import numpy as np
import pytest
from keras import layers

from tlcore.backbones import get_backbone
from tlcore.backbones.classifier import build_classifier, unfreeze_top
from tlcore.backbones.folding import fold_batchnorm

RNG = np.random.default_rng(0)


def _randomise_batchnorm(model):
    """Non-trivial BatchNorm statistics, so a wrong fold shows in the outputs."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            _randomise_batchnorm(layer)
        elif isinstance(layer, layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.moving_mean.assign(RNG.normal(0, 0.5, n))
            layer.moving_variance.assign(RNG.uniform(0.5, 2.0, n))
            if layer.scale:
                layer.gamma.assign(RNG.uniform(0.5, 1.5, n))
            if layer.center:
                layer.beta.assign(RNG.normal(0, 0.3, n))


def _batchnorms(model) -> int:
    return sum(_batchnorms(layer) if isinstance(layer, keras.Model) else isinstance(layer, layers.BatchNormalization)
               for layer in model.layers)


@pytest.mark.parametrize("backbone, size", [
    ("efficientnet_lite0", 64),  # ImageNet weights: depthwise convs, conv without bias
    ("efficientnet_lite2", 64),  # the widest offline Lite: widths rounded to multiples of 8
    ("resnet50", 64),  # convs with a bias
    ("inception_v3", 75),  # BatchNorm without gamma (scale=False)
    ("mobilenet_v3_small", 64),
    ("xception", 71),  # separable convolutions
])
def test_folded_features_equal_the_models_features(backbone, size):
    spec = get_backbone(backbone)
    classifier = build_classifier(spec, size, spec.weights_path() if spec.offline else None, 3, 0.2)
    if not spec.offline:
        _randomise_batchnorm(classifier.model)
    features = classifier.features_model()
    twin = fold_batchnorm(features)
    x = RNG.integers(0, 256, (4, size, size, 3)).astype("float32")

    expected = features(x, training=False).numpy()
    got = twin(x, training=False).numpy()

    assert _batchnorms(features) > 0 and _batchnorms(twin) == 0
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_depthwise_multiplier_and_shared_outputs():
    inputs = keras.Input((12, 12, 4))
    x = layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same", use_bias=False)(inputs)
    x = layers.BatchNormalization()(x)
    x = layers.Conv2D(6, 1, use_bias=True)(x)
    x = layers.BatchNormalization(scale=False, center=False)(x)
    branch = layers.Conv2D(6, 1)(x)  # its output feeds a BatchNorm and the add: must not be folded
    y = layers.add([layers.BatchNormalization()(branch), branch])
    model = keras.Model(inputs, y)
    model.trainable = False
    _randomise_batchnorm(model)
    x = RNG.normal(0, 1, (2, 12, 12, 4)).astype("float32")

    twin = fold_batchnorm(model)

    assert _batchnorms(twin) == 1
    np.testing.assert_allclose(twin(x, training=False), model(x, training=False), rtol=1e-4, atol=1e-5)


def test_training_the_twin_trains_the_model_and_keeps_trainable_layers_unfolded():
    spec = get_backbone("efficientnet_lite0")
    classifier = build_classifier(spec, 64, spec.weights_path(), 3, 0.0)
    model = classifier.model
    unfreeze_top(classifier.backbone, 10)
    twin = fold_batchnorm(model)
    assert {id(w) for w in twin.trainable_weights} == {id(w) for w in model.trainable_weights}
    assert 0 < _batchnorms(twin) < _batchnorms(model)
    twin.compile(optimizer=keras.optimizers.SGD(learning_rate=0.1), loss="sparse_categorical_crossentropy")
    x = RNG.integers(0, 256, (8, 64, 64, 3)).astype("float32")
    y = np.arange(8) % 3
    before = model(x, training=False).numpy()

    twin.train_on_batch(x, y)

    after = model(x, training=False).numpy()
    assert np.abs(after - before).max() > 1e-3  # the model moved
    np.testing.assert_allclose(twin(x, training=False), after, rtol=1e-4, atol=1e-5)


def test_a_model_that_is_not_functional_is_left_as_it_is():
    model = keras.Sequential([keras.Input((8, 8, 3)), layers.Conv2D(4, 3), layers.BatchNormalization()])
    assert fold_batchnorm(model, only_frozen=False) is model
