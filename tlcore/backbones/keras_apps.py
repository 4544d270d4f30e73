"""Keras Applications backbones: the registry's records name this module to build them.

The registry downloads their ImageNet weights into the Keras cache (`resolve_weights`); this
module maps each backbone to its `keras.applications` constructor and builds it headless.
"""

from __future__ import annotations

import keras

from tlcore.backbones.registry import BackboneSpec

CONSTRUCTORS = {
    "vgg16": keras.applications.VGG16,
    "resnet50": keras.applications.ResNet50,
    "inception_v3": keras.applications.InceptionV3,
    "xception": keras.applications.Xception,
    "mobilenet_v2": keras.applications.MobileNetV2,
    "mobilenet_v3_small": keras.applications.MobileNetV3Small,
    "mobilenet_v3_large": keras.applications.MobileNetV3Large,
    "efficientnet_b0": keras.applications.EfficientNetB0,
    "efficientnet_v2_b0": keras.applications.EfficientNetV2B0,
    "convnext_tiny": keras.applications.ConvNeXtTiny,
}


# Keras' EfficientNet (V1) divides its normalised input by sqrt(ImageNet stddev) per channel
# only when built with weights="imagenet" (`applications/efficientnet.py`); built from a
# weights file, as here, it leaves that step out and its ImageNet weights see wrongly scaled
# inputs. The stddev Keras uses for that step:
_EFFICIENTNET_STDDEV_RGB = (0.229, 0.224, 0.225)


def build_feature_extractor(spec: BackboneSpec, image_size: int, weights_path: str | None) -> keras.Model:
    """`spec`'s Keras Application without its classifier or pooling; `weights_path` a notop `.h5` or None."""
    model = CONSTRUCTORS[spec.name](include_top=False, weights=weights_path, input_shape=(image_size, image_size, 3),
                                    pooling=None)
    if weights_path is not None and spec.name == "efficientnet_b0":
        _restore_efficientnet_input_scale(model)
    return model


def _restore_efficientnet_input_scale(model: keras.Model) -> None:
    """Give a weights-file EfficientNet the input scale of Keras' weights="imagenet" graph.

    (x - mean) / sqrt(variance) / sqrt(stddev) = (x - mean) / sqrt(variance * stddev): the
    missing rescaling is folded into the Normalization layer's variance.
    """
    norm = next(layer for layer in model.layers if isinstance(layer, keras.layers.Normalization))
    norm.adapt_variance.assign(norm.adapt_variance * keras.ops.convert_to_tensor(_EFFICIENTNET_STDDEV_RGB))
    norm.finalize_state()
