"""The comparison runner behind Tables 2-3: every encoder x protocol x label draw on the same
labels and test images, with paired intervals against the reference encoder(s).

``compare_encoders`` fixes the label draws once, checks that no encoder's pretraining saw a
test image (``leakage``), then per encoder computes frozen features once (linear, kNN) or
fine-tunes a copy (finetune), and returns one row of metrics per encoder x protocol x draw.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from medp2x.batchnorm import recompute_bn_stats
from medp2x.eval.encoders import EncoderSpec, resolve_encoder
from medp2x.eval.features import extract_features, input_channels, training_images
from medp2x.eval.leakage import check_test_overlap
from medp2x.eval.paired import add_intervals
from medp2x.eval.protocols.finetune import finetune
from medp2x.eval.protocols.knn import knn_scores
from medp2x.eval.protocols.linear import linear_probe
from medp2x.eval.protocols.scores import PREDICTIONS, predicted_classes, test_metrics
from medp2x.eval.settings import EvalSettings, with_changes
from medp2x.eval.splits import DrawPlan, Splits, plan_draws, prepare_splits

logger = logging.getLogger("medp2x.evaluate")


def compare_encoders(
    encoders: Mapping[str, EncoderSpec],
    train: Dataset,
    test: Dataset,
    val: Dataset | None = None,
    settings: EvalSettings | None = None,
    **changes,
) -> list[dict]:
    """Evaluate every encoder with every protocol on the same label draws and test images.

    ``encoders`` maps a display name to a module taking [0, 1] images (with ``feature_dim``),
    ``"random"``, a low-level reference, or a checkpoint path (loaded one at a time, see
    ``resolve_encoder``). Caller modules are never modified: fine-tuning trains a deep copy.
    ``settings`` (``EvalSettings``; keyword ``changes`` override its fields) says how:

    ``selection``: "none" (the paper's: fixed epochs / probe strength), "draw" (select on
    ``val_fraction`` of each draw), "val" (select on ``val``, labels outside the budget).
    ``reference``: the encoder name(s) every other encoder's paired difference is taken
    against ("auto": the encoder given as "random", else the first one; None: no
    differences), with a ``bootstrap``-resample paired 95 % interval over test images and
    draws (0: no intervals). An encoder file whose pretraining run saw a test image is
    refused unless ``allow_test_overlap``.

    Returns one row per encoder x protocol x draw: encoder, protocol, draw, seed,
    label_fraction, n_train (labels learned from), n_select (labels selected on), selection,
    n_test, accuracy, balanced_accuracy, macro_f1, auroc (binary; else NaN), selected,
    val_score, seconds, the settings that reproduce it, ``test_overlap``, and per encoder x
    protocol ``<metric>_low/_high`` and ``<metric>_diff_vs_<reference>[_low|_high|_excludes_0]``
    for accuracy and balanced accuracy.
    """
    s = with_changes(settings, changes)
    if s.selection == "val" and val is None:
        raise ValueError("selection 'val' needs a validation split (--val-data, or an .npz 'val')")
    if val is not None and s.selection != "val":
        logger.info("a validation split was given but selection is %r: it is not used", s.selection)
    references = _references(encoders, s.reference)
    overlaps = check_test_overlap(encoders, test, s.allow_test_overlap)
    splits = prepare_splits(train, test, val if s.selection == "val" else None, s.progress)
    plans = plan_draws(
        splits.train_labels, s.label_fraction, s.draws, s.seed, s.disjoint, s.selection,
        s.val_fraction,
    )  # fmt: skip
    predictions: dict[tuple[str, str], list[np.ndarray]] = {}
    rows = []
    for name, spec in encoders.items():
        encoder = resolve_encoder(spec, s.arch, s.in_channels, s.normalization, s.seed)
        rows += _evaluate_one(name, encoder, splits, plans, s, predictions)
    for row in rows:
        row.update(
            label_fraction=s.label_fraction,
            n_train_split=len(splits.train_labels),
            **_settings_columns(s),
            test_overlap=overlaps[row["encoder"]].note,
            test_images_seen=overlaps[row["encoder"]].seen,
        )
    add_intervals(rows, predictions, splits.test_labels, references, s.bootstrap, s.seed)
    return rows


def _references(encoders: Mapping[str, EncoderSpec], reference) -> list[str]:
    if reference is None or len(encoders) < 2:
        return []
    if reference == "auto":
        randoms = [n for n, s in encoders.items() if isinstance(s, str) and s == "random"]
        return randoms[:1] or [next(iter(encoders))]
    names = [reference] if isinstance(reference, str) else list(reference)
    missing = [n for n in names if n not in encoders]
    if missing:
        raise ValueError(
            f"reference encoder(s) {', '.join(missing)} not among {', '.join(encoders)}"
        )
    return names


def _settings_columns(settings: EvalSettings) -> dict:
    """What a reader needs to reproduce a cell, on every row (and so in results.csv)."""
    return {
        "selection": settings.selection,
        "val_fraction": settings.val_fraction if settings.selection == "draw" else math.nan,
        "disjoint": settings.disjoint,
        "image_size": settings.image_size,
        "epochs": settings.epochs,
        "batch_size": settings.batch_size,
        "lr": settings.lr,
        "weight_decay": settings.weight_decay,
        "augment": settings.augment,
        "crop_scale": settings.crop_scale,
        "knn_k": settings.knn_k,
        "knn_temperature": settings.knn_temperature,
        "bn_stats": settings.bn_stats,
    }


def _evaluate_one(
    name: str,
    encoder: nn.Module,
    splits: Splits,
    plans: list[DrawPlan],
    settings: EvalSettings,
    predictions: dict,
) -> list[dict]:
    """All protocols and draws for one encoder; frozen features are computed once and shared
    by the linear and kNN protocols and by every draw."""
    feats = None
    seed = settings.seed
    if {"linear", "knn"} & set(settings.protocols):
        frozen = encoder
        if settings.bn_stats == "recomputed":
            images = training_images(splits.train, settings, input_channels(encoder))
            frozen = recompute_bn_stats(encoder.to(settings.device), images)
        feats = _frozen_features(name, frozen, splits, plans, settings)
    rows = []
    for protocol in settings.protocols:
        for draw, plan in enumerate(plans):
            start = time.perf_counter()
            metrics, info = _run_protocol(
                protocol, encoder, splits, feats, plan, settings, seed + draw, name
            )
            predictions.setdefault((name, protocol), []).append(info.pop(PREDICTIONS))
            n_select = _n_select(plan, splits, protocol)
            rows.append(
                {
                    "encoder": name,
                    "protocol": protocol,
                    "draw": draw,
                    "seed": seed + draw,
                    "n_train": len(plan.fit),
                    "n_select": n_select,
                    "n_val": n_select,
                    "val_source": _selection_source(settings.selection, protocol),
                    "n_test": len(splits.test_labels),
                    **metrics,
                    **info,
                    "seconds": round(time.perf_counter() - start, 3),
                }
            )
            logger.info("%s %s draw %d: accuracy %.4f", name, protocol, draw, metrics["accuracy"])
    return rows


def _n_select(plan: DrawPlan, splits: Splits, protocol: str) -> int:
    if protocol == "knn":
        return 0
    if plan.select is not None:
        return len(plan.select)
    return 0 if splits.val_labels is None else len(splits.val_labels)


def _selection_source(selection: str, protocol: str) -> str:
    if protocol == "knn" or selection == "none":
        return "none (fixed settings)"
    if selection == "draw":
        return "held out inside the draw"
    return "given validation split (outside the label budget)"


def _frozen_features(
    name: str, encoder: nn.Module, splits: Splits, plans: list[DrawPlan], settings: EvalSettings
) -> dict:
    """Features of the test set, of a given validation set, and of only those training
    samples some draw uses: with 10 % draws that skips most training forward passes."""
    used = np.unique(np.concatenate([p.labels_used for p in plans]))
    train = (
        splits.train
        if len(used) == len(splits.train_labels)
        else Subset(splits.train, used.tolist())
    )
    feats = {
        "train_indices": used,
        "train": extract_features(encoder, train, settings, f"{name}: train features"),
        "test": extract_features(encoder, splits.test, settings, f"{name}: test features"),
        "val": None,
    }
    if splits.val is not None:
        feats["val"] = extract_features(encoder, splits.val, settings, f"{name}: val features")
    return feats


def _feature_rows(feats: dict, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels of training samples ``idx`` among the featurised ones."""
    rows = np.searchsorted(feats["train_indices"], idx)  # both sorted
    sel = torch.as_tensor(rows, device=feats["train"][0].device)
    return feats["train"][0][sel], feats["train"][1][sel]


def _run_protocol(
    protocol: str,
    encoder: nn.Module,
    splits: Splits,
    feats: dict | None,
    plan: DrawPlan,
    settings: EvalSettings,
    seed: int,
    name: str,
) -> tuple[dict, dict]:
    if protocol == "finetune":
        select = None
        if plan.select is not None:
            select = Subset(splits.train, plan.select.tolist())
        elif settings.selection == "val":
            select = splits.val
        return finetune(encoder, splits, plan.fit, settings, seed, f"{name}: finetune", select)
    train = _feature_rows(feats, plan.fit)
    if protocol == "linear":
        select = None
        if plan.select is not None:
            select = _feature_rows(feats, plan.select)
        elif settings.selection == "val":
            select = feats["val"]
        return linear_probe(train, select, feats["test"], splits.num_classes, settings)
    scores = knn_scores(
        *train, feats["test"][0], splits.num_classes, settings.knn_k, settings.knn_temperature
    )
    info = {
        "selected": f"k={min(settings.knn_k, len(plan.fit))},T={settings.knn_temperature:g}",
        "val_score": math.nan,
        PREDICTIONS: predicted_classes(scores),
    }
    return test_metrics(scores, feats["test"][1], splits.num_classes), info
