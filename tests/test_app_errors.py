"""AppTest: the Errors page — metrics, confusion matrix, gallery worst first, top confusions."""

from __future__ import annotations

import app_seed as seed
import pytest

from tlcore.store import RunStatus


@pytest.fixture(autouse=True)
def _no_device_probe(monkeypatch):
    monkeypatch.setenv("TLAB_DEVICE_PROBE", "off")


def test_gallery_of_one_cell_is_worst_first(store):
    ds = seed.dataset(store, per_class=8)
    run = seed.run(store, ds, "alpha")
    at = seed.app("pages/errors.py", run=run.id).run()
    assert not at.exception
    text = seed.texts(at)
    assert "Accuracy: 75.0 %" in text and "Wrong: 6 of 24" in text
    top = seed.table(at, "count")
    assert (top.iloc[0]["true"], top.iloc[0]["pred"], top.iloc[0]["count"]) == ("ants", "bees", 4)
    at.selectbox(key="errors.true").select("ants")
    at.selectbox(key="errors.pred").select("bees")
    at.run()
    assert "4 wrong image(s) for true **ants** predicted as **bees**" in seed.texts(at)
    captions = [img.caption for img in at.image] if hasattr(at.image[0], "caption") else []
    confidences = [float(c.split("(")[1].rstrip("%)")) for c in captions if "(" in c]
    assert confidences == sorted(confidences, reverse=True)
    assert len(at.image) == 4


def test_clean_run_says_so(store):
    ds = seed.dataset(store, classes=("wasps", "bees"), per_class=2)
    run = seed.run(store, ds, "clean")
    at = seed.app("pages/errors.py", run=run.id).run()
    assert not at.exception
    assert "No mistakes" in seed.texts(at)


def test_failed_run_is_explained(store):
    ds = seed.dataset(store)
    run = seed.run(store, ds, "broken", RunStatus.FAILED, error="The worker stopped responding.")
    at = seed.app("pages/errors.py", run=run.id).run()
    assert not at.exception
    assert "This run failed" in at.error[0].value and "stopped responding" in at.error[0].value


def test_run_without_predictions_is_explained(store):
    ds = seed.dataset(store)
    run = seed.run(store, ds, "nopred", predictions=False)
    at = seed.app("pages/errors.py", run=run.id).run()
    assert not at.exception
    assert "no saved predictions" in at.warning[0].value


def test_no_runs(store):
    at = seed.app("pages/errors.py").run()
    assert not at.exception
    assert "No finished run yet" in seed.texts(at)
