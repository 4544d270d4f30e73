"""The backbone registry: every entry builds, preprocessing matches Keras, offline failure is one sentence,
and imports inside `tlcore.backbones` run one way (families -> registry), so listing needs no Keras."""

from __future__ import annotations

import ast
import graphlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tlcore.backbones import WeightsUnavailable, get_backbone, list_backbones, resolve_weights
from tlcore.backbones.preprocessing import BackbonePreprocessing

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tlcore" / "backbones"
SUBMODULES = sorted(path.stem for path in PACKAGE.glob("*.py") if path.stem != "__init__")
REQUIRED = {"vgg16", "resnet50", "inception_v3", "xception", "mobilenet_v2", "mobilenet_v3_small",
            "mobilenet_v3_large", "efficientnet_b0", "efficientnet_v2_b0", "convnext_tiny", "efficientnet_lite0"}


def test_registry_has_the_required_backbones_offline_one_first():
    specs = list_backbones()
    assert REQUIRED <= {s.name for s in specs}
    assert specs[0].name == "efficientnet_lite0" and specs[0].offline and specs[0].weights_available()


def test_listing_backbones_imports_neither_keras_nor_tensorflow():
    # What the Train page and `python -m tlcore backbones` read, in a process that has imported nothing yet.
    code = textwrap.dedent("""
        import json, sys
        from tlcore.backbones import get_backbone, list_backbones
        rows = [[s.name, s.display_name, s.default_size, s.min_size, s.preprocessing, s.license,
                 s.weights_origin, s.imagenet_top1, s.params_m, s.offline, s.weights_available()]
                for s in list_backbones()]
        get_backbone("resnet50")
        print(json.dumps({"rows": rows, "keras": "keras" in sys.modules, "tensorflow": "tensorflow" in sys.modules}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True,
                         cwd=ROOT)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert not result["keras"] and not result["tensorflow"]
    rows = {row[0]: row for row in result["rows"]}
    assert REQUIRED <= set(rows)
    assert rows["efficientnet_lite0"][-1] is True  # offline weights found without Keras


def _backbones_modules_imported_by(path: Path) -> set[str]:
    """The `tlcore.backbones` modules `path` imports anywhere, inside functions too."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module == "tlcore.backbones":
            found |= {alias.name for alias in node.names if alias.name in SUBMODULES} | {"__init__"}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        found |= {name.split(".")[2] for name in names if name.startswith("tlcore.backbones.")}
    return found


IMPORT_GRAPH = {path.stem: _backbones_modules_imported_by(path) for path in PACKAGE.glob("*.py")}


def test_backbones_imports_run_one_way():
    assert IMPORT_GRAPH["registry"] == set(), "the registry imports no family"
    assert IMPORT_GRAPH["__init__"] == {"registry"}, "importing the package imports no family (and no Keras)"
    assert {"registry", "efficientnet_lite_weights"} <= IMPORT_GRAPH["efficientnet_lite"]
    try:
        list(graphlib.TopologicalSorter(IMPORT_GRAPH).static_order())
    except graphlib.CycleError as error:
        pytest.fail(f"import circle: {' -> '.join(error.args[1])}")


FIRST_IMPORT = """
import importlib, sys, traceback
failures = {}
for name in sys.argv[1:]:
    # Forget every tlcore module, so `name` is imported first (Keras and TensorFlow stay loaded).
    for loaded in [m for m in sys.modules if m == "tlcore" or m.startswith("tlcore.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module("tlcore.backbones." + name)
    except Exception as exc:
        failures[name] = traceback.format_exception_only(exc)[-1].strip()
print(repr(failures))
"""


def test_each_importing_backbones_module_imports_first():
    # An import circle breaks only when one of its modules is imported first: try each first, in one
    # fresh process that forgets tlcore's modules between tries. Modules importing no other backbones
    # module cannot be in a circle; the registry is tried all the same.
    first = sorted({"registry"} | {name for name in SUBMODULES if IMPORT_GRAPH[name] - {"__init__"}})
    assert {"registry", "efficientnet_lite", "keras_apps"} <= set(first)
    done = subprocess.run([sys.executable, "-c", FIRST_IMPORT, *first], cwd=ROOT, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "{}", done.stdout[-2000:]


def test_unknown_backbone_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"Known backbones: .*resnet50.*Received: backbone='resnet18'"):
        get_backbone("resnet18")


@pytest.mark.parametrize("name", sorted(REQUIRED - {"efficientnet_lite0"}))
def test_each_keras_backbone_builds_a_feature_map_without_weights(name):
    spec = get_backbone(name)
    size = max(spec.min_size, 75)
    features = spec.build(size, None)(np.zeros((1, size, size, 3), "float32"))
    assert features.ndim == 4 and features.shape[0] == 1


@pytest.mark.parametrize("mode, reference", [
    ("caffe", "keras.applications.vgg16.preprocess_input"),
    ("tf", "keras.applications.mobilenet_v2.preprocess_input"),
    ("torch", "keras.applications.densenet.preprocess_input"),
])
def test_preprocessing_layer_matches_the_keras_reference(mode, reference):
    import keras  # noqa: F401  (the reference path is evaluated below)

    rgb = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    expected = eval(reference)(rgb.copy())
    got = np.asarray(BackbonePreprocessing(mode)(rgb))
    np.testing.assert_allclose(got, expected, atol=1e-3)


def test_missing_keras_weights_offline_fail_with_one_sentence_naming_file_and_folder(monkeypatch, tmp_path):
    import dataclasses

    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    spec = dataclasses.replace(get_backbone("resnet50"), weights_url="http://127.0.0.1:9/resnet50_notop.h5")
    with pytest.raises(WeightsUnavailable) as caught:
        resolve_weights(spec, "imagenet")
    message = str(caught.value)
    assert spec.weights_file in message and "weights" in message and "--weights none" in message
    assert "\n" not in message
    assert resolve_weights(spec, "none") is None


def test_efficientnet_b0_from_a_weights_file_scales_inputs_like_keras_imagenet_graph(tmp_path, monkeypatch):
    """Keras adds EfficientNet's stddev rescaling only for weights="imagenet"; a weights file must not lose it."""
    import keras
    from keras.src.applications import efficientnet

    size = 32
    random_weights = keras.applications.EfficientNetB0(include_top=False, weights=None,
                                                       input_shape=(size, size, 3))
    norm = next(layer for layer in random_weights.layers if isinstance(layer, keras.layers.Normalization))
    norm.adapt_mean.assign([0.485, 0.456, 0.406])
    norm.adapt_variance.assign([0.229 ** 2, 0.224 ** 2, 0.225 ** 2])
    path = str(tmp_path / "efficientnetb0_random.weights.h5")
    random_weights.save_weights(path)
    # Keras' own "imagenet" graph, its download replaced by the random file (nothing downloads).
    monkeypatch.setattr(efficientnet.file_utils, "get_file", lambda *args, **kwargs: path)
    keras_imagenet = keras.applications.EfficientNetB0(include_top=False, weights="imagenet",
                                                       input_shape=(size, size, 3))

    ours = get_backbone("efficientnet_b0").build(size, path)
    x = np.random.default_rng(0).uniform(0, 255, (2, size, size, 3)).astype("float32")
    expected = np.asarray(keras_imagenet(x, training=False))  # direct calls: no graph traced for one batch
    scale = np.abs(expected).max()
    # Without the rescaling (Keras' own graph built from a file) the features differ by far more.
    assert np.abs(np.asarray(random_weights(x, training=False)) - expected).max() > 0.1 * scale
    np.testing.assert_allclose(np.asarray(ours(x, training=False)), expected, rtol=1e-4, atol=1e-4 * scale)
