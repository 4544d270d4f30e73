"""AppTest: the Demo page — the offline ImageNet model, bad photos, models that cannot load."""

from __future__ import annotations

import io
import json
import time

import app_seed as seed
import numpy as np
import pytest
from PIL import Image

from tlcore.records.run_folder import RunFolder


@pytest.fixture(autouse=True)
def _no_device_probe(monkeypatch):
    monkeypatch.setenv("TLAB_DEVICE_PROBE", "off")


def _jpeg() -> bytes:
    rng = np.random.default_rng(0)
    arr = np.zeros((300, 400, 3), np.uint8) + np.array([90, 140, 60], np.uint8)
    arr[100:200, 150:250] = rng.integers(150, 255, (100, 100, 3))
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG")
    return buf.getvalue()


def test_imagenet_model_predicts_with_topk_gradcam_and_latency(store):
    at = seed.app("pages/demo.py", timeout=300).run()
    assert not at.exception
    assert at.selectbox(key="demo.model").value == "imagenet:efficientnet_lite0"
    assert "Upload a photo" in seed.texts(at)
    at.file_uploader(key="demo.upload").set_value(("photo.jpg", _jpeg(), "image/jpeg")).run()
    assert not at.exception, at.exception
    labels = {m.label: m.value for m in at.metric}
    assert {"Prediction", "Confidence", "Latency", "Grad-CAM"} <= set(labels)
    assert len(at.get("plotly_chart")) == 1
    # Another top k reuses the loaded model and this photo's prediction: the rerun is quick.
    start = time.perf_counter()
    at.slider(key="demo.topk").set_value(3).run()
    print(f"top-k rerun took {time.perf_counter() - start:.2f} s")
    latency_ms = float({m.label: m.value for m in at.metric}["Latency"].split()[0])
    assert latency_ms > 0


def test_a_model_file_that_cannot_load_is_explained(store):
    ds = seed.dataset(store)
    run = seed.run(store, ds, "corrupt")
    RunFolder(run.id).model.write_bytes(b"this is not a keras file")
    at = seed.app("pages/demo.py", timeout=300, run=run.id).run()
    assert at.selectbox(key="demo.model").value == run.id
    at.file_uploader(key="demo.upload").set_value(("photo.jpg", _jpeg(), "image/jpeg")).run()
    assert not at.exception
    assert "could not be loaded" in at.error[0].value


def test_not_an_image_is_explained(store):
    at = seed.app("pages/demo.py", timeout=300).run()
    at.file_uploader(key="demo.upload").set_value(("cat.jpg", b"<html>not a photo</html>", "image/jpeg")).run()
    assert not at.exception
    assert "not an image" in at.error[0].value


def test_failed_run_link_is_explained(store):
    from tlcore.records.store import RunStatus

    ds = seed.dataset(store)
    run = seed.run(store, ds, "broken", RunStatus.FAILED, error="Out of memory.")
    at = seed.app("pages/demo.py", timeout=300, run=run.id).run()
    assert not at.exception
    assert "only finished runs can be demoed" in at.warning[0].value and "Out of memory" in at.warning[0].value


class _CountingModel:
    """Stands in for a loaded model: answers at once and records each forward pass it is asked for."""

    RANKED = [("cat", 0.5), ("dog", 0.2), ("fox", 0.15), ("owl", 0.1), ("bee", 0.05)]

    def __init__(self, ref: str, calls: list, ranked=None):
        self.ref, self.calls, self.ranked = ref, calls, ranked or self.RANKED

    def predict(self, image: bytes, top_k: int):
        from tlcore.deploy.inference import Prediction

        self.calls.append(("predict", self.ref, image))
        return Prediction(self.ranked[:top_k], 12.0)

    def gradcam(self, rgb: np.ndarray) -> np.ndarray:
        self.calls.append(("gradcam", self.ref, rgb.shape))
        return np.linspace(0, 1, 49).reshape(7, 7)


