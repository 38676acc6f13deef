"""benchmarks/p2x_surgery.py: the second stages never see the probe's test half, and the
effective learning-rate factor it reports is the one BN's scale invariance implies."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))  # the scripts import each other by name
spec = importlib.util.spec_from_file_location("p2x_surgery", REPO / "benchmarks" / "p2x_surgery.py")
p2x_surgery = importlib.util.module_from_spec(spec)
sys.modules["p2x_surgery"] = p2x_surgery  # dataclasses look their module up by name
spec.loader.exec_module(p2x_surgery)


class Labelled(Dataset):
    def __init__(self, per_class: int = 20, classes: int = 5):
        self.labels = np.repeat(np.arange(classes), per_class)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> int:
        return index


def test_pretraining_images_never_include_the_test_half():
    data = Labelled()
    probe = p2x_surgery.probe_splits(data, data.labels)
    pretraining = {probe.pretraining[i] for i in range(len(probe.pretraining))}
    test = {probe.test[i] for i in range(len(probe.test))}
    assert not pretraining & test
    assert len(pretraining) + len(test) == len(data)
    assert np.bincount(data.labels[sorted(test)]).tolist() == [10] * 5  # stratified 50/50
    assert len(probe.val) == 5  # 10% of the training half, one per class


def block(norms: list[float]) -> nn.Sequential:
    """conv -> BN whose filters have exactly these Frobenius norms."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, len(norms), 3, bias=False), nn.BatchNorm2d(len(norms)))
    with torch.no_grad():
        w = net[0].weight
        w.mul_(torch.tensor(norms).view(-1, 1, 1, 1) / w.flatten(1).norm(dim=1).view(-1, 1, 1, 1))
    return net


@pytest.mark.parametrize(
    ("scale", "lr_factor", "expected"),
    [
        ("per_layer", 1.0, 5.0),  # layer norm sqrt(9 + 16) = 5: every filter's step x5
        ("per_filter", 1.0, (3.0 + 4.0) / 2),  # each filter by its own norm
        ("per_filter", 0.1, 0.35),  # a tenth of the peak lr on top
        ("none", 1.0, 1.0),
    ],
)
def test_effective_lr_factor_is_the_squared_norm_ratio(scale, lr_factor, expected):
    variant = p2x_surgery.Variant("v", scale, filters="none", lr_factor=lr_factor)
    effect, start = p2x_surgery.surgery_effect(block([3.0, 4.0]), variant, seed=0)
    assert effect["effective_lr_factor"] == pytest.approx(expected, rel=1e-5)
    assert effect["mean_filter_norm_before"] == pytest.approx(3.5, rel=1e-5)
    assert p2x_surgery.relative_weight_change(start, start) == 0.0
