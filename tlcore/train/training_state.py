"""What a fine-tune checkpoint holds beyond the weights, so that a resumed run continues exactly.

Adam's moments and its step count (the step the warm-up + cosine schedule reads) live in the
optimizer's variables; early stopping keeps the best loss so far, its epoch, the epochs since
and the best weights it restores at the end. Without them a resumed run would restart the
warm-up from step 0 with empty moments and might end on other weights than the same run
without a stop. Saved as one `.npz` beside the checkpoint's weights; a checkpoint without it
(written before it existed) still resumes, from the weights alone. The head phase's weights of the
fine-tuned layers, which the fine-tune's result is chosen against (and averaged with), are saved
once beside them when the fine-tune starts (`save_head`).
"""

from __future__ import annotations

import io
from pathlib import Path

import keras
import numpy as np

from tlcore.records.atomic import write_atomically


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    def write(tmp: Path) -> None:
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        tmp.write_bytes(buffer.getvalue())

    write_atomically(path, write)


def save_head(path: Path, values: list[np.ndarray], val_correct: np.ndarray) -> None:
    """Write what the fine-tune's trainable variables held after the head phase, and which validation
    images the head got right (the fine-tune's result is chosen against them), to `path`."""
    _write_npz(path, {"val_correct": np.asarray(val_correct, bool),
                      **{f"head/{i}": np.asarray(v) for i, v in enumerate(values)}})


def load_head(path: Path, variables) -> tuple[list[np.ndarray], np.ndarray] | None:
    """What `save_head` wrote, if it fits `variables` (the fine-tune's trainable variables); else None
    (no file: a checkpoint from before it existed)."""
    if not path.is_file():
        return None
    with np.load(path) as saved:
        arrays = dict(saved)
    values = [arrays.get(f"head/{i}") for i in range(len(variables))]
    if any(a is None or tuple(a.shape) != tuple(v.shape) for a, v in zip(values, variables)) \
            or f"head/{len(variables)}" in arrays or "val_correct" not in arrays:
        return None
    return values, arrays["val_correct"].astype(bool)


def save(path: Path, optimizer, early_stopping: "ResumableEarlyStopping", *, epoch: int) -> None:
    """Write `optimizer`'s variables and `early_stopping`'s state after fine-tune epoch `epoch` to `path`."""
    arrays = {"epoch": np.array(epoch)}
    arrays.update({f"optimizer/{i}": np.asarray(v) for i, v in enumerate(optimizer.variables)})
    best = early_stopping.best_weights or []
    arrays.update({f"best_weights/{i}": np.asarray(w) for i, w in enumerate(best)})
    arrays["early_stopping"] = np.array([
        early_stopping.wait, early_stopping.best_epoch,
        np.nan if early_stopping.best is None else float(early_stopping.best)], np.float64)
    _write_npz(path, arrays)


def restore(path: Path, optimizer, trainable_variables, early_stopping: "ResumableEarlyStopping", *,
            epoch: int) -> bool:
    """Load what `save` wrote after fine-tune epoch `epoch` into a freshly compiled `optimizer` and
    `early_stopping`.

    Returns False (nothing changed) when `path` does not exist, is of another epoch than the
    checkpoint's weights, or does not fit this optimizer: the run then continues from the
    weights alone.
    """
    if not path.is_file():
        return False
    with np.load(path) as saved:
        arrays = dict(saved)
    if int(arrays.get("epoch", -1)) != epoch:
        return False
    if not optimizer.built:
        optimizer.build(trainable_variables)
    values = [arrays.get(f"optimizer/{i}") for i in range(len(optimizer.variables))]
    if any(a is None or tuple(a.shape) != tuple(v.shape) for a, v in zip(values, optimizer.variables)) \
            or f"optimizer/{len(optimizer.variables)}" in arrays:
        return False
    for variable, value in zip(optimizer.variables, values):
        variable.assign(value)
    wait, best_epoch, best = arrays["early_stopping"]
    best_weights = [arrays[f"best_weights/{i}"] for i in range(sum(k.startswith("best_weights/") for k in arrays))]
    early_stopping.resume_with(int(wait), int(best_epoch), None if np.isnan(best) else float(best),
                               best_weights or None)
    return True


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """Keras' early stopping whose state can be carried over from a stopped run's checkpoint."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._carried: tuple | None = None

    def resume_with(self, wait: int, best_epoch: int, best: float | None, best_weights: list | None) -> None:
        """Start the next `fit` with this state instead of a fresh one."""
        self._carried = (wait, best_epoch, best, best_weights)

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if self._carried is not None:
            self.wait, self.best_epoch, self.best, self.best_weights = self._carried
            self._carried = None
