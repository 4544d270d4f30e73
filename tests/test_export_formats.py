"""ONNX, int8 TFLite, the model card and the bundle, on one small trained run (see `trained_run`)."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest

from tlcore.records.run_folder import RunFolder


@pytest.fixture(autouse=True)
def tlcore_home(trained_run, monkeypatch):
    monkeypatch.setenv("TLCORE_HOME", str(trained_run.home))
    return trained_run.home


def _eval_rows(run_id):
    from tlcore.evaluate.evaluation import read_predictions

    return read_predictions(RunFolder(run_id).predictions)


def test_onnx_export_agrees_with_keras_and_reports_it(trained_run, tmp_path, monkeypatch):
    import onnxruntime

    from tlcore.data.images import load_resized
    from tlcore.deploy import export, inference
    from tlcore.deploy.export import export_run, read_report

    # The check decodes the evaluation images a batch at a time, never the whole split at once.
    decoded = []
    real_decode = export._decode
    monkeypatch.setattr(export, "EVAL_BATCH", 4)
    monkeypatch.setattr(export, "_decode", lambda paths, size: decoded.append(len(paths)) or real_decode(paths, size))
    (RunFolder(trained_run.run_id).export_dir / "model.onnx").unlink(missing_ok=True)  # made by an earlier test?

    path = export_run(trained_run.run_id, "onnx")
    report = read_report(path)
    rows = _eval_rows(trained_run.run_id)
    assert len(rows) > 4 and max(decoded) == 4 and sum(decoded) == len(rows)
    assert report["eval_images"] == len(rows) and report["eval_split"] == "test"
    assert report["top1_agreement"] == 1.0 and report["disagreements"] == 0
    assert report["max_probability_difference"] < 1e-4

    # Standalone: raw 0-255 pixels in (preprocessing inside the graph), the run's answers out.
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    pixels = np.stack([load_resized(p, 48) for p in rows["path"]]).astype("float32")
    probs = session.run(None, {"image": pixels})[0]
    labels = inference.load_run_model(trained_run.run_id).labels
    assert [labels[i] for i in probs.argmax(-1)] == list(rows["pred"])
    np.testing.assert_allclose(probs.max(-1), rows["confidence"], atol=1e-4)
    assert json.loads(path.with_name("model.labels.json").read_text()) == labels

    # Made once: asking again returns the cached file untouched.
    mtime = path.stat().st_mtime_ns
    assert export_run(trained_run.run_id, "onnx") == path and path.stat().st_mtime_ns == mtime


@pytest.mark.filterwarnings("ignore:.*tf.lite.Interpreter is deprecated")
def test_int8_export_is_quantized_smaller_and_as_accurate_as_float(trained_run):
    from tlcore.deploy.export import INT8_TOLERANCE_POINTS, TFLiteClassifier, export_run, read_report

    path = export_run(trained_run.run_id, "tflite-int8")
    report = read_report(path)
    print(json.dumps(report, indent=1))
    int8, float32 = report["int8"], report["float32"]
    assert report["representative_images"] == 28  # every training image (14 per class), under the cap
    assert int8["size_bytes"] < float32["size_bytes"] / 3  # weights in 8 bits instead of 32
    assert float32["accuracy"] == pytest.approx(_eval_accuracy(trained_run.run_id))
    assert int8["accuracy"] >= float32["accuracy"] - INT8_TOLERANCE_POINTS / 100
    assert report["warning"] is None
    model = TFLiteClassifier(path)
    assert model.input["dtype"] == np.uint8 and list(model.input["shape"]) == [1, 48, 48, 3]


def _eval_accuracy(run_id):
    rows = _eval_rows(run_id)
    return float((rows["true"] == rows["pred"]).mean())


def test_int8_warning_says_how_much_accuracy_is_lost():
    from tlcore.deploy.export import int8_warning

    assert int8_warning(0.90, 0.895, 200, "test") is None  # half a point: within the tolerance
    text = int8_warning(0.90, 0.85, 200, "test")
    assert text.startswith("The int8 model is 5.0 points less accurate than the float32 model (85.0% against 90.0%")
    assert "float32 TFLite file" in text


def test_model_card_says_what_the_model_is_and_how_good(trained_run):
    from tlcore.deploy.export import export_run
    from tlcore.records.store import Store

    md_path = export_run(trained_run.run_id, "card")
    card = json.loads(md_path.with_suffix(".json").read_text())
    run = Store().get_run(trained_run.run_id)
    assert card["model"]["run_id"] == run.id and card["model"]["backbone"] == "EfficientNet-Lite0"
    assert card["model"]["weights"] == "ImageNet" and card["model"]["weights_license"] == "Apache-2.0"
    assert card["model"]["preprocessing"]["input"]["shape"] == [None, 48, 48, 3]
    assert card["dataset"]["label"] == "colours v1" and card["dataset"]["classes"] == ["blue", "red"]
    assert card["dataset"]["counts"] == {"train": {"blue": 14, "red": 14}, "val": {"blue": 3, "red": 3},
                                         "test": {"blue": 3, "red": 3}}
    assert card["recipe"]["head_epochs"] == 8 and card["recipe"]["lr"] == 0.01
    ev = card["evaluation"]
    assert ev["split"] == "test" and ev["images"] == 6 and ev["accuracy"] == run.accuracy
    assert set(ev["per_class"]) == {"blue", "red"} and ev["per_class"]["red"]["support"] == 3
    # Training fitted the run's temperature and "not sure" threshold on its val split.
    assert card["calibration"] == run.summary.calibration.to_dict()
    assert card["threshold"] == run.summary.threshold.to_dict()
    assert any("never shown any other kind of photo" in text for text in card["limits"])
    # This tiny run is sure of all 6 val photos: its 95 % target is reached only at confidence 1.0,
    # which is no usable threshold (one would abstain on nearly everything), and the card says so.
    expected = ("are marked abstained" if run.summary.threshold.usable
                else "It has no usable abstention threshold: no confidence below 1 reached 95% precision")
    assert any(expected in text for text in card["limits"])
    assert card["transfer_lab_version"] and card["trained_at"].startswith("20")

    md = md_path.read_text()
    assert md.startswith(f"# Model card: {run.name}")
    assert "| blue | 14 | 3 | 3 |" in md and "| red | 100.0% | 100.0% | 100.0% | 3 |" in md
    assert "Threshold: none (never abstains)" not in md  # it has a threshold file, usable or not


def test_card_and_bundle_carry_calibration_and_threshold_when_the_run_has_them(trained_run, tmp_path):
    from tlcore.deploy.export import export_run

    folder = RunFolder(trained_run.run_id)
    own = {path: path.read_bytes() for path in (folder.calibration_file, folder.threshold_file) if path.is_file()}
    folder.calibration_file.write_text(json.dumps({"temperature": 1.5, "ece_after": 0.02}))
    folder.threshold_file.write_text(json.dumps({"threshold": 0.8, "coverage": 0.9}))
    try:
        bundle = export_run(trained_run.run_id, "bundle", tmp_path / "bundle.zip")
        with zipfile.ZipFile(bundle) as zf:
            names = set(zf.namelist())
            card = json.loads(zf.read("model_card.json"))
            prep = json.loads(zf.read("preprocessing.json"))
            assert json.loads(zf.read("threshold.json"))["threshold"] == 0.8
            assert json.loads(zf.read("labels.json")) == ["blue", "red"]
            md = zf.read("model_card.md").decode()
    finally:  # the run's own operating point (written by training) back as it was
        for path in (folder.calibration_file, folder.threshold_file):
            path.unlink()
        for path, data in own.items():
            path.write_bytes(data)
    assert {"model.keras", "model.onnx", "labels.json", "preprocessing.json", "model_card.md",
            "model_card.json", "calibration.json", "threshold.json"} <= names
    assert card["calibration"]["temperature"] == 1.5 and card["threshold"]["threshold"] == 0.8
    assert any("below 0.8 are marked abstained" in text for text in card["limits"])
    assert "temperature 1.5" in md and "threshold 0.8" in md
    assert prep["inside_model"]["mode"] == "lite" and prep["input"]["range"] == [0, 255]


def test_a_broken_threshold_file_is_named_in_a_plain_error():
    from tlcore.errors import InvalidInput
    from tlcore.evaluate.operating_point import read_operating_point

    folder = RunFolder("run-with-a-broken-threshold").created()
    folder.threshold_file.write_text(json.dumps({"threshold": 1.7}))
    with pytest.raises(InvalidInput, match=r"`threshold` in .*threshold.json must be a number between 0 and 1. "
                                           r"Received: threshold=1.7"):
        read_operating_point(folder)
    folder.threshold_file.write_text("{not json")
    with pytest.raises(InvalidInput, match="is not valid JSON"):
        read_operating_point(folder)
    assert read_operating_point(RunFolder("run-elsewhere")).threshold is None


def test_cli_exports_onnx_and_prints_the_check(trained_run, capsys):
    from tlcore.cli import main

    assert main(["export", "--run", trained_run.run_id, "--format", "onnx"]) == 0
    out = capsys.readouterr().out
    assert "ONNX Runtime agrees with Keras on the top-1 class of 100.0% of 6 test images" in out

