"""EfficientNet-Lite in Keras: the family as data, with ImageNet weights that need no internet.

Lite0 is EfficientNet-B0 without squeeze-and-excitation, with ReLU6 instead of swish and the
stem (32) and head (1280) fixed, as in the TensorFlow reference
(`efficientnet/lite/efficientnet_lite_builder.py`). Details proven against the reference
PyTorch port by `tools/make_lite_reference.py` and `tests/test_efficientnet_lite.py`:
TF-style 'same' padding (asymmetric, extra pixel bottom/right, on stride-2 layers, which is
what Keras' `padding="same"` does), BatchNorm epsilon 1e-3, inputs scaled as (x - 127) / 128.

The larger variants scale Lite0's stages: a width multiplier on every block's filters and a
depth multiplier on the repeats of all but the first and last stage (the reference's
`fix_head_stem`). A variant is one `LiteVariant` row here plus its record in the registry
(display name, default size, weights package); the weights are converted by
`efficientnet_lite_weights.py`.

Layer names follow `keras.applications.EfficientNetB0`: `stem_*`, `block{stage}{letter}_*`
(`block1a` ... `block7a`), `top_*`, so "unfreeze from `block6a`" reads the same as for B0.
"""

from __future__ import annotations

import dataclasses
import math
import os
import string
from pathlib import Path

import h5py
import keras
import numpy as np
from keras import layers

from tlcore.backbones import efficientnet_lite_weights
from tlcore.backbones.preprocessing import BackbonePreprocessing
from tlcore.backbones.registry import BackboneSpec, get_backbone, resolve_weights
from tlcore.errors import InvalidInput

# Lite0's stages, as in the TF builder's block strings:
# (kernel, repeats, filters out, expand ratio, stride of the first block).
BASE_STAGES = (
    (3, 1, 16, 1, 1),
    (3, 2, 24, 6, 2),
    (5, 2, 40, 6, 2),
    (3, 3, 80, 6, 2),
    (5, 3, 112, 6, 1),
    (5, 4, 192, 6, 2),
    (3, 1, 320, 6, 1),
)
STEM_FILTERS = 32  # fixed in every variant, as is the head
HEAD_FILTERS = 1280
FILTER_DIVISOR = 8  # scaled filter counts are rounded to a multiple of this
BN_EPSILON = 1e-3
DROP_CONNECT_RATE = 0.2  # stochastic depth, growing linearly with block index
NUM_CLASSES = 1000


@dataclasses.dataclass(frozen=True)
class LiteVariant:
    """One EfficientNet-Lite: how it scales Lite0 (the reference's `efficientnet_lite_params`)."""

    name: str  # the backbone's name in the registry
    width: float  # multiplies every block's filters
    depth: float  # multiplies the repeats of the middle stages
    dropout: float  # before the ImageNet classifier

    def stages(self) -> list[tuple[int, int, int, int, int]]:
        """`BASE_STAGES` scaled to this variant."""
        last = len(BASE_STAGES) - 1
        return [(kernel, repeats if i in (0, last) else math.ceil(self.depth * repeats),
                 _round_filters(filters * self.width), expand, stride)
                for i, (kernel, repeats, filters, expand, stride) in enumerate(BASE_STAGES)]

    def block_names(self) -> list[str]:
        """The Keras name prefix of each MBConv block in order: block1a, block2a, block2b, ..."""
        return [f"block{stage + 1}{string.ascii_lowercase[i]}"
                for stage, (_, repeats, *_rest) in enumerate(self.stages()) for i in range(repeats)]


VARIANTS = {variant.name: variant for variant in (
    LiteVariant("efficientnet_lite0", width=1.0, depth=1.0, dropout=0.2),
    LiteVariant("efficientnet_lite1", width=1.0, depth=1.1, dropout=0.2),
    LiteVariant("efficientnet_lite2", width=1.1, depth=1.2, dropout=0.3),
)}


