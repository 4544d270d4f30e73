"""The preprocessing layer every saved model starts with: RGB 0-255 in, what the weights expect out.

A registered layer rather than a Lambda, so saved models load in Keras safe mode.
"""

from __future__ import annotations

import keras
from keras import ops

_CAFFE_BGR_MEANS = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)

MODES = {
    "caffe": "RGB to BGR, minus the ImageNet channel means (VGG, ResNet)",
    "tf": "scaled to [-1, 1] (Inception, Xception, MobileNetV2)",
    "torch": "scaled to [0, 1], minus mean, over std per channel",
    "lite": "(x - 127) / 128 (EfficientNet-Lite)",
    "raw": "unchanged 0-255: the backbone rescales inside itself (EfficientNet, MobileNetV3, ConvNeXt)",
}


@keras.saving.register_keras_serializable(package="tlcore")
class BackbonePreprocessing(keras.layers.Layer):
    """Maps float RGB 0-255 images to a backbone's expected input. `mode` is one of `MODES`."""

    def __init__(self, mode: str, **kwargs):
        super().__init__(**kwargs)
        if mode not in MODES:
            raise ValueError(f"`mode` must be one of {', '.join(MODES)}. Received: mode={mode!r}")
        self.mode = mode

    def call(self, inputs):
        x = ops.cast(inputs, self.compute_dtype)
        if self.mode == "caffe":
            x = ops.flip(x, axis=-1) - ops.convert_to_tensor(_CAFFE_BGR_MEANS, dtype=x.dtype)
        elif self.mode == "tf":
            x = x / 127.5 - 1.0
        elif self.mode == "torch":
            mean = ops.convert_to_tensor(_TORCH_MEAN, dtype=x.dtype)
            std = ops.convert_to_tensor(_TORCH_STD, dtype=x.dtype)
            x = (x / 255.0 - mean) / std
        elif self.mode == "lite":
            x = (x - 127.0) / 128.0
        return x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}