def _png(color) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((64, 80, 3), color, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _bars(at) -> list[str]:
    return json.loads(at.get("plotly_chart")[0].proto.spec)["data"][0]["y"]


def test_a_rerun_reuses_the_prediction_and_a_new_photo_or_model_is_predicted_again(store, monkeypatch):
    from ui import state

    ds = seed.dataset(store)
    run = seed.run(store, ds, "insects")
    calls = []
    monkeypatch.setattr(state, "load_model", lambda ref: _CountingModel(ref, calls))
    first, second = _png((200, 60, 40)), _png((40, 60, 200))

    at = seed.app("pages/demo.py", run=run.id).run()
    at.file_uploader(key="demo.upload").set_value(("a.png", first, "image/png")).run()
    assert not at.exception, at.exception
    assert [c[:2] for c in calls] == [("predict", run.id), ("gradcam", run.id)] and calls[0][2] == first
    assert _bars(at)[::-1] == ["cat", "dog", "fox", "owl", "bee"]

    # Other top k, Grad-CAM off and on again: the same photo and model, so no forward pass.
    at.slider(key="demo.topk").set_value(2).run()
    assert _bars(at)[::-1] == ["cat", "dog"]
    at.toggle(key="demo.gradcam").set_value(False).run()
    at.toggle(key="demo.gradcam").set_value(True).run()
    assert not at.exception, at.exception
    assert "Grad-CAM" in {m.label for m in at.metric}
    assert len(calls) == 2

    at.file_uploader(key="demo.upload").set_value(("b.png", second, "image/png")).run()
    assert [c[:2] for c in calls[2:]] == [("predict", run.id), ("gradcam", run.id)] and calls[2][2] == second
    at.selectbox(key="demo.model").select(state.IMAGENET_REF).run()
    assert not at.exception, at.exception
    assert [c[:2] for c in calls[4:]] == [("predict", state.IMAGENET_REF), ("gradcam", state.IMAGENET_REF)]
    assert calls[4][2] == second


def test_below_the_threshold_the_demo_says_not_sure_with_its_top_guesses(store, monkeypatch):
    import dataclasses

    from tlcore.evaluate.calibration import calibrate, choose_threshold
    from ui import state

    ds = seed.dataset(store)
    run = seed.run(store, ds, "insects")
    # On validation: 0.9, 0.8, 0.6 right, 0.45 wrong, 0.3 right -> 95 % needs >= 0.6, 80 % needs >= 0.3.
    threshold = choose_threshold([0.9, 0.8, 0.6, 0.45, 0.3], [1, 1, 1, 0, 1])
    calibration = calibrate(np.array([[0.7, 0.3]]), np.array([0]), np.array([[0.9, 0.1]]), np.array([0]))
    store.set_summary(run.id, dataclasses.replace(run.summary, threshold=threshold, calibration=calibration))
    monkeypatch.setattr(state, "load_model", lambda ref: _CountingModel(ref, []))

    at = seed.app("pages/demo.py", run=run.id).run()
    at.file_uploader(key="demo.upload").set_value(("a.png", _png((200, 60, 40)), "image/png")).run()
    assert not at.exception, at.exception
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Prediction"] == "Not sure" and metrics["Confidence"] == "50.0%"
    text = seed.texts(at)
    assert "Not sure: 95 % precision on validation needs a confidence of at least 60%." in text
    assert "Top guesses: cat 50%, dog 20%, fox 15%." in text
    assert f"temperature-scaled (T = {calibration.temperature:.2f}" in text

    at.slider(key="demo.target").set_value(80).run()
    assert {m.label: m.value for m in at.metric}["Prediction"] == "cat"


def test_a_run_without_threshold_answers_and_says_why(store, monkeypatch):
    import dataclasses

    from tlcore.records.run_record import Calibration
    from ui import state

    ds = seed.dataset(store)
    run = seed.run(store, ds, "no-val")
    store.set_summary(run.id, dataclasses.replace(run.summary, calibration=Calibration(
        ece_before=0.2, reason="The dataset has no validation split to fit a temperature on.")))
    monkeypatch.setattr(state, "load_model", lambda ref: _CountingModel(ref, []))
    at = seed.app("pages/demo.py", run=run.id).run()
    at.file_uploader(key="demo.upload").set_value(("a.png", _png((200, 60, 40)), "image/png")).run()
    assert not at.exception, at.exception
    assert {m.label: m.value for m in at.metric}["Prediction"] == "cat"
    assert "Confidences are raw softmax, not temperature-scaled. The dataset has no validation split" in seed.texts(at)


NONE_CHOICE = "\u2014 none of these \u2014"  # the Demo's "not in any class" option


def _feedback_box(at):
    [box] = [s for s in at.selectbox if s.label == "What is it really?"]
    return box


def test_feedback_preselects_nothing_and_files_confirmed_corrected_or_none_of_these(store, monkeypatch):
    from tlcore.data.feedback import inbox
    from ui import state

    ds = seed.dataset(store)
    run = seed.run(store, ds, "insects")
    ranked = [("bees", 0.8), ("ants", 0.15), ("wasps", 0.05)]
    monkeypatch.setattr(state, "load_model", lambda ref: _CountingModel(ref, [], ranked))
    photos = [_png((200, 60, 40)), _png((40, 60, 200)), _png((128, 128, 120))]
    at = seed.app("pages/demo.py", run=run.id).run()
    for photo, answer, said in ((photos[0], "bees", "Filed as **bees**, confirming the answer"),
                                (photos[1], "ants", "Filed as **ants**, correcting the answer bees"),
                                (photos[2], None, "Filed as **none of these** (the model said bees); it is "
                                                  "recorded and never added to the training data")):
        at.file_uploader(key="demo.upload").set_value(("p.png", photo, "image/png")).run()
        assert not at.exception, at.exception
        box = _feedback_box(at)
        # A new photo: nothing chosen, so filing waits for the user's answer.
        assert box.value is None and at.button(key="demo.feedback_file").disabled
        assert box.options == ["ants", "bees (the model said so)", "wasps", "None of these: it is not in any class"]
        box.select(answer or NONE_CHOICE).run()
        at.button(key="demo.feedback_file").click().run()
        assert not at.exception, at.exception
        assert said in at.success[0].value
    assert [(i.label, i.predicted, i.answer) for i in inbox("insects")] == [
        ("bees", "bees", "confirmed"), ("ants", "bees", "corrected"), (None, "bees", "none of these")]
    with open(inbox("insects")[0].file, "rb") as f:
        assert f.read() == photos[0]


def test_a_target_reached_only_at_confidence_1_is_no_usable_threshold(store, monkeypatch):
    import dataclasses

    from tlcore.evaluate.calibration import choose_threshold
    from ui import state

    ds = seed.dataset(store)
    run = seed.run(store, ds, "insects")
    # On validation only the answers at confidence 1.0 are all right: a threshold of 1 would refuse everything.
    threshold = choose_threshold([1.0, 1.0, 0.9, 0.6], [1, 1, 0, 1])
    assert not threshold.usable
    store.set_summary(run.id, dataclasses.replace(run.summary, threshold=threshold))
    monkeypatch.setattr(state, "load_model", lambda ref: _CountingModel(ref, []))
    at = seed.app("pages/demo.py", run=run.id).run()
    at.file_uploader(key="demo.upload").set_value(("a.png", _png((200, 60, 40)), "image/png")).run()
    assert not at.exception, at.exception
    assert {m.label: m.value for m in at.metric}["Prediction"] == "cat"
    assert ("No usable \"not sure\" threshold: no confidence below 100 % reached 95 % precision on validation, "
            "so every photo gets an answer.") in seed.texts(at)
    at.slider(key="demo.target").set_value(70).run()  # 3 of 4 right from 0.6 up: a usable threshold
    assert {m.label: m.value for m in at.metric}["Prediction"] == "Not sure"


def test_a_run_on_train_val_folders_answers_with_unscaled_confidences_and_says_why(trainval_run, monkeypatch):
    monkeypatch.setenv("TLCORE_HOME", str(trainval_run.home))
    row = json.loads(RunFolder(trainval_run.run_id).predictions.read_text().splitlines()[0])
    at = seed.app("pages/demo.py", timeout=300, run=trainval_run.run_id).run()
    with open(row["path"], "rb") as f:
        at.file_uploader(key="demo.upload").set_value(("val.png", f.read(), "image/png")).run()
    assert not at.exception, at.exception
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Prediction"] == row["pred"] and metrics["Confidence"] == f"{row['confidence']:.1%}"
    assert "Confidences are raw softmax, not temperature-scaled. The dataset has no test split" in seed.texts(at)
