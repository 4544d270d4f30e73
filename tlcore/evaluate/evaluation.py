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

from tlcore.errors import InvalidInput, NotFound
from tlcore.records.atomic import write_text_atomically
from tlcore.records.run_folder import RunFolder
from tlcore.records.run_record import ClassMetrics, Metrics


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

    @property
    def smallest_class(self) -> str:
        """The class with the fewest evaluation images; among ties, the one with the lower recall."""
        present = self.per_class[self.per_class["support"] > 0]
        return str(present.sort_values(["support", "recall"], kind="stable").index[0])

    def metrics(self, tta: str = "none") -> Metrics:
        """The run summary's metrics: accuracy, macro F1, per-class precision/recall/F1/support and the
        smallest class's recall; `tta` says how the predictions were made."""
        per_class = {
            label: ClassMetrics(precision=float(row["precision"]), recall=float(row["recall"]),
                                f1=float(row["f1"]), support=int(row["support"]))
            for label, row in self.per_class.to_dict("index").items()}
        smallest = self.smallest_class
        return Metrics(accuracy=self.accuracy, macro_f1=self.macro_f1, per_class=per_class, smallest_class=smallest,
                       smallest_class_recall=per_class[smallest].recall, tta=tta)


def compute_report(labels: Sequence[str], predictions: pd.DataFrame) -> EvalReport:
    """Metrics for `predictions` (columns true, pred, confidence, ...) over the class list `labels`."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    labels = list(labels)
    predictions = predictions.copy()
    predictions["correct"] = predictions["true"] == predictions["pred"]
    if len(predictions) == 0:
        raise InvalidInput("There are no evaluation predictions: the evaluation split is empty.")
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


def write_predictions(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Write per-image predictions (one JSON object per line) atomically."""
    return write_text_atomically(path, "".join(json.dumps(row) + "\n" for row in rows))


def read_predictions(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise NotFound(f"{path.parent} has no {path.name}: the run did not finish evaluation.")
    with open(path, encoding="utf-8") as f:
        return pd.DataFrame([json.loads(line) for line in f if line.strip()])


def evaluate_run(run_id: str) -> EvalReport:
    """The evaluation report of a finished run, from its stored predictions."""
    folder = RunFolder(run_id)
    return compute_report(folder.labels(), read_predictions(folder.predictions))


@dataclasses.dataclass(frozen=True)
class BeforeAfter:
    """Two runs on the images both evaluated, matched by content, judged by the later run's labels
    (after a fix, the corrected ones)."""

    images: int
    before_accuracy: float
    after_accuracy: float
    fixed: int  # wrong before, right after
    broken: int  # right before, wrong after
    relabelled: int  # images whose label differs between the two runs' datasets
    rows: pd.DataFrame  # per image: source, sha256, label_before, label, pred_before, pred_after


def compare_before_after(before_run_id: str, after_run_id: str, before_dataset_id: str,
                         after_dataset_id: str) -> BeforeAfter:
    """How run `after_run_id` (on a fixed version, say) does against `before_run_id` on the images both
    evaluated, matched by content (sha256), whatever their paths or labels in each version.

    Raises:
        InvalidInput: the two runs evaluated no image in common.
        NotFound: a run did not finish evaluation.
    """
    from tlcore.data.manifest import load_manifest

    def by_content(run_id: str, dataset_id: str) -> pd.DataFrame:
        sha = {str(e.path): e.sha256 for e in load_manifest(dataset_id)}
        frame = read_predictions(RunFolder(run_id).predictions)
        return frame.assign(sha256=frame["path"].map(sha)).set_index("sha256")[["source", "true", "pred"]]

    before, after = by_content(before_run_id, before_dataset_id), by_content(after_run_id, after_dataset_id)
    both = before.join(after, how="inner", lsuffix="_before", rsuffix="_after")
    if both.empty:
        raise InvalidInput(f"Runs {before_run_id} and {after_run_id} evaluated no image in common, so they "
                           "cannot be compared image by image; compare their metrics instead.")
    truth = both["true_after"]
    right_before, right_after = both["pred_before"] == truth, both["pred_after"] == truth
    rows = pd.DataFrame({"source": both["source_after"], "label_before": both["true_before"], "label": truth,
                         "pred_before": both["pred_before"], "pred_after": both["pred_after"]}).reset_index()
    return BeforeAfter(
        images=len(both),
        before_accuracy=float(right_before.mean()),
        after_accuracy=float(right_after.mean()),
        fixed=int((~right_before & right_after).sum()),
        broken=int((right_before & ~right_after).sum()),
        relabelled=int((both["true_before"] != truth).sum()),
        rows=rows,
    )
