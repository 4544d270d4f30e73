"""AppTest: the Export page — download buttons per format, prepared on request and then kept."""

from __future__ import annotations

import shutil

import app_seed as seed
import pytest


@pytest.fixture(autouse=True)
def _no_device_probe(monkeypatch):
    monkeypatch.setenv("TLAB_DEVICE_PROBE", "off")


@pytest.fixture
def copied_run(trained_run, tmp_path, monkeypatch):
    """The trained run in a data home of this test's own, without any export made yet."""
    data_home = tmp_path / "home"
    shutil.copytree(trained_run.home, data_home, ignore=shutil.ignore_patterns("export", "cache"))
    monkeypatch.setenv("TLCORE_HOME", str(data_home))
    return trained_run.run_id


def _buttons(at):
    return {b.key.rsplit(".", 1)[1]: b for b in at.button if b.key and b.key.startswith("export.make.")}


def _downloads(at):
    return {b.key.rsplit(".", 1)[1]: b for b in at.download_button}


def test_keras_downloads_at_once_and_other_formats_after_preparing(copied_run, monkeypatch):
    from tlcore.records import home
    from tlcore.train import devices

    monkeypatch.setattr(devices, "_declared_roles", [])
    monkeypatch.setattr(devices, "_policy", "dashboard: (this test applies nothing)")

    at = seed.app("pages/export.py", timeout=300, run=copied_run).run()
    assert not at.exception, at.exception
    assert at.selectbox(key="export.run").value == copied_run
    assert set(_downloads(at)) == {"keras"}
    assert set(_buttons(at)) == {"savedmodel", "tflite", "tflite-int8", "onnx", "bundle", "card"}

    _buttons(at)["card"].click().run()
    assert not at.exception, at.exception
    assert set(_downloads(at)) == {"keras", "card"}
    card = home.data_home() / "runs" / copied_run / "export" / "model_card.md"
    assert card.read_text().startswith("# Model card:")

    _buttons(at)["onnx"].click().run()
    assert not at.exception, at.exception
    assert set(_downloads(at)) == {"keras", "card", "onnx"}
    assert "ONNX Runtime agrees with Keras on the top-1 class of 100.0% of 6 test images" in seed.texts(at)
    assert "accuracy and speed checked on the test images" in seed.texts(at)  # the split the checks use
    assert set(devices.declared_roles()) == {"dashboard"}  # the export ran under the dashboard's cap

    # Made once: a fresh session finds the files and offers them without preparing again.
    again = seed.app("pages/export.py", run=copied_run).run()
    assert set(_downloads(again)) == {"keras", "card", "onnx"} and "onnx" not in _buttons(again)


def test_a_run_without_a_model_file_says_so(store):
    ds = seed.dataset(store)
    run = seed.run(store, ds, "no-model")
    at = seed.app("pages/export.py", run=run.id).run()
    assert not at.exception, at.exception
    assert "has no saved model file" in seed.texts(at)
    assert not at.download_button


def test_no_finished_run_points_to_train(store):
    at = seed.app("pages/export.py").run()
    assert not at.exception, at.exception
    assert "No finished run yet" in seed.texts(at)


def test_a_failed_export_says_why_at_the_first_attempt_and_keeps_saying_it(copied_run, monkeypatch):
    from tlcore.deploy import export

    def broken(run_id, fmt, progress=None):
        progress(0.5, "Converting")
        raise TypeError("float() argument must be a string or a real number, not 'NoneType'")

    monkeypatch.setattr(export, "download_file", broken)
    at = seed.app("pages/export.py", run=copied_run).run()
    _buttons(at)["bundle"].click().run()
    assert not at.exception, at.exception
    message = ("Bundle (zip) could not be made: TypeError: float() argument must be a string or a real number, "
               "not 'NoneType'")
    assert [e.value for e in at.error] == [message]
    assert "bundle" not in _downloads(at)
    at.run()  # any later rerun (another click, the sidebar) still shows it
    assert [e.value for e in at.error] == [message]


def test_download_names_are_file_safe_and_short():
    from ui import format as fmt

    assert (fmt.file_name("catsdogs backbone=efficientnet_lite0 lr=0.0003 seed=1 (0e566b)", ".keras")
            == "catsdogs_backbone_efficientnet_lite0_lr_0.0003_seed_1_0e566b.keras")
    assert len(fmt.file_name("x" * 300, ".onnx")) == 64 + len(".onnx")
    assert fmt.file_name("lr=3e-4 · seed 1 (0e566b)", "-bundle.zip") == "lr_3e-4_seed_1_0e566b-bundle.zip"
    assert fmt.file_name("../..", ".onnx") == "model.onnx"


def test_a_run_on_train_val_folders_says_its_exports_are_uncalibrated_and_makes_its_card(
        trainval_run, tmp_path, monkeypatch):
    data_home = tmp_path / "home"
    shutil.copytree(trainval_run.home, data_home, ignore=shutil.ignore_patterns("export", "cache"))
    monkeypatch.setenv("TLCORE_HOME", str(data_home))
    at = seed.app("pages/export.py", run=trainval_run.run_id).run()
    assert not at.exception, at.exception
    assert ("Calibration (in the bundle, the card and the endpoint): none (unscaled softmax probabilities). "
            "The dataset has no test split") in seed.texts(at)
    _buttons(at)["card"].click().run()
    assert not at.exception, at.exception
    assert not at.error and set(_downloads(at)) == {"keras", "card"}
    card = (data_home / "runs" / trainval_run.run_id / "export" / "model_card.md").read_text()
    assert "- Calibration: none (unscaled softmax probabilities)." in card


def test_a_flip_tta_run_says_its_exports_carry_the_mirror_average(copied_run):
    import json

    from tlcore.records.run_folder import RunFolder

    plain = seed.app("pages/export.py", run=copied_run).run()
    assert "test-time augmentation" not in seed.texts(plain)

    config_file = RunFolder(copied_run).config_file
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "tta": "flip"}))
    at = seed.app("pages/export.py", run=copied_run).run()
    assert not at.exception, at.exception
    assert ("This run was evaluated with test-time augmentation flip: the SavedModel, TFLite and ONNX files average "
            "each image's probabilities with those of its mirror") in seed.texts(at)
