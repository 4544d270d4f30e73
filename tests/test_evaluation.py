"""Metrics, confusions and the error gallery, all derived from per-image predictions."""

from __future__ import annotations

import pandas as pd
import pytest

from tlcore.evaluate.evaluation import compute_report

LABELS = ["cat", "dog", "fox"]


def _predictions():
    rows = [
        ("a.jpg", "cat", "cat", 0.9), ("b.jpg", "cat", "dog", 0.8), ("c.jpg", "cat", "dog", 0.6),
        ("d.jpg", "dog", "dog", 0.7), ("e.jpg", "dog", "cat", 0.95), ("f.jpg", "fox", "fox", 0.99),
    ]
    return pd.DataFrame(rows, columns=["path", "true", "pred", "confidence"])


def test_accuracy_f1_and_confusion_come_from_the_predictions():
    report = compute_report(LABELS, _predictions())
    assert report.accuracy == pytest.approx(3 / 6)
    assert report.confusion.tolist() == [[1, 2, 0], [1, 1, 0], [0, 0, 1]]
    # cat: P=1/2, R=1/3 -> F1 0.4; dog: P=1/3, R=1/2 -> 0.4; fox: 1.0
    assert report.per_class.loc["cat", "f1"] == pytest.approx(0.4)
    assert report.macro_f1 == pytest.approx((0.4 + 0.4 + 1.0) / 3)
    assert report.metrics().per_class["fox"].support == 1


def test_error_gallery_is_worst_first_and_filters_by_cell():
    report = compute_report(LABELS, _predictions())
    assert report.misclassified["path"].tolist() == ["e.jpg", "b.jpg", "c.jpg"]
    assert report.errors_for(true="cat", pred="dog")["path"].tolist() == ["b.jpg", "c.jpg"]
    assert report.errors_for(true="fox").empty
    top = report.top_confusions()
    assert top.iloc[0].to_dict() == {"true": "cat", "pred": "dog", "count": 2}


def test_empty_predictions_are_refused_plainly():
    with pytest.raises(ValueError, match="evaluation split is empty"):
        compute_report(LABELS, pd.DataFrame(columns=["path", "true", "pred", "confidence"]))


def test_smallest_class_recall_is_the_rarest_class_and_the_worse_of_a_tie():
    metrics = compute_report(LABELS, _predictions()).metrics()
    assert (metrics.smallest_class, metrics.smallest_class_recall) == ("fox", 1.0)  # 1 image; accuracy hides it
    one_wrong_dog = _predictions().iloc[[0, 1, 3, 4]]  # 2 cats (1 right), 2 dogs (1 right) and no fox
    tied = compute_report(LABELS, one_wrong_dog.assign(pred=["cat", "dog", "fox", "cat"])).metrics()
    assert (tied.smallest_class, tied.smallest_class_recall) == ("dog", 0.0)  # the tie's worse recall
