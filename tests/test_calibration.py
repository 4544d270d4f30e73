"""Calibration statistics against hand-computed cases: ECE and its bins, temperature scaling, and the
"not sure" threshold for a target precision."""

from __future__ import annotations

import numpy as np
import pytest

from tlcore.errors import InvalidInput
from tlcore.evaluate.calibration import (
    apply_temperature,
    calibrate,
    choose_threshold,
    expected_calibration_error,
    fit_temperature,
    reliability,
    retarget,
    write_run_calibration,
)
from tlcore.evaluate.operating_point import read_operating_point
from tlcore.records.run_folder import RunFolder
from tlcore.records.run_record import Calibration, RunSummary


def test_ece_is_the_weighted_gap_between_confidence_and_accuracy():
    # Two at 0.9 with one right (gap 0.4), two at 0.6 both right (gap 0.4): ECE 0.4.
    assert expected_calibration_error([0.9, 0.9, 0.6, 0.6], [1, 0, 1, 1]) == pytest.approx(0.4)
    assert expected_calibration_error([0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7],
                                      [1] * 7 + [0] * 3) == pytest.approx(0.0)


def test_reliability_has_15_bins_with_edges_going_to_the_bin_below():
    bins = reliability([1 / 15, 1.0, 0.5], [True, False, True])
    assert len(bins) == 15
    assert bins[0].count == 1 and bins[14].count == 1 and bins[7].count == 1
    assert bins[14].accuracy == 0.0 and bins[14].confidence == 1.0
    assert bins[3].count == 0 and bins[3].accuracy is None


def test_temperature_scaling_by_hand():
    probs = np.array([[0.8, 0.2]])
    np.testing.assert_allclose(apply_temperature(probs, 2.0), [[2 / 3, 1 / 3]])  # sqrt(0.8)/sqrt(0.2) = 2
    np.testing.assert_allclose(apply_temperature(probs, 1.0), probs)
    with pytest.raises(InvalidInput, match="`temperature` must be positive"):
        apply_temperature(probs, 0)


def test_fitted_temperature_undoes_known_overconfidence():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 1.5, (4000, 4))
    true_probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = np.array([rng.choice(4, p=p) for p in true_probs])
    overconfident = np.exp(3 * logits) / np.exp(3 * logits).sum(axis=1, keepdims=True)
    temperature = fit_temperature(overconfident, labels)
    assert temperature == pytest.approx(3.0, rel=0.1)
    c = calibrate(overconfident[:2000], labels[:2000], overconfident[2000:], labels[2000:])
    assert c.temperature == pytest.approx(temperature, rel=0.1) and c.fitted_on == 2000
    assert c.ece_after < c.ece_before / 2


def test_no_validation_images_says_why_there_is_no_temperature():
    c = calibrate(None, None, np.array([[0.9, 0.1], [0.4, 0.6]]), np.array([0, 0]), no_val_reason="No val split.")
    assert c.temperature is None and c.ece_after is None and c.reason == "No val split."
    assert c.ece_before == pytest.approx(0.5 * 0.1 + 0.5 * 0.6)


def test_threshold_is_the_lowest_confidence_reaching_the_target_precision():
    confidence = [0.99, 0.95, 0.9, 0.8, 0.7, 0.6]
    correct = [1, 1, 1, 0, 1, 0]
    # Answering at >= t: 0.9 -> 3/3 right (coverage 1/2); 0.8 -> 3/4; 0.7 -> 4/5; 0.6 -> 4/6.
    t = choose_threshold(confidence, correct)
    assert (t.threshold, t.coverage, t.precision, t.reached) == (0.9, 0.5, 1.0, True)
    t80 = choose_threshold(confidence, correct, target_precision=0.8)
    assert (t80.threshold, t80.coverage, t80.precision) == (0.7, pytest.approx(5 / 6), pytest.approx(0.8))
    assert retarget(t, 0.8) == t80  # read off the stored curve
    assert [p.threshold for p in t.curve] == confidence


def test_an_unreachable_target_is_no_usable_threshold():
    t = choose_threshold([0.9, 0.8], [0, 0])
    assert (t.reached, t.usable, t.coverage) == (False, False, 0.0)
    # Reached only by the answers at confidence 1.0: abstaining below 1 would refuse nearly every photo.
    at_one = choose_threshold([1.0, 1.0, 0.9, 0.6], [1, 1, 0, 1])
    assert (at_one.reached, at_one.usable) == (False, False)
    assert choose_threshold([1.0, 1.0, 0.9, 0.6], [1, 1, 0, 1], target_precision=0.7).threshold == 0.6
    tied = choose_threshold([0.9, 0.9, 0.5], [1, 0, 1])  # ties are answered together
    assert [(p.threshold, p.coverage, p.precision) for p in tied.curve] == [(0.9, 2 / 3, 0.5), (0.5, 1.0, 2 / 3)]


def test_a_long_curve_is_thinned_but_the_threshold_stays_exact():
    rng = np.random.default_rng(1)
    confidence = rng.uniform(0.3, 1.0, 1000)
    correct = rng.uniform(size=1000) < confidence
    t = choose_threshold(confidence, correct, 0.9)
    assert len(t.curve) <= 200
    answered = confidence >= t.threshold
    assert correct[answered].mean() == pytest.approx(t.precision) and t.precision >= 0.9


def test_run_files_round_trip_and_old_summaries_read_without_calibration(tlcore_home):
    c = calibrate(np.array([[0.7, 0.3], [0.2, 0.8]]), np.array([0, 1]), np.array([[0.9, 0.1]]), np.array([0]))
    t = choose_threshold([0.9, 0.6], [1, 0])
    RunFolder("run-x").created()
    write_run_calibration("run-x", c, t)
    point = read_operating_point(RunFolder("run-x"))
    assert point.calibration == c and point.abstention == t
    other = read_operating_point(RunFolder("run-other"))
    assert other.calibration is None and other.abstention is None and other.files() == {}
    old = RunSummary.from_dict({"backbone": "b", "weights": "imagenet", "dataset": "d v1", "dataset_id": "d",
                                "image_size": 32, "eval_split": "test", "eval_images": 1,
                                "metrics": {"accuracy": 1.0, "macro_f1": 1.0}})
    assert old.calibration is None and old.threshold is None
    again = RunSummary.from_dict({**old.to_dict(), "calibration": c.to_dict()})
    assert isinstance(again.calibration, Calibration) and again.calibration == c


def test_a_run_with_no_usable_threshold_never_abstains_and_its_card_says_so(tlcore_home):
    from tlcore.evaluate.model_card import _limits
    from tlcore.evaluate.operating_point import read_operating_point

    folder = RunFolder("run-x").created()
    threshold = choose_threshold([1.0, 1.0, 0.9], [1, 1, 0])
    write_run_calibration("run-x", Calibration(ece_before=0.1, reason="No val split."), threshold)
    point = read_operating_point(folder)
    assert point.threshold is None and not point.abstains(0.99) and point.declined.reached is False
    metrics = {"per_class": {"a": {"support": 30}, "b": {"support": 30}}}
    limits = " ".join(_limits(["a", "b"], metrics, "test", {"train": {"a": 50, "b": 50}}, point, True))
    assert "It has no usable abstention threshold: no confidence below 1 reached 95% precision" in limits
    assert "below 1 are marked abstained" not in limits
