"""The frozen-feature probe shared by the benchmarks that score encoders on a labelled set they
never pretrained on (``parity.py``, ``p2x_surgery.py``): one stratified split, a linear probe
whose L2 strength is chosen on a validation slice of the training part, kNN, and RankMe."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import nn
from torch.utils.data import ConcatDataset, Dataset, Subset

from medp2x.batchnorm import batch_norms, recompute_bn_stats
from medp2x.data.split import stratified_split
from medp2x.eval.features import extract_features, input_channels, training_images
from medp2x.eval.protocols.knn import knn_scores
from medp2x.eval.protocols.linear import linear_probe
from medp2x.eval.settings import EvalSettings
from medp2x.monitor import rankme

VAL_FRACTION = 0.1  # of the probe's training images, to choose its L2 strength


@dataclass
class Probe:
    """``test_fraction`` of each class for test; of the rest, ``VAL_FRACTION`` chooses the
    linear probe's L2 strength and the remainder fits it (and is the kNN bank and the BN
    re-averaging images)."""

    fit: Dataset
    val: Dataset
    test: Dataset
    num_classes: int

    @property
    def pretraining(self) -> ConcatDataset:
        """Everything outside the test split (what a second stage may pretrain on)."""
        return ConcatDataset([self.fit, self.val])


def split_probe(data: Dataset, labels: np.ndarray, test_fraction: float, seed: int) -> Probe:
    train, test = stratified_split(labels, test_fraction, seed)
    fit, val = stratified_split(labels[train], VAL_FRACTION, seed)
    return Probe(
        fit=Subset(data, train[fit].tolist()),
        val=Subset(data, train[val].tolist()),
        test=Subset(data, test.tolist()),
        num_classes=int(labels.max()) + 1,
    )


def score(encoder: nn.Module, probe: Probe, settings: EvalSettings, recompute_bn: bool) -> dict:
    """Linear-probe and kNN test accuracy of the frozen features and RankMe of the test
    features; with ``recompute_bn``, BN statistics are re-averaged over the fitting images
    first (PreciseBN, labels unused)."""
    if recompute_bn and batch_norms(encoder):
        images = training_images(probe.fit, settings, input_channels(encoder))
        encoder = recompute_bn_stats(encoder, images)
    fit = extract_features(encoder, probe.fit, settings)
    val = extract_features(encoder, probe.val, settings)
    test = extract_features(encoder, probe.test, settings)
    linear = linear_probe(fit, val, test, probe.num_classes, settings)[0]
    votes = knn_scores(*fit, test[0], probe.num_classes, settings.knn_k, settings.knn_temperature)
    return {
        "linear": float(linear["accuracy"]),
        "knn": float((votes.argmax(1) == test[1]).float().mean()),
        "rankme": rankme(test[0]),
        "n_test": len(test[1]),
    }
