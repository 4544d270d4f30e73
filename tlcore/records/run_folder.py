"""One run's folder: the only place that knows its layout and file names.

    runs/<id>/config.json              the run's spec (`RunSpec.to_dict`: recipe, resume_from, sweep_id)
    runs/<id>/labels.json              class names, in the model's output order
    runs/<id>/model.keras              the saved classifier (preprocessing inside)
    runs/<id>/predictions.jsonl        one object per evaluation image
    runs/<id>/checkpoint.weights.h5    the last checkpoint's weights
    runs/<id>/checkpoint.json          which phase and epoch that checkpoint is after
    runs/<id>/checkpoint.state.npz     optimizer and early-stopping state of a fine-tune checkpoint
                                       (optional: older checkpoints resume from the weights alone)
    runs/<id>/checkpoint.head.npz      the fine-tuned layers' weights after the head phase, and which
                                       validation images the head got right (optional, as above)
    runs/<id>/tensorboard/<phase>/     TensorBoard logs
    runs/<id>/calibration.json         temperature scaling fitted on validation, ECE before/after
                                       (optional: runs from before calibration have none)
    runs/<id>/threshold.json           the top probability below which the model answers "not sure"
    runs/<id>/export/                  exported copies of the model, made once
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from tlcore.errors import InvalidInput, NotFound
from tlcore.records import home
from tlcore.records.atomic import write_json_atomically
from tlcore.records.config import RunSpec

MODEL_FILE = "model.keras"
LABELS_FILE = "labels.json"
CONFIG_FILE = "config.json"
PREDICTIONS_FILE = "predictions.jsonl"
CHECKPOINT_WEIGHTS_FILE = "checkpoint.weights.h5"
CHECKPOINT_STATE_FILE = "checkpoint.json"
CHECKPOINT_TRAINING_STATE_FILE = "checkpoint.state.npz"
CHECKPOINT_HEAD_FILE = "checkpoint.head.npz"
CALIBRATION_FILE = "calibration.json"
THRESHOLD_FILE = "threshold.json"


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """The last checkpoint of a run: its weights file, after `phase` epoch `epoch`."""

    weights: Path
    phase: str
    epoch: int


@dataclasses.dataclass(frozen=True)
class RunFolder:
    """The artifacts of run `run_id` under the data home's `runs/`."""

    run_id: str

    @property
    def path(self) -> Path:
        return home.data_home() / "runs" / self.run_id

    def created(self) -> "RunFolder":
        """This folder, made if missing (training makes it; readers never do)."""
        self.path.mkdir(parents=True, exist_ok=True)
        return self

    @property
    def model(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def labels_file(self) -> Path:
        return self.path / LABELS_FILE

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def predictions(self) -> Path:
        return self.path / PREDICTIONS_FILE

    @property
    def checkpoint_weights(self) -> Path:
        return self.path / CHECKPOINT_WEIGHTS_FILE

    @property
    def checkpoint_state(self) -> Path:
        return self.path / CHECKPOINT_STATE_FILE

    @property
    def checkpoint_training_state(self) -> Path:
        return self.path / CHECKPOINT_TRAINING_STATE_FILE

    @property
    def checkpoint_head(self) -> Path:
        return self.path / CHECKPOINT_HEAD_FILE

    @property
    def calibration_file(self) -> Path:
        return self.path / CALIBRATION_FILE

    @property
    def threshold_file(self) -> Path:
        return self.path / THRESHOLD_FILE

    def tensorboard(self, phase: str) -> Path:
        return self.path / "tensorboard" / phase

    @property
    def export_dir(self) -> Path:
        path = self.path / "export"
        path.mkdir(exist_ok=True)
        return path

    def has_model(self) -> bool:
        return self.model.is_file()

    def labels(self) -> list[str]:
        """The class names in the model's output order.

        Raises:
            NotFound: the run has no labels file (it never started training).
        """
        if not self.labels_file.is_file():
            raise NotFound(f"Run {self.run_id} has no {LABELS_FILE}: it did not get as far as training.")
        return json.loads(self.labels_file.read_text())

    def write_labels(self, labels: list[str]) -> None:
        write_json_atomically(self.labels_file, list(labels))

    def config(self) -> dict[str, Any]:
        """The recipe as run; empty when the folder has no config.json (or an unreadable one), so
        callers fall back to defaults or the stored run's config."""
        try:
            data = json.loads(self.config_file.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def spec(self) -> RunSpec | None:
        """The run's spec from config.json (in any shape a Transfer Lab wrote); None when the folder has
        none, or one that does not read as a spec."""
        try:
            return RunSpec.from_dict(self.config())
        except (InvalidInput, TypeError, ValueError):
            return None

    def tta(self) -> str:
        """How the run's evaluation predicted: "flip" (each image and its mirror averaged) or "none"
        (also for runs from before TTA). Predictions with its model do the same, so they match what
        the evaluation measured."""
        return "flip" if self.config().get("tta") == "flip" else "none"

    def write_spec(self, spec: RunSpec) -> None:
        write_json_atomically(self.config_file, spec.to_dict(), indent=2)

    def write_checkpoint_state(self, phase: str, epoch: int) -> None:
        write_json_atomically(self.checkpoint_state, {"phase": phase, "epoch": epoch})

    def checkpoint(self) -> Checkpoint | None:
        """The last checkpoint, or None when the run saved none."""
        if not self.checkpoint_weights.is_file():
            return None
        try:
            state = json.loads(self.checkpoint_state.read_text())
            return Checkpoint(self.checkpoint_weights, str(state["phase"]), int(state["epoch"]))
        except (OSError, ValueError, TypeError, KeyError):
            return None  # no state (or a damaged one): which epoch the weights are after is unknown
