"""Classification metrics reported by every downstream protocol.

Accuracy is the paper's number (Tables 2-3). Balanced accuracy and macro-F1 are added because
the medical sets are imbalanced (pneumoniamnist's train split is 90% pneumonia: always saying
"pneumonia" scores 90% accuracy but 50% balanced accuracy). AUROC is the usual threshold-free
number for binary tasks (PCam); it is undefined for a test set holding a single class, and is
reported as NaN there and for multi-class tasks rather than as a misleading value.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    f1_score,
    roc_auc_score,
)

METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "auroc")


def classification_metrics(
    y_true, y_pred, scores=None, num_classes: int | None = None
) -> dict[str, float]:
    """Accuracy, balanced accuracy, macro-F1 and (binary tasks) AUROC, as fractions in [0, 1].

    ``scores`` are per-class scores (N x C, e.g. softmax probabilities or kNN votes) or, for a
    binary task, the positive-class score (N). ``num_classes`` fixes the class set for macro-F1:
    a class that is never predicted then counts as F1 = 0 instead of silently dropping out.
    """
    y_true = np.asarray(y_true).ravel()
    y_pred = np.asarray(y_pred).ravel()
    if y_true.shape != y_pred.shape or y_true.size == 0:
        raise ValueError(
            f"need as many predictions as labels (>0), got {y_pred.size} and {y_true.size}"
        )
    if num_classes is None:
        num_classes = int(max(y_true.max(), y_pred.max())) + 1
    labels = np.arange(num_classes)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": _balanced_accuracy(y_true, y_pred),
        "macro_f1": float(
            f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)
        ),
        "auroc": binary_auroc(y_true, scores) if num_classes == 2 else math.nan,
    }


def _balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean recall over the classes present in ``y_true`` (sklearn's definition)."""
    with warnings.catch_warnings():  # "y_pred contains classes not in y_true" is expected here
        warnings.simplefilter("ignore", UserWarning)
        return float(balanced_accuracy_score(y_true, y_pred))


def binary_auroc(y_true, scores) -> float:
    """Area under the ROC curve of the positive class (label 1); NaN without scores or when
    the labels hold one class only (the area is undefined there)."""
    if scores is None:
        return math.nan
    y_true = np.asarray(y_true).ravel()
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim == 2:
        scores = scores[:, 1]
    if np.unique(y_true).size < 2:
        return math.nan
    return float(roc_auc_score(y_true, scores))
