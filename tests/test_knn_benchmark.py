"""benchmarks/methods_knn.py: its split keeps queries out of pretraining, per-method options
reach only their method, and a verdict needs more than beating one lucky random init."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import numpy as np
import pytest
from torch.utils.data import Dataset

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("methods_knn", REPO / "benchmarks" / "methods_knn.py")
methods_knn = importlib.util.module_from_spec(spec)
spec.loader.exec_module(methods_knn)


class Labelled(Dataset):
    def __init__(self, per_class: int = 10, classes: int = 4):
        self.labels = np.repeat(np.arange(classes), per_class)

    def __len__(self) -> int:
        return len(self.labels)


def test_queries_are_held_out_of_pretraining_in_every_class():
    data = Labelled()
    bank, queries = methods_knn.held_out_splits(data, test_fraction=0.2, seed=0)
    assert not set(bank.indices) & set(queries.indices)
    assert len(bank) + len(queries) == len(data)
    assert np.bincount(data.labels[queries.indices]).tolist() == [2, 2, 2, 2]


def test_method_options_reach_only_their_method():
    pairs = ["simclr.temperature=0.2", "base_lr=0.3", "moco.queue_length=512"]
    assert methods_knn.method_options("simclr", pairs) == {"temperature": 0.2, "base_lr": 0.3}
    assert methods_knn.method_options("byol", pairs) == {"base_lr": 0.3}
    assert methods_knn.method_options("moco", pairs) == {"base_lr": 0.3, "queue_length": 512}


def test_a_method_must_beat_the_best_random_init():
    rows = [
        {"encoder": "random init (seed 0)", "accuracy": 0.030},
        {"encoder": "random init (seed 1)", "accuracy": 0.036},
        {"encoder": "simclr", "accuracy": 0.033},  # above the mean, below the best
        {"encoder": "byol", "accuracy": 0.040},
        {"encoder": "moco", "accuracy": 0.006},  # chance is 1/200
    ]
    args = argparse.Namespace(
        classes=200, bank=8000, image_size=64, iterations=10, batch_size=64, amp=True, lr=0.03
    )
    text, table = methods_knn.report(rows, {"byol": 12.0}, 2000, args, {"byol": 0.71})
    verdicts = {row["encoder"]: row["verdict"] for row in table}
    assert verdicts == {
        "random init (seed 0)": "reference",
        "random init (seed 1)": "reference",
        "simclr": "no gain",
        "byol": "beats random",
        "moco": "collapsed",
    }
    byol = next(row for row in table if row["encoder"] == "byol")
    assert byol["ratio_vs_mean_random"] == pytest.approx(0.040 / 0.033)
    assert byol["standard_error"] == pytest.approx((0.04 * 0.96 / 2000) ** 0.5)
    assert "| byol | 4.0% | 0.4 | 1.21x | 12 | 0.71 | beats random |" in text
    assert "batch 64, bf16, peak lr 0.03" in text
