"""AppTest: the Errors page — metrics, confusion matrix, gallery worst first, top confusions."""

from __future__ import annotations

import json

import app_seed as seed
import pytest

from tlcore.records.store import RunStatus


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


def test_every_confusion_cell_is_a_clickable_point_naming_its_cell(store):
    """Plotly selects no heatmap cell, so the matrix carries a selectable point per cell (the
    click itself is walked in the real-browser test)."""
    ds = seed.dataset(store, per_class=8)
    run = seed.run(store, ds, "alpha")
    at = seed.app("pages/errors.py", run=run.id).run()
    chart = at.get("plotly_chart")[0]
    spec = json.loads(chart.proto.spec)
    [points] = [trace for trace in spec["data"] if trace["type"] == "scatter"]
    cells = {(x, y): custom for x, y, custom in zip(points["x"], points["y"], points["customdata"])}
    assert cells[("bees", "ants")] == ["ants", "bees", 4]  # x predicted, y true
    assert len(cells) == 9 and list(chart.proto.selection_mode)  # the chart reports point selections


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


def _calibrated(store, run, val_images: int = 6):
    """Give a seeded run the calibration and threshold training would have stored."""
    import dataclasses

    import numpy as np

    from tlcore.evaluate.calibration import calibrate, choose_threshold

    rng = np.random.default_rng(0)
    probs = rng.dirichlet([4, 1, 1], 40)
    labels = np.where(rng.uniform(size=40) < 0.7, probs.argmax(axis=1), 0)
    calibration = calibrate(probs[:val_images], labels[:val_images], probs[20:], labels[20:])
    threshold = choose_threshold(probs[:20].max(axis=1), probs[:20].argmax(axis=1) == labels[:20], 0.9)
    summary = dataclasses.replace(run.summary, calibration=calibration, threshold=threshold)
    store.set_summary(run.id, summary)
    return calibration, threshold


def test_reliability_diagram_ece_and_coverage_curve_are_shown(store):
    ds = seed.dataset(store)
    run = seed.run(store, ds, "calibrated")
    calibration, threshold = _calibrated(store, run)
    at = seed.app("pages/errors.py", run=run.id).run()
    assert not at.exception, at.exception
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["ECE on val"] == f"{100 * calibration.ece_before:.2f} %"
    assert metrics["ECE after temperature scaling"] == f"{100 * calibration.ece_after:.2f} %"
    assert metrics["Temperature"] == f"{calibration.temperature:.2f}"
    titles = [json.loads(c.proto.spec)["layout"]["title"]["text"] for c in at.get("plotly_chart")[1:]]
    assert titles == ["Reliability (15 confidence bins)", "Answered vs right (validation)"]
    assert f"Below confidence **{threshold.threshold:.3f}**" in seed.texts(at)


def test_a_run_without_validation_split_says_why_it_is_not_calibrated(store):
    import dataclasses

    from tlcore.records.run_record import Calibration

    ds = seed.dataset(store)
    run = seed.run(store, ds, "uncalibrated")
    reason = "The dataset has no test split, so its validation split is the evaluation split."
    store.set_summary(run.id, dataclasses.replace(run.summary, calibration=Calibration(
        ece_before=0.1, reason=reason)))
    at = seed.app("pages/errors.py", run=run.id).run()
    assert not at.exception, at.exception
    assert f"Not calibrated: {reason}" in seed.texts(at)
    assert "No \"not sure\" threshold" in seed.texts(at)
