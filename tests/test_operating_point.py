"""Calibration and threshold files as any version wrote them: missing files, missing keys and nulls
mean "none" (unscaled probabilities, never abstains); only a damaged file is an error."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tlcore.evaluate.operating_point import read_operating_point
from tlcore.records.run_folder import RunFolder

PROBS = np.array([[0.7, 0.2, 0.1]])


def _folder(calibration=None, threshold=None) -> RunFolder:
    folder = RunFolder("old-run").created()
    for path, data in ((folder.calibration_file, calibration), (folder.threshold_file, threshold)):
        path.unlink(missing_ok=True)
        if data is not None:
            path.write_text(json.dumps(data))
    return folder


@pytest.mark.parametrize("calibration, threshold", [
    (None, None),  # a run from before calibration
    ({"temperature": None, "reason": "The dataset has no test split."}, None),  # train/val folders
    ({}, {}),  # files without their keys
    ({"ece_before": 0.1}, {"threshold": None, "coverage": 0.0}),
])
def test_without_a_temperature_or_threshold_probabilities_stay_and_nothing_abstains(calibration, threshold):
    point = read_operating_point(_folder(calibration, threshold))
    assert point.temperature is None and point.threshold is None
    assert np.array_equal(point.calibrate(PROBS), PROBS) and not point.abstains(0.01)
    assert point.describe_calibration().startswith("none (unscaled softmax probabilities).")
    assert set(point.files()) == {name for name, data in (("calibration.json", calibration),
                                                          ("threshold.json", threshold)) if data is not None}


def test_the_reason_for_no_temperature_is_said():
    point = read_operating_point(_folder({"temperature": None, "reason": "The dataset has no test split."}))
    assert point.describe_calibration() == "none (unscaled softmax probabilities). The dataset has no test split."


def test_a_minimal_file_from_an_older_version_still_applies():
    point = read_operating_point(_folder({"temperature": 2}, {"threshold": 0.6}))
    assert point.temperature == 2.0 and point.calibration.fitted_on == 0
    assert point.calibrate(PROBS)[0, 0] < 0.7 and point.abstains(0.5) and not point.abstains(0.6)
    assert point.describe_calibration() == "temperature scaling, T = 2."


def test_a_damaged_file_is_named_in_one_sentence():
    from tlcore.errors import InvalidInput

    with pytest.raises(InvalidInput, match=r"`temperature` in .*calibration.json must be a number above 0. "
                                           r"Received: temperature='high'"):
        read_operating_point(_folder({"temperature": "high"}))
    with pytest.raises(InvalidInput, match="must hold a JSON object. Received: list"):
        read_operating_point(_folder([1.5]))
