"""Downstream evaluation: the paper's fine-tuning protocol, the usual linear probe and kNN,
low-label draws, and the comparison runner behind Tables 2-3 and Figs. 2-3.

Flow: ``compare_encoders`` fixes the splits once (the same validation carve and the same
low-label draws for every encoder, so encoders are compared on identical labels), then per
encoder computes frozen features once (linear, kNN) or fine-tunes a copy (finetune), and
returns one row of metrics per encoder x protocol x draw. ``write_results`` turns rows into
``results.md`` / ``results.csv``; ``convergence_figure`` evaluates the checkpoints of
pretraining runs and plots accuracy against pretraining progress.

Protocols (see docs/evaluation.md):
- ``finetune``: whole network + linear head, Adam lr 3e-4, weight decay 1e-4 (paper), the
  epoch with the best validation score is restored and reported on the test split.
- ``linear``: multinomial logistic regression on standardised frozen features, fitted
  full-batch with L-BFGS on the evaluation device; the L2 strength is chosen on validation.
- ``knn``: cosine similarity, k nearest training features vote with weight exp(sim / T)
  (Wu et al. 2018; DINO's k = 20, T = 0.07).
"""

from __future__ import annotations

import copy
import logging
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from medp2x.baselines import BASELINES, build_baseline
from medp2x.batchnorm import BN_STATS, recompute_bn_stats
from medp2x.metrics import METRICS, classification_metrics
from medp2x.networks import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    NormalizedEncoder,
    build_encoder,
    match_channels,
)

logger = logging.getLogger("medp2x.evaluate")

PROTOCOLS = ("finetune", "linear", "knn")
NORMALIZATIONS = ("auto", "imagenet", "none")
EncoderSpec = nn.Module | str | Path


@dataclass(frozen=True)
class EvalSettings:
    """Hyper-parameters of the protocols (defaults: the paper's fine-tuning, DINO's kNN)."""

    epochs: int = 20
    batch_size: int = 64
    lr: float = 3e-4
    weight_decay: float = 1e-4
    image_size: int | None = None
    device: str = "cpu"
    knn_k: int = 20
    knn_temperature: float = 0.07
    linear_weight_decays: tuple[float, ...] = (1e-1, 1e-2, 1e-3, 1e-4, 0.0)
    linear_max_iter: int = 200
    select_metric: str = "accuracy"
    augment: bool = True
    num_workers: int = 0
    progress: bool = True
    bn_stats: str = "saved"  # "recomputed": frozen protocols first re-average BN (batchnorm.py)


@dataclass
class Splits:
    """Train / validation / test sets with their labels, fixed for a whole comparison."""

    train: Dataset
    val: Dataset
    test: Dataset
    train_labels: np.ndarray
    val_labels: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    val_source: str


# ----------------------------------------------------------------------------- label draws


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
            n = min(len(idx), max(1, _round_half_up(fraction * len(idx))))
            if disjoint:
                picked.append(shuffled[c][(d * n + np.arange(n)) % len(idx)])
            else:
                picked.append(rng.permutation(idx)[:n])
        subsets.append(np.sort(np.concatenate(picked)))
    return subsets


def _round_half_up(x: float) -> int:
    """2.5 -> 3 (Python's round() gives 2): sample counts as people count them."""
    return math.floor(x + 0.5)


def stratified_split(
    labels: Sequence[int] | np.ndarray, fraction: float, seed: int = 0
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
        n = 0 if len(idx) < 2 else min(len(idx) - 1, max(1, _round_half_up(fraction * len(idx))))
        held.append(idx[:n])
        kept.append(idx[n:])
    return np.sort(np.concatenate(kept)), np.sort(np.concatenate(held))


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
    train: Dataset,
    test: Dataset,
    val: Dataset | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    progress: bool = False,
) -> Splits:
    """Read the labels once and, without a validation set, carve a stratified one from train."""
    train_labels = dataset_labels(train, progress)
    test_labels = dataset_labels(test, progress)
    if val is None:
        kept, held = stratified_split(train_labels, val_fraction, seed)
        logger.warning(
            "no validation split given: carved a stratified %.0f%% of train (%d samples) for "
            "model selection",
            100 * val_fraction,
            len(held),
        )
        val, val_labels = Subset(train, held.tolist()), train_labels[held]
        train, train_labels = Subset(train, kept.tolist()), train_labels[kept]
        val_source = f"carved from train ({100 * val_fraction:g}%)"
    else:
        val_labels, val_source = dataset_labels(val, progress), "given"
    for name, labels in (
        ("train", train_labels),
        ("validation", val_labels),
        ("test", test_labels),
    ):
        if len(labels) == 0:
            raise ValueError(f"the {name} split is empty")
        if labels.min() < 0:
            raise ValueError(f"the {name} split holds unlabelled samples (label -1)")
    num_classes = int(max(train_labels.max(), val_labels.max(), test_labels.max())) + 1
    return Splits(train, val, test, train_labels, val_labels, test_labels, num_classes, val_source)


