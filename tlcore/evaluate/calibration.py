"""How far a run's confidences can be trusted: temperature scaling, expected calibration error,
reliability data, and the confidence threshold below which the model should answer "not sure".

Pure numpy/scipy (no Keras). Training fits both on the validation split and stores them with the
run (`RunSummary.calibration`, `RunSummary.threshold`, and the run folder's `calibration.json` /
`threshold.json`); `tlcore.evaluate.operating_point` reads them back for predict, the Demo, exports and the
endpoint, which apply the temperature with `apply_temperature`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from tlcore.errors import InvalidInput
from tlcore.records.atomic import write_json_atomically
from tlcore.records.run_folder import RunFolder
from tlcore.records.run_record import Calibration, CoveragePoint, ReliabilityBin, Threshold

__all__ = ["Calibration", "CoveragePoint", "ReliabilityBin", "Threshold", "apply_temperature", "calibrate",
           "choose_threshold", "coverage_curve", "expected_calibration_error", "fit_temperature",
           "reliability", "retarget", "write_run_calibration"]

ECE_BINS = 15
DEFAULT_TARGET_PRECISION = 0.95
_CURVE_POINTS = 200  # coverage/precision points kept with a run's threshold


# ------------------------------------------------------------------ statistics


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Softmax probabilities rescaled by temperature `temperature`: softmax(log(p) / T).

    T > 1 softens over-confident outputs, T < 1 sharpens them; the top class never changes.
    """
    if not temperature or temperature <= 0:
        raise InvalidInput(f"`temperature` must be positive. Received: temperature={temperature!r}")
    logits = np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1.0)) / float(temperature)
    logits -= logits.max(axis=-1, keepdims=True)
    scaled = np.exp(logits)
    return scaled / scaled.sum(axis=-1, keepdims=True)


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    """The temperature minimising the negative log-likelihood of `labels` (class indices) under `probs`."""
    from scipy.optimize import minimize_scalar

    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    if len(probs) == 0:
        raise InvalidInput("Fitting a temperature needs at least one validation image.")
    log_p = np.log(np.clip(probs, 1e-12, 1.0))

    def nll(log_t: float) -> float:
        z = log_p / np.exp(log_t)
        z -= z.max(axis=1, keepdims=True)
        log_softmax = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        return float(-log_softmax[np.arange(len(labels)), labels].mean())

    # Search log T in [log 0.05, log 20]: wide enough for any trained softmax, bounded for tiny sets.
    found = minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded",
                            options={"xatol": 1e-4})
    return float(np.exp(found.x))


