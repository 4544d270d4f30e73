"""A run's operating point: its probability calibration and its abstention threshold, if it has them.

Both are optional files in the run folder, written by calibration after training:

    calibration.json   {"temperature": T, ...}   temperature scaling of the softmax
    threshold.json     {"threshold": t, ...}     below this top probability the model abstains

`read_operating_point` is the one place exports, the model card and the HTTP endpoint read
them, so a run without them behaves as before (raw softmax, never abstains).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from tlcore.calibration import apply_temperature
from tlcore.errors import InvalidInput
from tlcore.run_folder import RunFolder


@dataclasses.dataclass(frozen=True)
class OperatingPoint:
    """Temperature and threshold of a run (each None when the run has none), with their files' contents."""

    temperature: float | None = None
    threshold: float | None = None
    calibration: dict[str, Any] = dataclasses.field(default_factory=dict)  # calibration.json as written
    threshold_info: dict[str, Any] = dataclasses.field(default_factory=dict)  # threshold.json as written

    def calibrate(self, probs: np.ndarray) -> np.ndarray:
        """Temperature-scaled probabilities: softmax(log(p) / T), the same as scaling the logits."""
        probs = np.asarray(probs, dtype="float64")
        if self.temperature is None or self.temperature == 1.0:
            return probs
        return apply_temperature(probs, self.temperature)

    def abstains(self, confidence: float) -> bool:
        """True when the top probability is below the threshold; always False without one."""
        return self.threshold is not None and float(confidence) < self.threshold

    def files(self, folder: RunFolder) -> dict[str, dict[str, Any]]:
        """The files to ship with the model: file name (as in `folder`) -> contents, only those the run has."""
        out = {}
        if self.calibration:
            out[folder.calibration_file.name] = self.calibration
        if self.threshold_info:
            out[folder.threshold_file.name] = self.threshold_info
        return out


def read_operating_point(folder: RunFolder) -> OperatingPoint:
    """The calibration and threshold in a run folder; an empty `OperatingPoint` when it has neither.

    Raises:
        InvalidInput: a file is there but is not a JSON object with a usable number.
    """
    calibration = _read(folder.calibration_file)
    threshold_info = _read(folder.threshold_file)
    temperature = _number(calibration, "temperature", folder.calibration_file, lambda v: v > 0, "above 0")
    threshold = _number(threshold_info, "threshold", folder.threshold_file, lambda v: 0 <= v <= 1,
                        "between 0 and 1")
    if threshold is not None and (threshold_info.get("reached") is False or threshold >= 1.0):
        threshold = None  # the target precision was not reached below 1.0: no usable threshold
    return OperatingPoint(temperature, threshold, calibration, threshold_info)


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except ValueError as exc:
        raise InvalidInput(f"{path} is not valid JSON ({exc}); recalibrate the run or delete the file.") from None
    if not isinstance(data, dict):
        raise InvalidInput(f"{path} must hold a JSON object. Received: {type(data).__name__}")
    return data


def _number(data: dict[str, Any], key: str, path: Path, valid: Callable[[float], bool], bound: str) -> float | None:
    if not data:
        return None
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not valid(value):
        raise InvalidInput(f"`{key}` in {path} must be a number {bound}. Received: {key}={value!r}")
    return float(value)
