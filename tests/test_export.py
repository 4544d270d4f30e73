"""Export: keras copy, SavedModel and float32 TFLite give the same answers as the run's model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.test_inference import save_fake_run


def _probe():
    return np.random.default_rng(1).integers(0, 255, (2, 32, 32, 3)).astype("float32")


def test_export_keras_copy_and_unknown_format(tmp_path):
    from tlcore.deploy import inference
    from tlcore.deploy.export import export_run

    model, folder = save_fake_run()
    out = export_run("run-fake", "keras", tmp_path / "out")  # a new path: `.keras` is added
    assert out.name == "out.keras"
    assert out.read_bytes() == (folder / "model.keras").read_bytes()
    assert json.loads(out.with_name(out.stem + ".labels.json").read_text()) == ["ants", "bees"]
    (tmp_path / "dir").mkdir()
    assert export_run("run-fake", "keras", tmp_path / "dir") == (tmp_path / "dir" / "model.keras").resolve()
    assert export_run("run-fake", "Keras").parent == folder.resolve() / "export"
    with pytest.raises(ValueError, match="format` must be one of keras, savedmodel, tflite, tflite-int8, onnx"):
        export_run("run-fake", "pdf")
    assert inference.load_model_file(out) is not None


@pytest.mark.filterwarnings("ignore:.*tf.lite.Interpreter is deprecated")
def test_export_savedmodel_and_tflite_match_keras(tmp_path):
    import tensorflow as tf

    from tlcore.deploy.export import export_run

    model, _ = save_fake_run()
    x = _probe()
    expected = model.predict(x, verbose=0)

    saved = export_run("run-fake", "savedmodel", tmp_path / "sm")
    reloaded = tf.saved_model.load(str(saved))
    got = reloaded.serve(tf.constant(x)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert json.loads((saved / "labels.json").read_text()) == ["ants", "bees"]

    lite = export_run("run-fake", "tflite", tmp_path / "model.tflite")
    interpreter = tf.lite.Interpreter(model_path=str(lite))
    inp = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(inp["index"], [1, 32, 32, 3])
    interpreter.allocate_tensors()
    assert inp["dtype"] == np.float32 and list(inp["shape"][1:]) == [32, 32, 3]
    for i in range(len(x)):
        interpreter.set_tensor(inp["index"], x[i:i + 1])
        interpreter.invoke()
        out = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
        np.testing.assert_allclose(out[0], expected[i], atol=1e-5)


def test_download_files_are_made_once_and_savedmodel_comes_zipped():
    import zipfile

    from tlcore.deploy.export import cached_download, download_file

    _, folder = save_fake_run()
    assert download_file("run-fake", "keras") == folder / "model.keras"
    assert cached_download("run-fake", "savedmodel") is None
    archive = download_file("run-fake", "savedmodel")
    with zipfile.ZipFile(archive) as zf:
        assert {"savedmodel/saved_model.pb", "savedmodel/labels.json"} <= set(zf.namelist())
    assert cached_download("run-fake", "savedmodel") == archive
    mtime = archive.stat().st_mtime_ns
    assert download_file("run-fake", "savedmodel") == archive and archive.stat().st_mtime_ns == mtime
    save_fake_run(seed=1)  # a new model: the old export is stale
    assert cached_download("run-fake", "savedmodel") is None


def test_an_export_made_by_an_older_version_is_made_again():
    """Files in `export/` made before `EXPORT_VERSION` (a flip-TTA run's SavedModel without the mirror
    average, say) are not handed out as they are: the next download makes them again."""
    from tlcore.deploy.export import EXPORT_VERSION, cached_download, download_file

    _, folder = save_fake_run()
    archive = download_file("run-fake", "savedmodel")
    versions = folder / "export" / "versions.json"
    assert json.loads(versions.read_text()) == {"savedmodel": EXPORT_VERSION}
    assert cached_download("run-fake", "savedmodel") == archive

    versions.unlink()  # as a run exported before versions were recorded
    assert cached_download("run-fake", "savedmodel") is None
    saved_model = folder / "export" / "savedmodel" / "saved_model.pb"
    made = saved_model.stat().st_mtime_ns
    assert download_file("run-fake", "savedmodel") == archive
    assert saved_model.stat().st_mtime_ns > made
    assert cached_download("run-fake", "savedmodel") == archive

    versions.write_text(json.dumps({"savedmodel": EXPORT_VERSION - 1}))
    assert cached_download("run-fake", "savedmodel") is None


def test_an_export_report_from_another_version_or_damaged_loses_only_what_it_lacks(tmp_path):
    from tlcore.deploy.export import describe_report, read_report

    model = tmp_path / "model_int8.tflite"
    model.write_bytes(b"tflite")
    assert read_report(model) is None  # none written
    report = tmp_path / "model_int8.tflite.report.json"
    report.write_text("{damaged")
    assert read_report(model) is None
    report.write_text(json.dumps({"format": "tflite-int8", "int8": {"accuracy": 0.9, "size_bytes": 2**20,
                                                                    "latency_ms_p50": 1.5}}))
    assert describe_report(read_report(model)) == [
        "int8: evaluation accuracy 90.0%, 1.0 MB, 1.50 ms per image (TFLite interpreter, median)."]
    assert describe_report({"format": "onnx", "eval_images": 6}) == []
