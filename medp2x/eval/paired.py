"""Paired bootstrap intervals for differences between encoders scored on the same draws.

The paper's claims are differences (P2X - P1X, P2X - the ImageNet first stage, anything -
Random), so the interval that matters is the difference's, not each encoder's alone. Two
encoders evaluated on the same label draws and the same test images are *paired*: their
errors are correlated, and resampling them together removes the shared test-set noise.

One bootstrap replicate (Efron & Tibshirani 1993, ch. 6; two-stage over draws and images):

1. resample the D label draws with replacement (the training-label variability);
2. resample the N test images with replacement, the *same* indices for both encoders and for
   every draw (the test-set variability, paired);
3. the replicate is the mean over the resampled draws of metric(A) - metric(B).

The 95 % interval is the 2.5 and 97.5 percentiles of the replicates (percentile bootstrap);
it "excludes 0" when both ends have the same sign. With one draw only step 2 remains. The
point estimate is the plain mean over draws of the per-draw difference. Deterministic given
``seed``. Metrics: accuracy (the paper's) and balanced accuracy (mean per-class recall over
the classes present in the resample, as ``sklearn.metrics.balanced_accuracy_score``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

METRICS = ("accuracy", "balanced_accuracy")
CHUNK_CELLS = 8_000_000  # replicates x test images per chunk: bounds memory on large test sets


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def paired_bootstrap(
    correct_a: np.ndarray,
    correct_b: np.ndarray | None,
    labels: np.ndarray,
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Interval]:
    """Intervals of metric(A) - metric(B) for each of ``METRICS``.

    ``correct_a``, ``correct_b``: D x N booleans, whether encoder A (B) classified test image n
    correctly in draw d (a 1-D array is one draw). ``correct_b=None`` gives the interval of A's
    metric itself. ``labels``: the N true classes (balanced accuracy's per-class recall).
    """
    a = _as_draws(correct_a)
    b = np.zeros_like(a) if correct_b is None else _as_draws(correct_b)
    labels = np.asarray(labels).reshape(-1)
    if a.shape != b.shape or a.shape[1] != len(labels):
        raise ValueError(
            f"paired predictions must share draws and test images: {a.shape}, {b.shape}, "
            f"{len(labels)} labels"
        )
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), not {confidence}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, not {n_boot}")
    draws, n = a.shape
    onehot = (labels[:, None] == np.unique(labels)[None]).astype(np.float64)  # N x K
    full = np.ones((1, n))
    point = _metric_differences(full, a, b, onehot)  # metric -> 1 x D
    replicates = {m: [] for m in METRICS}
    rng = np.random.default_rng(seed)
    chunk = max(1, CHUNK_CELLS // max(n, 1))
    for start in range(0, n_boot, chunk):
        size = min(chunk, n_boot - start)
        draw_weights = rng.multinomial(draws, np.full(draws, 1 / draws), size=size) / draws
        image_counts = rng.multinomial(n, np.full(n, 1 / n), size=size).astype(np.float64)
        diffs = _metric_differences(image_counts, a, b, onehot)
        for m in METRICS:
            replicates[m].append((diffs[m] * draw_weights).sum(1))
    alpha = (1.0 - confidence) / 2
    out = {}
    for m in METRICS:
        low, high = np.quantile(np.concatenate(replicates[m]), [alpha, 1 - alpha])
        out[m] = Interval(float(point[m].mean()), float(low), float(high))
    return out


def _as_draws(correct: np.ndarray) -> np.ndarray:
    correct = np.asarray(correct, dtype=np.float64)
    return correct[None] if correct.ndim == 1 else correct


def _metric_differences(
    counts: np.ndarray, a: np.ndarray, b: np.ndarray, onehot: np.ndarray
) -> dict[str, np.ndarray]:
    """metric(A) - metric(B) per resample (rows of ``counts``: how often each test image is
    drawn) and per draw: R x D arrays."""
    n_draws, k = a.shape[0], onehot.shape[1]
    total = counts.sum(1, keepdims=True)
    accuracy = (counts @ (a - b).T) / total
    per_class = counts @ onehot  # R x K: resampled images per class
    hits = counts @ ((a - b)[:, :, None] * onehot[None]).transpose(1, 0, 2).reshape(-1, n_draws * k)
    hits = hits.reshape(len(counts), n_draws, k)
    present = per_class > 0
    recall = np.where(present[:, None], hits / np.where(present, per_class, 1)[:, None], 0.0)
    balanced = recall.sum(2) / present.sum(1, keepdims=True)
    return {"accuracy": accuracy, "balanced_accuracy": balanced}


__all__ = ["METRICS", "Interval", "paired_bootstrap"]


def add_intervals(
    rows: list[dict],
    predictions: Mapping[tuple[str, str], Sequence[np.ndarray]],
    test_labels: np.ndarray,
    references: Sequence[str],
    n_boot: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> None:
    """Add to every row its encoder's bootstrap interval (``accuracy_low`` ...) and, per
    reference R, the paired difference ``accuracy_diff_vs_R`` with ``_low``, ``_high`` and
    ``_excludes_0`` (see ``medp2x.eval.paired``); rows of one encoder x protocol share them."""
    if n_boot <= 0:
        return
    correct = {
        key: np.stack([p == test_labels for p in preds]) for key, preds in predictions.items()
    }
    for row in rows:
        row.update(bootstrap=n_boot, confidence=confidence)
    for (name, protocol), hits in correct.items():
        group = [r for r in rows if r["encoder"] == name and r["protocol"] == protocol]
        own = paired_bootstrap(hits, None, test_labels, n_boot, confidence, seed)
        values = {}
        for metric, interval in own.items():
            values[f"{metric}_low"], values[f"{metric}_high"] = interval.low, interval.high
        for ref in references:
            if ref == name or (ref, protocol) not in correct:
                continue
            diff = paired_bootstrap(
                hits, correct[ref, protocol], test_labels, n_boot, confidence, seed
            )
            for metric, interval in diff.items():
                column = f"{metric}_diff_vs_{ref}"
                values[column] = interval.estimate
                values[f"{column}_low"], values[f"{column}_high"] = interval.low, interval.high
                values[f"{column}_excludes_0"] = interval.excludes_zero
        for row in group:
            row.update(values)
