"""Label draws and splits: which training labels each draw learns from and selects on.

The test split is the dataset's own, never carved here. A draw of X % of the training labels
is all a protocol learns *or selects* from (docs/evaluation.md, "The label budget").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from torch.utils.data import Dataset, Subset
from tqdm.auto import tqdm

from medp2x.data.split import round_half_up, stratified_split
from medp2x.eval.settings import SELECTIONS


@dataclass
class Splits:
    """Training / test sets (and a given validation set) with their labels, fixed for a whole
    comparison. The test split is the dataset's own, never carved here."""

    train: Dataset
    val: Dataset | None
    test: Dataset
    train_labels: np.ndarray
    val_labels: np.ndarray | None
    test_labels: np.ndarray
    num_classes: int


@dataclass(frozen=True)
class DrawPlan:
    """The training-set indices one label draw learns from (``fit``) and selects on
    (``select``; None: no selection, or a given validation split). ``fit`` and ``select`` are
    disjoint and together are the draw: the whole label budget."""

    fit: np.ndarray
    select: np.ndarray | None

    @property
    def labels_used(self) -> np.ndarray:
        return self.fit if self.select is None else np.union1d(self.fit, self.select)


def low_label_draws(
    labels: Sequence[int] | np.ndarray,
    fraction: float,
    draws: int = 3,
    seed: int = 0,
    disjoint: bool = False,
) -> list[np.ndarray]:
    """Indices of ``draws`` stratified subsets holding ``fraction`` of each class (at least one
    sample per class), reproducible from ``seed``.

    Independent draws (default) reshuffle each class per draw. ``disjoint=True`` cuts
    consecutive slices of one shuffle per class, so draws share no sample while
    ``draws * fraction <= 1``; beyond that the slices wrap around and overlap as little as
    possible. ``fraction == 1`` gives the whole set for every draw.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label fraction must be in (0, 1], not {fraction}")
    if draws < 1:
        raise ValueError(f"draws must be >= 1, not {draws}")
    labels = np.asarray(labels)
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    if disjoint:
        rng = np.random.default_rng(seed)
        shuffled = [rng.permutation(idx) for idx in by_class]
    subsets = []
    for d in range(draws):
        rng = np.random.default_rng([seed, d])
        picked = []
        for c, idx in enumerate(by_class):
            n = min(len(idx), max(1, round_half_up(fraction * len(idx))))
            if disjoint:
                picked.append(shuffled[c][(d * n + np.arange(n)) % len(idx)])
            else:
                picked.append(rng.permutation(idx)[:n])
        subsets.append(np.sort(np.concatenate(picked)))
    return subsets


def plan_draws(
    labels: Sequence[int] | np.ndarray,
    fraction: float,
    draws: int = 3,
    seed: int = 0,
    disjoint: bool = False,
    selection: str = "none",
    val_fraction: float = 0.1,
) -> list[DrawPlan]:
    """The label draws and, with ``selection="draw"``, each draw's own stratified
    ``val_fraction`` held out for model selection: everything stays inside the draw."""
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}, not {selection!r}")
    labels = np.asarray(labels)
    plans = []
    for d, draw in enumerate(low_label_draws(labels, fraction, draws, seed, disjoint)):
        if selection != "draw":
            plans.append(DrawPlan(draw, None))
            continue
        kept, held = stratified_split(labels[draw], val_fraction, seed=[seed, d, 1])
        if len(held) == 0:
            raise ValueError(
                f"a draw of {len(draw)} labels leaves none to select on: use selection 'none' "
                "or a larger label fraction"
            )
        plans.append(DrawPlan(draw[kept], draw[held]))
    return plans


def dataset_labels(dataset: Dataset, progress: bool = False) -> np.ndarray:
    """Class labels of every sample, without decoding images where the dataset exposes them
    (``labels`` / ``targets`` attributes, ``Subset`` of such); otherwise read sample by sample."""
    if isinstance(dataset, Subset):
        return dataset_labels(dataset.dataset, progress)[np.asarray(dataset.indices)]
    for attr in ("labels", "targets"):
        values = getattr(dataset, attr, None)
        if values is not None and not callable(values) and len(values) == len(dataset):
            return np.asarray(values, dtype=np.int64).reshape(-1)
    pairs = getattr(dataset, "items", None)  # medp2x.data.folder: (file, label) pairs
    if isinstance(pairs, list) and len(pairs) == len(dataset) and all(_is_pair(p) for p in pairs):
        return np.asarray([label for _, label in pairs], dtype=np.int64)
    items = tqdm(range(len(dataset)), desc="reading labels", disable=not progress, leave=False)
    return np.asarray([int(dataset[i]["label"]) for i in items], dtype=np.int64)


def _is_pair(item) -> bool:
    return isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], (int, np.integer))


def prepare_splits(
    train: Dataset, test: Dataset, val: Dataset | None = None, progress: bool = False
) -> Splits:
    """Read the labels once and check that every split is labelled."""
    train_labels = dataset_labels(train, progress)
    test_labels = dataset_labels(test, progress)
    val_labels = None if val is None else dataset_labels(val, progress)
    named = [("train", train_labels), ("test", test_labels)]
    for name, labels in [*named, ("validation", val_labels)]:
        if labels is None:
            continue
        if len(labels) == 0:
            raise ValueError(f"the {name} split is empty")
        if labels.min() < 0:
            raise ValueError(f"the {name} split holds unlabelled samples (label -1)")
    maxima = [
        labels.max() for labels in (train_labels, test_labels, val_labels) if labels is not None
    ]
    return Splits(train, val, test, train_labels, val_labels, test_labels, int(max(maxima)) + 1)
