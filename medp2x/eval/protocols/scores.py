"""Protocol outputs -> metrics: what every protocol reports on the test split, and the score
that selects an epoch or a probe strength.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from medp2x.metrics import classification_metrics

PREDICTIONS = "test_predictions"  # protocols' info key for per-image predictions (not a column)


def predicted_classes(scores: torch.Tensor) -> np.ndarray:
    return scores.detach().float().argmax(1).cpu().numpy()


def test_metrics(scores: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    scores_np = scores.detach().float().cpu().numpy()
    return classification_metrics(
        labels.cpu().numpy(), scores_np.argmax(1), scores_np, num_classes=num_classes
    )


def selection_score(
    scores: torch.Tensor, labels: torch.Tensor, num_classes: int, metric: str
) -> float:
    value = test_metrics(scores, labels, num_classes)[metric]
    return -math.inf if math.isnan(value) else value
