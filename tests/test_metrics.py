"""Metrics against values worked out by hand (in the comments)."""

import math

import numpy as np
import pytest

from medp2x.metrics import binary_auroc, classification_metrics


def test_accuracy_and_balanced_accuracy_under_imbalance():
    # 2 negatives, 8 positives, always "positive": 8/10 correct, recalls 0 and 1 -> 0.5
    y = [0] * 2 + [1] * 8
    m = classification_metrics(y, [1] * 10)
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["balanced_accuracy"] == pytest.approx(0.5)
    # recall(0) = 1/2, recall(1) = 5/6 -> (1/2 + 5/6) / 2 = 2/3; accuracy 6/8
    m = classification_metrics([0, 0, 1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1, 0])
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["balanced_accuracy"] == pytest.approx(2 / 3)


def test_macro_f1_three_classes():
    # class 0: tp 1 fp 1 fn 1 -> F1 1/2; class 1: tp 2 fp 1 fn 0 -> P 2/3 R 1 F1 4/5;
    # class 2: tp 1 fp 0 fn 1 -> P 1 R 1/2 F1 2/3; macro = (1/2 + 4/5 + 2/3) / 3
    m = classification_metrics([0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0])
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert math.isnan(m["auroc"])  # multi-class: not reported


def test_macro_f1_counts_a_never_predicted_class_as_zero():
    # class 0: F1 1; class 1: P 1/2 R 1 -> 2/3; class 2 never predicted -> 0
    m = classification_metrics([0, 1, 2], [0, 1, 1], num_classes=3)
    assert m["macro_f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)


def test_binary_auroc_by_pair_counting():
    # positives 0.35, 0.8 vs negatives 0.1, 0.4: 0.35 beats 0.1 only, 0.8 beats both -> 3/4
    y, s = [0, 0, 1, 1], np.array([0.1, 0.4, 0.35, 0.8])
    assert binary_auroc(y, s) == pytest.approx(0.75)
    two_column = np.stack([1 - s, s], axis=1)  # per-class scores: column 1 is the positive
    m = classification_metrics(y, (s > 0.5).astype(int), two_column, num_classes=2)
    assert m["auroc"] == pytest.approx(0.75)
    assert binary_auroc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)  # a tie counts half


def test_auroc_undefined_cases_are_nan():
    assert math.isnan(binary_auroc([1, 1, 1], [0.2, 0.3, 0.9]))  # one class only
    assert math.isnan(binary_auroc([0, 1], None))


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="as many predictions"):
        classification_metrics([0, 1, 1], [0, 1])
