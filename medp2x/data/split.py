"""Stratified splits: a fraction of each class held out, reproducibly from a seed.

Used by the paper's datasets (fixed test splits where a dataset has none) and by evaluation
(selection held out of a label draw), so it lives with the data, not with evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def round_half_up(x: float) -> int:
    """2.5 -> 3 (Python's round() gives 2): sample counts as people count them."""
    return math.floor(x + 0.5)


def stratified_split(
    labels: Sequence[int] | np.ndarray, fraction: float, seed: int | Sequence[int] = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held-out) indices, holding out ``fraction`` of each class (at least one sample of
    every class with two or more, so each side sees every class where possible)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"held-out fraction must be in (0, 1), not {fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    kept, held = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n = 0 if len(idx) < 2 else min(len(idx) - 1, max(1, round_half_up(fraction * len(idx))))
        held.append(idx[:n])
        kept.append(idx[n:])
    return np.sort(np.concatenate(kept)), np.sort(np.concatenate(held))