# ----------------------------------------------------------------------------- batches


class BatchCollate:
    """Stack samples into (images, labels), resizing each image to ``image_size`` first, since
    readers may yield mixed sizes. A class (not a closure) so DataLoader workers can pickle it."""

    def __init__(self, image_size: int | None = None):
        self.image_size = image_size

    def __call__(self, samples: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        images = [self._resize(s["image"]) for s in samples]
        shapes = {tuple(i.shape) for i in images}
        if len(shapes) > 1:
            raise ValueError(
                f"images of different shapes {sorted(shapes)} in one batch: set image_size"
            )
        labels = torch.tensor([int(s["label"]) for s in samples], dtype=torch.long)
        return torch.stack(images), labels

    def _resize(self, image: torch.Tensor) -> torch.Tensor:
        size = self.image_size
        if size is None or tuple(image.shape[-2:]) == (size, size):
            return image
        out = F.interpolate(image[None].float(), size=(size, size), mode="bilinear", antialias=True)
        return out[0].clamp_(0.0, 1.0)


def make_loader(
    dataset: Dataset,
    settings: EvalSettings,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=settings.batch_size,
        shuffle=shuffle,
        generator=generator,
        drop_last=drop_last,
        collate_fn=BatchCollate(settings.image_size),
        num_workers=settings.num_workers,
    )


def input_channels(encoder: nn.Module) -> int | None:
    """Channels the encoder's first convolution expects (None: no convolution found)."""
    first = next((m for m in encoder.modules() if isinstance(m, nn.Conv2d)), None)
    return None if first is None else first.in_channels


# ----------------------------------------------------------------------------- encoders


def resolve_encoder(
    spec: EncoderSpec,
    arch: str = "resnet18",
    in_channels: int = 3,
    normalization: str = "auto",
    seed: int = 0,
) -> nn.Module:
    """An encoder taking [0, 1] images: a module as given, ``"random"`` (``build_encoder(arch)``
    with ImageNet mean/std, seeded), a low-level reference of ``medp2x.baselines``
    (``"colour_histogram"``, ``"tiny_image"``), or a checkpoint path read by ``medp2x.checkpoints``.

    ``normalization`` overrides what the file says ("imagenet" or "none"); "auto" trusts the
    file (plain state dicts carry no normalisation, so say "imagenet" for those trained so).
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {', '.join(NORMALIZATIONS)}")
    if isinstance(spec, nn.Module):
        return spec
    if str(spec) == "random":
        torch.manual_seed(seed)
        encoder = build_encoder(arch, in_channels)
        mean, std = (None, None) if normalization == "none" else (IMAGENET_MEAN, IMAGENET_STD)
        return NormalizedEncoder(encoder, mean, std)
    if str(spec) in BASELINES:
        return build_baseline(str(spec))
    encoder, file_norm = load_encoder_file(spec)  # the stem as stored; gray input is matched
    if normalization == "imagenet":
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    elif normalization == "none" or file_norm is None:
        mean, std = None, None
    else:
        mean, std = file_norm["mean"], file_norm["std"]
    return NormalizedEncoder(encoder, mean, std)


def load_encoder_file(
    path: str | Path, in_channels: int | None = None
) -> tuple[nn.Module, dict | None]:
    """(encoder, normalisation or None) from any file ``medp2x.checkpoints`` reads (imported
    lazily: only path-given encoders need it)."""
    from medp2x.checkpoints import load_encoder

    encoder, report = load_encoder(path, in_channels=in_channels)
    logger.info("%s", report)
    return encoder, report.normalization


def read_run_checkpoint(path: str | Path) -> dict:
    """An engine checkpoint, read safely (weights only, plus the NumPy RNG state its trainer
    entry carries); any failure is one clear error."""
    from medp2x.checkpoints import torch_load_safe

    path = Path(path)
    try:
        ckpt = torch_load_safe(path)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ValueError(f"{path}: not a readable checkpoint ({err})") from err
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"{path}: not a checkpoint dictionary")
    return dict(ckpt)


def checkpoint_progress(path: str | Path) -> dict[str, float | None]:
    """Pretraining progress of an engine checkpoint: ``{"iteration", "epoch"}`` from its Ignite
    ``trainer`` state (epoch = iteration / epoch_length), else the number in the file name
    (``checkpoint_<iteration>.pt``) as the iteration and no epoch."""
    path = Path(path)
    trainer = read_run_checkpoint(path).get("trainer")
    if isinstance(trainer, Mapping) and trainer.get("epoch_length"):
        length = int(trainer["epoch_length"])
        iteration = trainer.get("iteration")
        iteration = int(iteration) if iteration is not None else int(trainer["epoch"]) * length
        return {"iteration": iteration, "epoch": iteration / length}
    match = re.search(r"(\d+)(?=\.\w+$)", path.name)
    if match is None:
        raise ValueError(f"{path}: no trainer state and no iteration number in the file name")
    return {"iteration": int(match.group(1)), "epoch": None}


@torch.no_grad()
def extract_features(
    encoder: nn.Module, dataset: Dataset, settings: EvalSettings, desc: str = "features"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen features (eval mode: BN running statistics) and labels, on the device."""
    encoder = encoder.to(settings.device).eval()
    channels = input_channels(encoder)
    feats, labels = [], []
    for images, y in tqdm(
        make_loader(dataset, settings), desc=desc, disable=not settings.progress, leave=False
    ):
        images = match_channels(images.to(settings.device), channels)
        feats.append(encoder(images).float().flatten(1))
        labels.append(y.to(settings.device))
    return torch.cat(feats), torch.cat(labels)


# ----------------------------------------------------------------------------- kNN


def knn_scores(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    query_x: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """Class scores (rows sum to 1) from the k most cosine-similar training features, each
    voting with weight exp(similarity / T) (Wu et al. 2018, DINO)."""
    k = min(k, len(train_x))
    train_n = F.normalize(train_x, dim=1)
    out = []
    for start in range(0, len(query_x), chunk):
        sims = F.normalize(query_x[start : start + chunk], dim=1) @ train_n.T
        top_sims, top_idx = sims.topk(k, dim=1)
        weights = (top_sims / temperature).exp()
        votes = torch.zeros(len(sims), num_classes, device=sims.device, dtype=sims.dtype)
        votes.scatter_add_(1, train_y[top_idx], weights)
        out.append(votes / votes.sum(1, keepdim=True))
    return torch.cat(out)


# ----------------------------------------------------------------------------- linear probe


def fit_logistic(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float, max_iter: int = 200
) -> nn.Linear:
    """Multinomial logistic regression, full batch, L-BFGS with strong-Wolfe line search.

    Why not Adam/SGD epochs or sklearn: the problem is convex, so L-BFGS reaches the optimum
    with no learning rate or epoch count to tune, deterministically, on whatever device holds
    the features (sklearn would move them to the CPU and is slower in the multinomial case).
    """
    layer = nn.Linear(x.shape[1], num_classes).to(device=x.device, dtype=x.dtype)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    opt = torch.optim.LBFGS(
        layer.parameters(),
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-7,
        tolerance_change=1e-10,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(layer(x), y) + 0.5 * weight_decay * layer.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return layer.requires_grad_(False)


def linear_probe(
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    settings: EvalSettings,
) -> tuple[dict, dict]:
    """Fit one probe per L2 strength, keep the best on validation, report it on test.
    Features are standardised with the training subset's statistics (conditioning)."""
    mean, std = train[0].mean(0), train[0].std(0, unbiased=False).clamp_min(1e-6)

    def standardise(x: torch.Tensor) -> torch.Tensor:
        return (x - mean) / std

    best = None
    for wd in settings.linear_weight_decays:
        layer = fit_logistic(
            standardise(train[0]), train[1], num_classes, wd, settings.linear_max_iter
        )
        score = _score(layer(standardise(val[0])), val[1], num_classes, settings.select_metric)
        if best is None or score > best[0]:
            best = (score, wd, layer)
    score, wd, layer = best
    test_metrics = _metrics(layer(standardise(test[0])).softmax(1), test[1], num_classes)
    return test_metrics, {"selected": f"weight_decay={wd:g}", "val_score": score}


# ----------------------------------------------------------------------------- fine-tuning


class Classifier(nn.Module):
    """Encoder + linear head; adapts image channels to the encoder's stem."""

    def __init__(self, encoder: nn.Module, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.channels = input_channels(encoder)
        self.head = nn.Linear(int(encoder.feature_dim), num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(match_channels(images, self.channels)).flatten(1))


@torch.inference_mode()
def predict(model: nn.Module, loader: DataLoader, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax probabilities and labels over a loader, in eval mode."""
    model.eval()
    probs, labels = [], []
    for images, y in loader:
        probs.append(model(images.to(device)).float().softmax(1))
        labels.append(y.to(device))
    return torch.cat(probs), torch.cat(labels)


def finetune(
    encoder: nn.Module,
    splits: Splits,
    train_indices: np.ndarray,
    settings: EvalSettings,
    seed: int = 0,
    desc: str = "finetune",
) -> tuple[dict, dict]:
    """Fine-tune a deep copy of the encoder with a fresh linear head (Adam, paper settings);
    restore the epoch with the best validation score and report it on the test split."""
    torch.manual_seed(seed)
    model = Classifier(copy.deepcopy(encoder), splits.num_classes).to(settings.device)
    opt = torch.optim.Adam(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    subset = Subset(splits.train, train_indices.tolist())
    # BatchNorm cannot train on a batch of one: drop a last batch of exactly one sample.
    drop_last = len(subset) > 1 and len(subset) % settings.batch_size == 1
    train_loader = make_loader(subset, settings, shuffle=True, generator=gen, drop_last=drop_last)
    val_loader = make_loader(splits.val, settings)
    best_score, best_epoch, best_state = -math.inf, 0, None
    epochs = tqdm(
        range(1, settings.epochs + 1), desc=desc, disable=not settings.progress, leave=False
    )
    for epoch in epochs:
        model.train()
        for images, y in train_loader:
            images = images.to(settings.device)
            if settings.augment:
                images = random_hflip(images, gen)
            loss = F.cross_entropy(model(images), y.to(settings.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        probs, labels = predict(model, val_loader, settings.device)
        score = _score(probs, labels, splits.num_classes, settings.select_metric)
        epochs.set_postfix(loss=loss.item(), val=score)
        if score > best_score:
            best_score, best_epoch = score, epoch
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    if best_state is not None:
        model.load_state_dict(best_state)
    probs, labels = predict(model, make_loader(splits.test, settings), settings.device)
    info = {"selected": f"epoch={best_epoch}/{settings.epochs}", "val_score": best_score}
    return _metrics(probs, labels, splits.num_classes), info


def random_hflip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip each image left-right with probability 1/2 (the fine-tuning augmentation)."""
    flip = torch.rand(len(images), generator=generator) < 0.5
    flip = flip.to(images.device).view(-1, 1, 1, 1)
    return torch.where(flip, images.flip(-1), images)


# ----------------------------------------------------------------------------- metrics glue


def _metrics(scores: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    scores_np = scores.detach().float().cpu().numpy()
    return classification_metrics(
        labels.cpu().numpy(), scores_np.argmax(1), scores_np, num_classes=num_classes
    )


def _score(scores: torch.Tensor, labels: torch.Tensor, num_classes: int, metric: str) -> float:
    value = _metrics(scores, labels, num_classes)[metric]
    return -math.inf if math.isnan(value) else value


# ----------------------------------------------------------------------------- comparison


def compare_encoders(
    encoders: Mapping[str, EncoderSpec],
    train: Dataset,
    test: Dataset,
    val: Dataset | None = None,
    protocol: str | Sequence[str] = "linear",
    label_fraction: float = 1.0,
    draws: int = 1,
    epochs: int = 20,
    batch_size: int = 64,
    lr: float = 3e-4,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = True,
    *,
    disjoint: bool = False,
    val_fraction: float = 0.1,
    image_size: int | None = None,
    arch: str = "resnet18",
    in_channels: int = 3,
    normalization: str = "auto",
    weight_decay: float = 1e-4,
    knn_k: int = 20,
    knn_temperature: float = 0.07,
    linear_weight_decays: Sequence[float] = EvalSettings.linear_weight_decays,
    select_metric: str = "accuracy",
    augment: bool = True,
    num_workers: int = 0,
    bn_stats: str = "saved",
) -> list[dict]:
    """Evaluate every encoder with every protocol on the same splits and label draws.

    ``encoders`` maps a display name to a module taking [0, 1] images (with ``feature_dim``),
    ``"random"``, or a checkpoint path (loaded one at a time, see ``resolve_encoder``). Caller
    modules are never modified: fine-tuning trains a deep copy. Returns one row per encoder x
    protocol x draw: encoder, protocol, draw, seed, label_fraction, n_train, n_val, n_test,
    val_source, accuracy, balanced_accuracy, macro_f1, auroc (binary; else NaN), selected
    (best epoch / L2 strength / k, T), val_score, seconds.
    """
    protocols = [protocol] if isinstance(protocol, str) else list(protocol)
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown or not protocols:
        raise ValueError(f"unknown protocol(s) {unknown}; choose from {', '.join(PROTOCOLS)}")
    if select_metric not in METRICS:
        raise ValueError(f"select_metric must be one of {', '.join(METRICS)}")
    if bn_stats not in BN_STATS:
        raise ValueError(f"bn_stats must be one of {', '.join(BN_STATS)}, got {bn_stats!r}")
    settings = EvalSettings(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        image_size=image_size,
        device=device,
        knn_k=knn_k,
        knn_temperature=knn_temperature,
        linear_weight_decays=tuple(linear_weight_decays),
        select_metric=select_metric,
        augment=augment,
        num_workers=num_workers,
        progress=progress,
        bn_stats=bn_stats,
    )
    splits = prepare_splits(train, test, val, val_fraction, seed, progress)
    subsets = low_label_draws(splits.train_labels, label_fraction, draws, seed, disjoint)
    rows = []
    for name, spec in encoders.items():
        encoder = resolve_encoder(spec, arch, in_channels, normalization, seed)
        rows += _evaluate_one(
            name, encoder, splits, subsets, protocols, settings, seed, label_fraction
        )
    return rows


def _evaluate_one(
    name: str,
    encoder: nn.Module,
    splits: Splits,
    subsets: list[np.ndarray],
    protocols: list[str],
    settings: EvalSettings,
    seed: int,
    label_fraction: float,
) -> list[dict]:
    """All protocols and draws for one encoder; frozen features are computed once and shared
    by the linear and kNN protocols and by every draw."""
    feats = None
    if {"linear", "knn"} & set(protocols):
        frozen = encoder
        if settings.bn_stats == "recomputed":
            images = training_images(splits.train, settings, input_channels(encoder))
            frozen = recompute_bn_stats(encoder.to(settings.device), images)
        feats = _frozen_features(name, frozen, splits, subsets, settings)
    rows = []
    for protocol in protocols:
        for draw, idx in enumerate(subsets):
            start = time.perf_counter()
            metrics, info = _run_protocol(
                protocol, encoder, splits, feats, idx, settings, seed + draw, name
            )
            rows.append(
                {
                    "encoder": name,
                    "protocol": protocol,
                    "draw": draw,
                    "seed": seed + draw,
                    "label_fraction": label_fraction,
                    "n_train": len(idx),
                    "n_val": len(splits.val_labels),
                    "n_test": len(splits.test_labels),
                    "val_source": splits.val_source,
                    **metrics,
                    **info,
                    "seconds": round(time.perf_counter() - start, 3),
                }
            )
            logger.info("%s %s draw %d: accuracy %.4f", name, protocol, draw, metrics["accuracy"])
    return rows


def training_images(dataset: Dataset, settings: EvalSettings, channels: int | None):
    """The images of ``dataset`` in evaluation batches, labels dropped (BN re-averaging)."""
    for images, _ in make_loader(dataset, settings):
        yield match_channels(images.to(settings.device), channels)


def _frozen_features(
    name: str, encoder: nn.Module, splits: Splits, subsets: list[np.ndarray], settings: EvalSettings
) -> dict:
    """Features of validation, test and only those training samples some draw uses: with 10%
    draws that skips most of the training set's forward passes."""
    used = np.unique(np.concatenate(subsets))
    train = (
        splits.train
        if len(used) == len(splits.train_labels)
        else Subset(splits.train, used.tolist())
    )
    return {
        "train_indices": used,
        "train": extract_features(encoder, train, settings, f"{name}: train features"),
        "val": extract_features(encoder, splits.val, settings, f"{name}: val features"),
        "test": extract_features(encoder, splits.test, settings, f"{name}: test features"),
    }


def _run_protocol(
    protocol: str,
    encoder: nn.Module,
    splits: Splits,
    feats: dict | None,
    idx: np.ndarray,
    settings: EvalSettings,
    seed: int,
    name: str,
) -> tuple[dict, dict]:
    if protocol == "finetune":
        return finetune(encoder, splits, idx, settings, seed, f"{name}: finetune")
    # rows of the draw's samples among the featurised training samples (sorted indices)
    rows = np.searchsorted(feats["train_indices"], idx)
    sel = torch.as_tensor(rows, device=feats["train"][0].device)
    train = (feats["train"][0][sel], feats["train"][1][sel])
    if protocol == "linear":
        return linear_probe(train, feats["val"], feats["test"], splits.num_classes, settings)
    scores = knn_scores(
        *train, feats["test"][0], splits.num_classes, settings.knn_k, settings.knn_temperature
    )
    info = {"selected": f"k={min(settings.knn_k, len(idx))},T={settings.knn_temperature:g}"}
    return _metrics(scores, feats["test"][1], splits.num_classes), {**info, "val_score": math.nan}


# ----------------------------------------------------------------------------- tables


def summarize(rows: Sequence[Mapping]) -> pd.DataFrame:
    """Mean and sample std over draws per encoder x protocol x label fraction (input order)."""
    frame = pd.DataFrame(list(rows))
    keys = ["encoder", "protocol", "label_fraction"]
    grouped = frame.groupby(keys, sort=False)
    out = grouped[list(METRICS)].agg(["mean", "std"])
    out.columns = [f"{m}_{s}" for m, s in out.columns]
    out.insert(0, "draws", grouped.size())
    out.insert(1, "n_train", grouped["n_train"].mean().round().astype(int))
    return out.reset_index()


def _pm(mean: float, std: float, scale: float = 100.0) -> str:
    if math.isnan(mean):
        return "n/a"
    if math.isnan(std):
        return f"{scale * mean:.1f}"
    return f"{scale * mean:.1f} ± {scale * std:.1f}"


def format_table(rows: Sequence[Mapping]) -> str:
    """Markdown table: per encoder x protocol, mean ± std over draws of each metric (in %)."""
    summary = summarize(rows)
    table = pd.DataFrame(
        {
            "encoder": summary["encoder"],
            "protocol": summary["protocol"],
            "labels": [f"{100 * f:g}%" for f in summary["label_fraction"]],
            "draws": summary["draws"],
            "n_train": summary["n_train"],
            **{
                f"{_METRIC_TITLES[m]} (%)": [
                    _pm(a, b)
                    for a, b in zip(summary[f"{m}_mean"], summary[f"{m}_std"], strict=True)
                ]
                for m in METRICS
            },
        }
    )
    return table.to_markdown(index=False)


_METRIC_TITLES = {
    "accuracy": "accuracy",
    "balanced_accuracy": "balanced acc.",
    "macro_f1": "macro-F1",
    "auroc": "AUROC",
}


def format_accuracy_pivot(rows: Sequence[Mapping]) -> str:
    """The paper's Table 2/3 layout for one benchmark: encoders as rows, protocols as columns,
    mean ± std accuracy (%)."""
    summary = summarize(rows)
    summary["cell"] = [
        _pm(a, b) for a, b in zip(summary["accuracy_mean"], summary["accuracy_std"], strict=True)
    ]
    summary["column"] = [
        f"{p} ({100 * f:g}% labels)"
        for p, f in zip(summary["protocol"], summary["label_fraction"], strict=True)
    ]
    pivot = summary.pivot(index="encoder", columns="column", values="cell")
    pivot = pivot.reindex(index=list(dict.fromkeys(summary["encoder"])))
    pivot = pivot[list(dict.fromkeys(summary["column"]))]
    return pivot.fillna("").to_markdown()


def format_draws(rows: Sequence[Mapping]) -> str:
    """Markdown table with one line per encoder x protocol x draw."""
    frame = pd.DataFrame(list(rows))
    cols = ["encoder", "protocol", "draw", "seed", "n_train", *METRICS, "selected"]
    frame = frame[[c for c in cols if c in frame]].copy()
    for m in METRICS:
        frame[m] = [("n/a" if math.isnan(v) else f"{100 * v:.1f}") for v in frame[m]]
    return frame.to_markdown(index=False, disable_numparse=True)  # keep "71.0", not "71"


def write_results(
    rows: Sequence[Mapping], out_dir: str | Path, title: str = "Downstream evaluation"
) -> tuple[Path, Path]:
    """``results.md`` (summary, Table 2/3-style accuracy, per-draw table) and ``results.csv``
    (one row per encoder x protocol x draw, all metrics as fractions)."""
    if not rows:
        raise ValueError("no result rows to write")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path, csv_path = out_dir / "results.md", out_dir / "results.csv"
    first = rows[0]
    test_source = f" ({first['test_source']})" if first.get("test_source") else ""
    notes = (
        f"Test split: {first['n_test']} samples{test_source}; validation: {first['n_val']} samples "
        f"({first['val_source']}), used for model selection only. Metrics in %, "
        "mean ± sample std over the label draws."
    )
    text = "\n\n".join(
        [
            f"# {title}",
            notes,
            "## Summary",
            format_table(rows),
            "## Accuracy (Table 2/3 layout)",
            format_accuracy_pivot(rows),
            "## Per draw",
            format_draws(rows),
        ]
    )
    md_path.write_text(text + "\n")
    pd.DataFrame(list(rows)).to_csv(csv_path, index=False)
    return md_path, csv_path


# ----------------------------------------------------------------------------- convergence


def list_checkpoints(source: str | Path | Sequence[str | Path]) -> list[Path]:
    """Checkpoint files of a run: a list of files, a folder of ``*.pt`` files, or a run's
    output folder (its ``checkpoints/`` subfolder), in the order of their step numbers."""
    if isinstance(source, (str, Path)):
        root = Path(source)
        if not root.exists():
            raise FileNotFoundError(f"checkpoint source {str(root)!r} does not exist")
        if root.is_dir() and (root / "checkpoints").is_dir():
            root = root / "checkpoints"
        files = sorted(root.glob("*.pt")) if root.is_dir() else [root]
    else:
        files = [Path(p) for p in source]
    if not files:
        raise FileNotFoundError(f"no checkpoint files (*.pt) in {source}")
    return sorted(files, key=_step_in_name)


def _step_in_name(path: Path) -> tuple[int, str]:
    """Sort key: the last number in the name (``checkpoint_<iteration>.pt``), then the name;
    avoids reading every (possibly large) checkpoint just to order them."""
    numbers = re.findall(r"\d+", path.stem)
    return (int(numbers[-1]) if numbers else -1, path.name)


def convergence_figure(
    series: Mapping[str, str | Path | Sequence[str | Path]] | str | Path | Sequence[str | Path],
    train: Dataset,
    test: Dataset,
    out_png: str | Path,
    val: Dataset | None = None,
    protocol: str = "linear",
    metric: str = "accuracy",
    x: str = "epoch",
    load: Callable[[Path], nn.Module] | None = None,
    **compare_kwargs,
) -> tuple[Path, Path, list[dict]]:
    """Downstream ``metric`` against pretraining progress for the checkpoints of one or more
    runs (Figs. 2-3: e.g. {"P2X scaled": run_a, "P2X unscaled": run_b}), one line per series,
    values written beside the points. Returns (png, csv, rows); rows carry series, iteration
    and epoch besides the metrics (mean over draws is plotted).

    ``load`` turns a checkpoint file into an encoder (default: ``resolve_encoder``);
    ``compare_kwargs`` go to ``compare_encoders`` (label_fraction, draws, image_size, ...).
    """
    from medp2x.plots import plot_series

    if x not in ("epoch", "iteration"):
        raise ValueError(f"x must be 'epoch' or 'iteration', not {x!r}")
    if not isinstance(series, Mapping):
        series = {_series_name(series): series}
    load = load or resolve_encoder
    all_rows, points = [], {}
    for name, source in series.items():
        points[name] = []
        for path in list_checkpoints(source):
            progress = checkpoint_progress(path)
            if progress[x] is None:
                raise ValueError(f"{path}: no trainer state, so no {x}; use x='iteration'")
            rows = compare_encoders(
                {f"{name} @ {x} {progress[x]:g}": load(path)},
                train,
                test,
                val,
                protocol=protocol,
                **compare_kwargs,
            )
            for row in rows:
                row.update(series=name, checkpoint=str(path), **progress)
            all_rows += rows
            points[name].append((progress[x], 100 * float(np.mean([r[metric] for r in rows]))))
    xlabel = "pretraining epoch" if x == "epoch" else "pretraining iteration"
    png, csv_path = plot_series(
        points, out_png, xlabel=xlabel, ylabel=f"{protocol} {metric} (%)", title="Convergence"
    )
    return png, csv_path, all_rows


def _series_name(source) -> str:
    if isinstance(source, (str, Path)):
        path = Path(source)
        return path.parent.name if path.name == "checkpoints" else path.name
    return "run"


# ----------------------------------------------------------------------------- from paths


def load_datasets(
    data: str | Path,
    val_data: str | Path | None = None,
    test_data: str | Path | None = None,
    test_fraction: float = 0.2,
    gray: bool = False,
    image_size: int | None = None,
    on_error: str = "raise",
    seed: int = 0,
) -> tuple[Dataset, Dataset | None, Dataset, str]:
    """(train, val or None, test, how the test split was made) from paths.

    ``data`` is a class-per-folder image set (``medp2x.data.folder``) or a MedMNIST-style
    ``.npz`` (its val/test splits are used unless others are given). Without a test set a
    stratified ``test_fraction`` of ``data`` is held out with ``seed``.
    """
    train, val, test = _read_path(data, "train", gray, image_size, on_error), None, None
    if Path(data).suffix == ".npz":
        from medp2x.data.npz import available_splits

        splits = available_splits(data)
        val = _read_path(data, "val", gray, image_size, on_error) if "val" in splits else None
        test = _read_path(data, "test", gray, image_size, on_error) if "test" in splits else None
    if val_data is not None:
        val = _read_path(val_data, "val", gray, image_size, on_error)
    note = "given"
    if test_data is not None:
        test = _read_path(test_data, "test", gray, image_size, on_error)
    elif test is None:
        kept, held = stratified_split(dataset_labels(train, True), test_fraction, seed)
        train, test = Subset(train, kept.tolist()), Subset(train, held.tolist())
        note = f"held out from --data ({100 * test_fraction:g}%, stratified, seed {seed})"
    return train, val, test, note


def _read_path(path, split: str, gray: bool, image_size: int | None, on_error: str) -> Dataset:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data {str(path)!r} does not exist")
    if path.suffix == ".npz":
        from medp2x.data.npz import NpzDataset

        return NpzDataset(path, split, image_size=image_size)
    if not path.is_dir():
        raise ValueError(f"{path}: expected a class-per-folder directory or a .npz file")
    from medp2x.data.folder import ImageFolderDataset

    return ImageFolderDataset(path, gray=gray, image_size=image_size, on_error=on_error)


def run_evaluation(
    data: str | Path,
    encoders: Mapping[str, EncoderSpec] | Sequence[EncoderSpec],
    out_dir: str | Path,
    val_data: str | Path | None = None,
    test_data: str | Path | None = None,
    test_fraction: float = 0.2,
    gray: bool = False,
    on_error: str = "raise",
    **compare_kwargs,
) -> list[dict]:
    """Paths in, ``results.md`` / ``results.csv`` out: the CLI's and the evaluation bundles'
    entry point (``_target_: medp2x.evaluate.run_evaluation``)."""
    if not isinstance(encoders, Mapping):
        encoders = {_encoder_name(e): e for e in encoders}
    seed = compare_kwargs.get("seed", 0)
    image_size = compare_kwargs.get("image_size")
    train, val, test, note = load_datasets(
        data, val_data, test_data, test_fraction, gray, image_size, on_error, seed
    )
    logger.info("test split: %s", note)
    rows = compare_encoders(encoders, train, test, val, **compare_kwargs)
    for row in rows:
        row["test_source"] = note
    write_results(rows, out_dir, title=f"Downstream evaluation on {Path(data).name}")
    return rows


def _encoder_name(spec: EncoderSpec) -> str:
    if isinstance(spec, nn.Module):
        return type(spec).__name__
    return "random" if str(spec) == "random" else Path(spec).stem


__all__ = [
    "PROTOCOLS",
    "EvalSettings",
    "Splits",
    "checkpoint_progress",
    "compare_encoders",
    "convergence_figure",
    "dataset_labels",
    "extract_features",
    "finetune",
    "fit_logistic",
    "format_accuracy_pivot",
    "format_draws",
    "format_table",
    "knn_scores",
    "linear_probe",
    "list_checkpoints",
    "load_datasets",
    "low_label_draws",
    "prepare_splits",
    "resolve_encoder",
    "run_evaluation",
    "stratified_split",
    "summarize",
    "write_results",
]