def _round_filters(filters: float) -> int:
    """The nearest multiple of `FILTER_DIVISOR`, but never more than 10% below `filters` (the reference's rule)."""
    rounded = max(FILTER_DIVISOR, int(filters + FILTER_DIVISOR / 2) // FILTER_DIVISOR * FILTER_DIVISOR)
    return rounded + FILTER_DIVISOR if rounded < 0.9 * filters else rounded


def _bn(name: str) -> layers.BatchNormalization:
    return layers.BatchNormalization(epsilon=BN_EPSILON, name=name)


def _relu6(name: str) -> layers.ReLU:
    return layers.ReLU(max_value=6.0, name=name)


def _mbconv(x, name, kernel, filters_out, expand, stride, drop_rate):
    """One inverted-residual block: 1x1 expand, depthwise k x k, 1x1 project, identity skip."""
    inputs = x
    filters_in = x.shape[-1]
    if expand != 1:
        x = layers.Conv2D(filters_in * expand, 1, padding="same", use_bias=False, name=f"{name}_expand_conv")(x)
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
        raise InvalidInput(f"`image_size` must be an integer between 32 and 1024. Received: image_size={image_size!r}")
    return int(image_size)


def build_efficientnet_lite(variant: LiteVariant, image_size: int = 224, weights_path: str | os.PathLike | None = None,
                            include_top: bool = False, classifier_activation: str | None = "softmax") -> keras.Model:
    """An EfficientNet-Lite on a preprocessed `(image_size, image_size, 3)` input ((x - 127) / 128).

    Args:
        variant: which Lite, e.g. `VARIANTS["efficientnet_lite0"]`.
        image_size: input height and width. Defaults to 224.
        weights_path: a converted weights file (see `imagenet_weights`), or None for random init.
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
    stages = variant.stages()
    names = iter(variant.block_names())
    total = sum(row[1] for row in stages)
    index = 0
    for kernel, repeats, filters_out, expand, stride in stages:
        for i in range(repeats):
            x = _mbconv(x, next(names), kernel, filters_out, expand, stride if i == 0 else 1,
                        DROP_CONNECT_RATE * index / total)
            index += 1
    x = layers.Conv2D(HEAD_FILTERS, 1, padding="same", use_bias=False, name="top_conv")(x)
    x = _bn("top_bn")(x)
    x = _relu6("top_activation")(x)
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dropout(variant.dropout, name="top_dropout")(x)
        x = layers.Dense(NUM_CLASSES, activation=classifier_activation, name="predictions")(x)
    model = keras.Model(inputs, x, name=variant.name)
    if weights_path is not None:
        load_converted_weights(model, weights_path)
    return model


def build_feature_extractor(spec: BackboneSpec, image_size: int, weights_path: str | None) -> keras.Model:
    """The registry's builder: `spec`'s Lite without its classifier, `weights_path` the package's state dict or None."""
    variant = VARIANTS[spec.name]
    converted = _converted(variant, Path(weights_path)) if weights_path is not None else None
    return build_efficientnet_lite(variant, image_size, converted)


def imagenet_weights(name: str = "efficientnet_lite0") -> Path:
    """The converted ImageNet weights of Lite `name`, converted from its package on first use.

    Raises `WeightsUnavailable` (with the pip command) if the package is not installed.
    """
    spec = get_backbone(name)
    return _converted(VARIANTS[spec.name], Path(resolve_weights(spec, "imagenet")))


def _converted(variant: LiteVariant, source: Path) -> Path:
    return efficientnet_lite_weights.converted_weights(source, variant.block_names(), f"{variant.name}_imagenet.h5")


def imagenet_classifier(name: str = "efficientnet_lite0", image_size: int | None = None) -> keras.Model:
    """Lite `name`'s ImageNet classifier with weights: RGB 0-255 in, 1000 softmax probabilities out.

    Class names are in `tlcore.backbones.imagenet`. `image_size` defaults to the variant's
    trained resolution (its registry record's default size).
    """
    spec = get_backbone(name)
    size = _check_size(image_size or spec.default_size)
    core = build_efficientnet_lite(VARIANTS[spec.name], size, imagenet_weights(spec.name), include_top=True)
    inputs = keras.Input((size, size, 3), name="rgb")
    outputs = core(BackbonePreprocessing(spec.preprocessing, name="preprocessing")(inputs), training=False)
    return keras.Model(inputs, outputs, name=f"{spec.name}_imagenet")


def load_converted_weights(model: keras.Model, path: str | os.PathLike) -> None:
    """Sets every weighted layer of `model` from a file written by `imagenet_weights`, by layer name."""
    with h5py.File(path, "r") as f:
        for layer in model.layers:
            if not layer.weights:
                continue
            if layer.name not in f:
                raise ValueError(f"{Path(path).name} has no weights for layer {layer.name!r}.")
            group = f[layer.name]
            layer.set_weights([group[str(i)][()] for i in range(len(group))])
