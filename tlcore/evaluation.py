"""Everything about a model's quality, derived from its stored per-image predictions.

Predictions are computed once after training (`predictions.jsonl` in the run folder);
accuracy, F1, the confusion matrix, top confusions and the error gallery all come from them.
Plotting is the dashboard's business; this module returns data.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from tlcore import home

PREDICTIONS_FILE = "predictions.jsonl"


@dataclasses.dataclass(frozen=True)
class EvalReport:
    labels: list[str]
    accuracy: float
    macro_f1: float
    per_class: pd.DataFrame  # index: label; columns: precision, recall, f1, support
    confusion: np.ndarray  # rows: true label, columns: predicted label
    predictions: pd.DataFrame  # path, source, true, pred, confidence, topk, correct

    @property
    def misclassified(self) -> pd.DataFrame:
        """Wrong predictions, the most confidently wrong first."""
        wrong = self.predictions[~self.predictions["correct"]]
        return wrong.sort_values("confidence", ascending=False).reset_index(drop=True)

    def errors_for(self, true: str | None = None, pred: str | None = None) -> pd.DataFrame:
        """The misclassified images of one confusion-matrix cell, row or column."""
        wrong = self.misclassified
        if true is not None:
            wrong = wrong[wrong["true"] == true]
        if pred is not None:
            wrong = wrong[wrong["pred"] == pred]
        return wrong.reset_index(drop=True)

    def top_confusions(self, n: int = 10) -> pd.DataFrame:
        """The most frequent (true, predicted) mistakes."""
        rows = [(self.labels[i], self.labels[j], int(self.confusion[i, j]))
                for i in range(len(self.labels)) for j in range(len(self.labels))
                if i != j and self.confusion[i, j] > 0]
        table = pd.DataFrame(rows, columns=["true", "pred", "count"])
        return table.sort_values("count", ascending=False, kind="stable").head(n).reset_index(drop=True)

    def metrics(self) -> dict[str, Any]:
        """The JSON summary: accuracy, macro F1 and per-class precision/recall/F1/support."""
        return {
            "accuracy": self.accuracy,
            "macro_f1": self.macro_f1,
            "per_class": {label: {k: (int(v) if k == "support" else float(v)) for k, v in row.items()}
                          for label, row in self.per_class.to_dict("index").items()},
        }


def compute_report(labels: Sequence[str], predictions: pd.DataFrame) -> EvalReport:
    """Metrics for `predictions` (columns true, pred, confidence, ...) over the class list `labels`."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    labels = list(labels)
    predictions = predictions.copy()
    predictions["correct"] = predictions["true"] == predictions["pred"]
    if len(predictions) == 0:
        raise ValueError("There are no evaluation predictions: the evaluation split is empty.")
    precision, recall, f1, support = precision_recall_fscore_support(
        predictions["true"], predictions["pred"], labels=labels, zero_division=0)
    per_class = pd.DataFrame({"precision": precision, "recall": recall, "f1": f1, "support": support},
                             index=pd.Index(labels, name="label"))
    present = per_class["support"] > 0
    return EvalReport(
        labels=labels,
        accuracy=float(predictions["correct"].mean()),
        macro_f1=float(per_class.loc[present, "f1"].mean()),
        per_class=per_class,
        confusion=confusion_matrix(predictions["true"], predictions["pred"], labels=labels),
        predictions=predictions,
    )


def write_predictions(run_dir: Path, rows: list[dict[str, Any]]) -> Path:
    path = run_dir / PREDICTIONS_FILE
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def read_predictions(run_dir: Path) -> pd.DataFrame:
    path = run_dir / PREDICTIONS_FILE
    if not path.exists():
        raise FileNotFoundError(f"Run folder {run_dir} has no {PREDICTIONS_FILE}: the run did not finish evaluation.")
    with open(path, encoding="utf-8") as f:
        return pd.DataFrame([json.loads(line) for line in f if line.strip()])


def evaluate_run(run_id: str) -> EvalReport:
    """The evaluation report of a finished run, from its stored predictions."""
    folder = home.data_home() / "runs" / run_id
    labels = json.loads((folder / "labels.json").read_text())
    return compute_report(labels, read_predictions(folder))
