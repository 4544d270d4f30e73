"""The classifier every run trains and saves: preprocessing, a frozen backbone, pooling, a softmax head.

`build_classifier` assembles it (the contract in docs/ARCHITECTURE.md); `unfreeze_top` opens the
backbone's top layers for the fine-tune.
"""

from __future__ import annotations

import keras

from tlcore.backbones.preprocessing import BackbonePreprocessing


def build_classifier(spec, size: int, weights_path: str | None, num_classes: int, dropout: float):
    """RGB 0-255 in, class probabilities out, preprocessing inside. Returns (model, backbone)."""
    inputs = keras.Input((size, size, 3), name="image")
    x = BackbonePreprocessing(spec.preprocessing, name="preprocessing")(inputs)
    base = spec.build(size, weights_path)
    base.trainable = False
    # training=False keeps BatchNorm in inference mode even after the top layers are unfrozen.
    x = base(x, training=False)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dropout(dropout, name="head_dropout")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name="head")(x)
    return keras.Model(inputs, outputs, name=f"{spec.name}_classifier"), base


def unfreeze_top(base, n_layers: int) -> int:
    """Make the top `n_layers` weighted layers of `base` trainable, BatchNorm excluded."""
    base.trainable = True
    weighted = [layer for layer in base.layers if layer.weights]
    top = set(id(layer) for layer in weighted[-n_layers:]) if n_layers else set()
    count = 0
    for layer in base.layers:
        layer.trainable = id(layer) in top and not isinstance(layer, keras.layers.BatchNormalization)
        count += layer.trainable
    return count
