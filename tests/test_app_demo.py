"""AppTest: the Demo page — the offline ImageNet model, bad photos, models that cannot load."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image

import app_seed as seed
from tlcore import home


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
    # Cached model: the next prediction is quick.
    start = time.perf_counter()
    at.slider(key="demo.topk").set_value(3).run()
    assert time.perf_counter() - start < 5
    latency_ms = float({m.label: m.value for m in at.metric}["Latency"].split()[0])
    assert latency_ms < 1000


def test_a_model_file_that_cannot_load_is_explained(store):
    ds = seed.dataset(store)
    run = seed.run(store, ds, "corrupt")
    (home.run_dir(run.id) / "model.keras").write_bytes(b"this is not a keras file")
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
    from tlcore.store import RunStatus

    ds = seed.dataset(store)
    run = seed.run(store, ds, "broken", RunStatus.FAILED, error="Out of memory.")
    at = seed.app("pages/demo.py", timeout=300, run=run.id).run()
    assert not at.exception
    assert "only finished runs can be demoed" in at.warning[0].value and "Out of memory" in at.warning[0].value