def reliability(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> list[ReliabilityBin]:
    """Predictions grouped into `bins` equal-width confidence bins (the reliability diagram's data).

    A confidence exactly on an edge goes to the bin below it (bins are (lower, upper]).
    """
    confidence, correct = np.asarray(confidence, dtype=np.float64), np.asarray(correct, dtype=bool)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    out = []
    for b in range(bins):
        inside = which == b
        n = int(inside.sum())
        out.append(ReliabilityBin(lower=float(edges[b]), upper=float(edges[b + 1]), count=n,
                                  accuracy=float(correct[inside].mean()) if n else None,
                                  confidence=float(confidence[inside].mean()) if n else None))
    return out


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE: the mean over bins of |accuracy - confidence|, weighted by the share of predictions in each."""
    table = reliability(confidence, correct, bins)
    total = sum(b.count for b in table)
    if not total:
        raise InvalidInput("The expected calibration error needs at least one prediction.")
    return float(sum(b.count / total * abs(b.accuracy - b.confidence) for b in table if b.count))


def calibrate(val_probs: np.ndarray | None, val_labels: np.ndarray | None, eval_probs: np.ndarray,
              eval_labels: np.ndarray, *, no_val_reason: str | None = None) -> Calibration:
    """Fit a temperature on validation and report ECE before/after on the evaluation split.

    Without validation probabilities the run stays uncalibrated: ECE before is still reported,
    and `reason` (`no_val_reason`) says why there is no temperature.
    """
    eval_probs, eval_labels = np.asarray(eval_probs), np.asarray(eval_labels)
    confidence = eval_probs.max(axis=1)
    correct = eval_probs.argmax(axis=1) == eval_labels
    before = reliability(confidence, correct)
    ece_before = expected_calibration_error(confidence, correct)
    if val_probs is None or not len(val_probs):
        return Calibration(ece_before=ece_before, reliability_before=before,
                           reason=no_val_reason or "There is no validation split to fit a temperature on.")
    temperature = fit_temperature(val_probs, val_labels)
    scaled = apply_temperature(eval_probs, temperature).max(axis=1)
    return Calibration(temperature=temperature, ece_before=ece_before,
                       ece_after=expected_calibration_error(scaled, correct), fitted_on=int(len(val_probs)),
                       reliability_before=before, reliability_after=reliability(scaled, correct))


def coverage_curve(confidence: np.ndarray, correct: np.ndarray) -> list[CoveragePoint]:
    """For each distinct confidence t (highest first): coverage and precision when answering only at >= t."""
    confidence, correct = np.asarray(confidence, dtype=np.float64), np.asarray(correct, dtype=bool)
    order = np.argsort(-confidence, kind="stable")
    conf, right = confidence[order], correct[order]
    answered = np.arange(1, len(conf) + 1)
    precision = np.cumsum(right) / answered
    # Ties answer together: keep the last index of each run of equal confidences.
    last = np.r_[conf[1:] != conf[:-1], True]
    return [CoveragePoint(threshold=float(t), coverage=float(n / len(conf)), precision=float(p))
            for t, n, p in zip(conf[last], answered[last], precision[last])]


def choose_threshold(confidence: np.ndarray, correct: np.ndarray,
                     target_precision: float = DEFAULT_TARGET_PRECISION) -> Threshold:
    """The lowest confidence threshold whose answers on validation reach `target_precision`.

    Lowest threshold = most images answered. Defaults to a 95 % target.
    """
    curve = coverage_curve(confidence, correct)
    if len(curve) > _CURVE_POINTS:
        keep = np.unique(np.linspace(0, len(curve) - 1, _CURVE_POINTS).round().astype(int))
        chosen = _pick(curve, target_precision)  # exact on the full curve, before thinning it
        return dataclasses.replace(chosen, curve=[curve[i] for i in keep])
    return _pick(curve, target_precision)


def retarget(threshold: Threshold, target_precision: float) -> Threshold:
    """The threshold for another target precision, read off `threshold`'s stored validation curve."""
    return _pick(threshold.curve, target_precision)


def _pick(curve: list[CoveragePoint], target_precision: float) -> Threshold:
    if not 0 < target_precision <= 1:
        raise InvalidInput(f"`target_precision` must be in (0, 1]. Received: target_precision={target_precision!r}")
    # A threshold at (or above) 1.0 would abstain on nearly every photo: it is no usable threshold.
    meeting = [p for p in curve if p.precision >= target_precision - 1e-12 and p.threshold < 1.0]
    if not meeting:
        return Threshold(target_precision=target_precision, curve=curve)
    best = min(meeting, key=lambda p: p.threshold)
    return Threshold(target_precision=target_precision, threshold=best.threshold, reached=True,
                     precision=best.precision, coverage=best.coverage, curve=curve)


# ------------------------------------------------------------------ run files


def write_run_calibration(run_id: str, calibration: Calibration, threshold: Threshold | None) -> None:
    """`calibration.json` and (when chosen) `threshold.json` in the run folder, as in the run summary."""
    folder = RunFolder(run_id)
    write_json_atomically(folder.calibration_file, calibration.to_dict())
    if threshold is not None:
        write_json_atomically(folder.threshold_file, threshold.to_dict())

