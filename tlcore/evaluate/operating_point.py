"""A run's operating point: its probability calibration and its abstention threshold, if it has them.

Both are optional files in the run folder, written by calibration after training:

    calibration.json   {"temperature": T or null, "reason": ..., ...}   temperature scaling of the softmax
    threshold.json     {"threshold": t, ...}                            below this top probability: "not sure"

`read_operating_point` is the one reader of these files: predict, the Demo's model, exports, the model
card and the HTTP endpoint all go through it. Every part is optional, for runs of any version: no file,
a missing key or `null` (a run on train/val folders has no temperature, and says why) mean unscaled
probabilities and no abstention. Only a file that is there and damaged is an error.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from tlcore.errors import InvalidInput
from tlcore.evaluate.calibration import apply_temperature
from tlcore.records.run_folder import RunFolder
from tlcore.records.run_record import Calibration, Threshold


@dataclasses.dataclass(frozen=True)
class OperatingPoint:
    """What a run's calibration and threshold files say (each part None when the run has none)."""

    calibration: Calibration | None = None  # None: no calibration.json (a run from before calibration)
    abstention: Threshold | None = None  # None: no usable threshold (the model never abstains)
    declined: Threshold | None = None  # a threshold.json whose target was not reached below 1.0: said, not applied
    written: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # file name -> contents

    @property
    def temperature(self) -> float | None:
        """The fitted temperature, or None: probabilities stay the raw softmax."""
        return self.calibration.temperature if self.calibration else None

    @property
    def threshold(self) -> float | None:
        """The top probability below which the model abstains, or None: it never does."""
        return self.abstention.threshold if self.abstention else None

    def calibrate(self, probs: np.ndarray) -> np.ndarray:
        """Temperature-scaled probabilities: softmax(log(p) / T), the same as scaling the logits;
        `probs` unchanged without a temperature."""
        probs = np.asarray(probs, dtype="float64")
        if self.temperature is None or self.temperature == 1.0:
            return probs
        return apply_temperature(probs, self.temperature)

    def abstains(self, confidence: float) -> bool:
        """True when the top probability is below the threshold; always False without one."""
        return self.threshold is not None and float(confidence) < self.threshold

    def describe_calibration(self) -> str:
        """One sentence for people: the temperature, or that probabilities are unscaled and why."""
        if self.temperature is not None:
            fitted = self.calibration.fitted_on
            return (f"temperature scaling, T = {self.temperature:.3g}"
                    + (f" (fitted on {fitted} validation images)" if fitted else "") + ".")
        reason = self.calibration.reason if self.calibration else None
        return "none (unscaled softmax probabilities)." + (f" {reason}" if reason else "")

    def files(self) -> dict[str, dict[str, Any]]:
        """The files to ship with the model: file name -> contents as written, only those the run has."""
        return dict(self.written)


def read_operating_point(folder: RunFolder) -> OperatingPoint:
    """The calibration and threshold in a run folder; an empty `OperatingPoint` when it has neither.

    Raises:
        InvalidInput: a file is there but is not a JSON object, or holds a value that is not a usable number.
    """
    calibration_data = _read(folder.calibration_file)
    threshold_data = _read(folder.threshold_file)
    _number(calibration_data, "temperature", folder.calibration_file, lambda v: v > 0, "above 0")
    threshold = _number(threshold_data, "threshold", folder.threshold_file, lambda v: 0 <= v <= 1,
                        "between 0 and 1")
    written = {path.name: data for path, data in ((folder.calibration_file, calibration_data),
                                                  (folder.threshold_file, threshold_data)) if data is not None}
    # Without its number a threshold record would default to 1.0 and abstain on everything; a
    # threshold of 1.0 (the target reached only there, or not at all) would too: neither is applied.
    record = Threshold.from_dict(threshold_data) if threshold is not None else None
    usable = usable_threshold(threshold_data)
    return OperatingPoint(
        calibration=Calibration.from_dict(calibration_data) if calibration_data is not None else None,
        abstention=record if usable else None, declined=None if usable else record, written=written)


def usable_threshold(threshold_data: dict[str, Any] | None) -> bool:
    """Whether a threshold.json's contents can be applied: a threshold below 1.0 whose target
    precision was reached (a file without `reached` counts as reached)."""
    value = (threshold_data or {}).get("threshold")
    return value is not None and value < 1.0 and threshold_data.get("reached", True) is not False


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise InvalidInput(f"{path} is not valid JSON ({exc}); retrain the run or delete the file.") from None
    if not isinstance(data, dict):
        raise InvalidInput(f"{path} must hold a JSON object. Received: {type(data).__name__}")
    return data


def _number(data: dict[str, Any] | None, key: str, path: Path, valid: Callable[[float], bool],
            bound: str) -> float | None:
    """`data[key]` as a float; None when the file, the key or its value is missing (null)."""
    value = (data or {}).get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not valid(value):
        raise InvalidInput(f"`{key}` in {path} must be a number {bound}. Received: {key}={value!r}")
    return float(value)
