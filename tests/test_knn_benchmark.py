"""benchmarks/methods_knn.py: its split keeps queries out of pretraining, per-method options
reach only their method, and a verdict needs more than beating one lucky random init."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
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


def test_a_method_must_beat_the_best_random_init_and_low_level_rows_are_context():
    rows = [
        {"encoder": "random init (seed 0)", "accuracy": 0.030},
        {"encoder": "random init (seed 1)", "accuracy": 0.036},
        {"encoder": "colour histogram", "accuracy": 0.052},  # context, not the bar to beat
        {"encoder": "simclr", "accuracy": 0.033},  # above the mean, below the best
        {"encoder": "byol", "accuracy": 0.040},
        {"encoder": "moco", "accuracy": 0.006},  # chance is 1/200
    ]
    args = argparse.Namespace(
        classes=200,
        bank=8000,
        image_size=64,
        train_size=32,
        iterations=10,
        batch_size=64,
        amp=True,
        lr=0.03,
    )
    ranks = {"byol": 3.84, "moco": 19.2}
    text, table = methods_knn.report(rows, {"byol": 12.0}, 2000, args, {"byol": 0.71}, ranks)
    verdicts = {row["encoder"]: row["verdict"] for row in table}
    assert verdicts == {
        "random init (seed 0)": "reference",
        "random init (seed 1)": "reference",
        "colour histogram": "low-level reference",
        "simclr": "no gain",
        "byol": "beats random",
        "moco": "collapsed",
    }
    byol = next(row for row in table if row["encoder"] == "byol")
    assert byol["ratio_vs_mean_random"] == pytest.approx(0.040 / 0.033)
    assert byol["standard_error"] == pytest.approx((0.04 * 0.96 / 2000) ** 0.5)
    assert "| byol | 4.0% | 0.4 | 1.21x | 12 | 0.71 | 3.8 | beats random |" in text
    assert byol["feature_rank"] == 3.84
    assert "batch 64, bf16, 32 px crops of the 64 px images, peak lr 0.03" in text


class Images(Dataset):
    def __init__(self, n: int = 96):
        self.images = torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": i % 4}


def test_feature_ranks_tell_a_dimensionally_collapsed_encoder_from_a_rich_one():
    torch.manual_seed(0)
    rich = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 32))
    direction = torch.randn(1, 32)
    collapsed = nn.Sequential(rich, nn.Linear(32, 1), Scale(direction))
    ranks = methods_knn.feature_ranks({"rich": rich, "one": collapsed}, Images(), 16)
    assert ranks["one"] == pytest.approx(1.0, rel=1e-4)
    assert ranks["rich"] > 20  # 96 random images through a random linear map of width 32


class Scale(nn.Module):
    """Every image maps to a multiple of one direction."""

    def __init__(self, direction: torch.Tensor):
        super().__init__()
        self.direction = direction

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.direction
