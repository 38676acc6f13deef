"""Downstream evaluation: the paper's fine-tuning protocol, the usual linear probe and kNN,
low-label draws, paired intervals, and the comparison runner behind Tables 2-3 and Figs. 2-3.

Flow: ``compare_encoders`` fixes the label draws once (every encoder learns from the same
labels and is tested on the same images), checks that no encoder's pretraining saw a test
image (``medp2x.provenance``), then per encoder computes frozen features once (linear, kNN)
or fine-tunes a copy (finetune), and returns one row of metrics per encoder x protocol x
draw, with each encoder's paired bootstrap interval against the reference encoder(s).
``write_results`` turns rows into ``results.md`` / ``results.csv`` / ``results.png``;
``convergence_figure`` evaluates the checkpoints of pretraining runs against progress.

The label budget (docs/evaluation.md): a draw of X % of the training labels is all a
protocol learns *or selects* from. ``selection="none"`` (default, the paper's setting): a
fixed number of fine-tuning epochs, a fixed probe regularisation, the final model tested.
``selection="draw"``: a stratified ``val_fraction`` of each draw is held out to choose the
epoch / probe strength; the rest is trained on. ``selection="val"``: a given validation split
chooses (labels outside the budget; the table says so).

Protocols:
- ``finetune``: whole network + linear head, Adam lr 3e-4, weight decay 1e-4 (paper),
  random-resized crops + flips (``medp2x.eval.images``).
- ``linear``: multinomial logistic regression on standardised frozen features, fitted
  full-batch with L-BFGS on the evaluation device.
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
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from medp2x.baselines import BASELINES, build_baseline
from medp2x.batchnorm import BN_STATS, recompute_bn_stats
from medp2x.eval.images import EvalCollate, TrainCollate
from medp2x.eval.paired import paired_bootstrap
from medp2x.eval.report import (
    format_accuracy_pivot,
    format_differences,
    format_draws,
    format_table,
    paired_differences,
    summarize,
    write_results,
)
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
SELECTIONS = ("none", "draw", "val")
EncoderSpec = nn.Module | str | Path
BatchCollate = EvalCollate  # the name this collate had before images kept their shape


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
    linear_weight_decays: tuple[float, ...] = (1e-1, 1e-2, 1e-3, 1e-4, 0.0)  # searched grid
    linear_weight_decay: float | None = None  # without selection; None: 1 / n (sklearn's C = 1)
    linear_max_iter: int = 200
    select_metric: str = "accuracy"
    augment: bool = True
    crop_scale: float = 0.08  # fine-tuning random-resized crop: smallest area fraction
    num_workers: int = 0
    progress: bool = True
    bn_stats: str = "saved"  # "recomputed": frozen protocols first re-average BN (batchnorm.py)
    selection: str = "none"


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


def _round_half_up(x: float) -> int:
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


# ----------------------------------------------------------------------------- batches


def make_loader(
    dataset: Dataset,
    settings: EvalSettings,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
    train: bool = False,
) -> DataLoader:
    """Batches through the evaluation view (``train``: the fine-tuning view)."""
    collate = (
        TrainCollate(settings.image_size, settings.crop_scale)
        if train
        else EvalCollate(settings.image_size)
    )
    return DataLoader(
        dataset,
        batch_size=settings.batch_size,
        shuffle=shuffle,
        generator=generator,
        drop_last=drop_last,
        collate_fn=collate,
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
        from medp2x.recovery import why_unloadable  # #21: never torch's advice to load unsafely

        raise ValueError(
            f"{path}: not a readable checkpoint ({why_unloadable(path, err)})"
        ) from None
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
    val: tuple[torch.Tensor, torch.Tensor] | None,
    test: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    settings: EvalSettings,
) -> tuple[dict, dict]:
    """Fit the probe on ``train`` and report it on ``test``. With ``val``, one probe per L2
    strength of ``settings.linear_weight_decays`` is fitted and the best on ``val`` kept;
    without, one probe with ``settings.linear_weight_decay`` (None: 1 / n, scikit-learn's
    default C = 1). Features are standardised with the training features' statistics."""
    mean, std = train[0].mean(0), train[0].std(0, unbiased=False).clamp_min(1e-6)

    def standardise(x: torch.Tensor) -> torch.Tensor:
        return (x - mean) / std

    def fit(wd: float) -> nn.Linear:
        return fit_logistic(
            standardise(train[0]), train[1], num_classes, wd, settings.linear_max_iter
        )

    if val is None:
        wd = settings.linear_weight_decay
        wd = 1.0 / len(train[0]) if wd is None else wd
        layer, score, selected = fit(wd), math.nan, f"weight_decay={wd:.3g} (fixed)"
    else:
        best = None
        for wd in settings.linear_weight_decays:
            layer = fit(wd)
            score = _score(layer(standardise(val[0])), val[1], num_classes, settings.select_metric)
            if best is None or score > best[0]:
                best = (score, wd, layer)
        score, wd, layer = best
        selected = f"weight_decay={wd:g}"
    scores = layer(standardise(test[0])).softmax(1)
    return _metrics(scores, test[1], num_classes), {
        "selected": selected,
        "val_score": score,
        PREDICTIONS: _argmax(scores),
    }


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
    select: Dataset | None = None,
) -> tuple[dict, dict]:
    """Fine-tune a deep copy of the encoder with a fresh linear head (Adam, paper settings)
    on ``train_indices`` of the training split for ``settings.epochs`` epochs and report the
    final model on the test split (the paper's protocol). With ``select``, the epoch with the
    best score on it is restored instead."""
    torch.manual_seed(seed)  # head init and the random crops of the fine-tuning view
    model = Classifier(copy.deepcopy(encoder), splits.num_classes).to(settings.device)
    opt = torch.optim.Adam(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    subset = Subset(splits.train, train_indices.tolist())
    # BatchNorm cannot train on a batch of one: drop a last batch of exactly one sample.
    drop_last = len(subset) > 1 and len(subset) % settings.batch_size == 1
    train_loader = make_loader(
        subset, settings, shuffle=True, generator=gen, drop_last=drop_last, train=settings.augment
    )
    select_loader = None if select is None else make_loader(select, settings)
    best_score, best_epoch, best_state = -math.inf, settings.epochs, None
    epochs = tqdm(
        range(1, settings.epochs + 1), desc=desc, disable=not settings.progress, leave=False
    )
    for epoch in epochs:
        model.train()
        for images, y in train_loader:
            loss = F.cross_entropy(model(images.to(settings.device)), y.to(settings.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if select_loader is None:
            epochs.set_postfix(loss=loss.item())
            continue
        probs, labels = predict(model, select_loader, settings.device)
        score = _score(probs, labels, splits.num_classes, settings.select_metric)
        epochs.set_postfix(loss=loss.item(), val=score)
        if score > best_score:
            best_score, best_epoch = score, epoch
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    if best_state is not None:
        model.load_state_dict(best_state)
    probs, labels = predict(model, make_loader(splits.test, settings), settings.device)
    fixed = " (fixed)" if select_loader is None else ""
    info = {
        "selected": f"epoch={best_epoch}/{settings.epochs}{fixed}",
        "val_score": best_score if select_loader is not None else math.nan,
        PREDICTIONS: _argmax(probs),
    }
    return _metrics(probs, labels, splits.num_classes), info


# ----------------------------------------------------------------------------- metrics glue

PREDICTIONS = "test_predictions"  # protocols' info key for per-image predictions (not a column)


def _argmax(scores: torch.Tensor) -> np.ndarray:
    return scores.detach().float().argmax(1).cpu().numpy()


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
    selection: str = "none",
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
    linear_weight_decay: float | None = None,
    select_metric: str = "accuracy",
    augment: bool = True,
    crop_scale: float = 0.08,
    num_workers: int = 0,
    bn_stats: str = "saved",
    reference: str | Sequence[str] | None = "auto",
    bootstrap: int = 2000,
    allow_test_overlap: bool = False,
) -> list[dict]:
    """Evaluate every encoder with every protocol on the same label draws and test images.

    ``encoders`` maps a display name to a module taking [0, 1] images (with ``feature_dim``),
    ``"random"``, a low-level reference, or a checkpoint path (loaded one at a time, see
    ``resolve_encoder``). Caller modules are never modified: fine-tuning trains a deep copy.

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
    protocols = [protocol] if isinstance(protocol, str) else list(protocol)
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown or not protocols:
        raise ValueError(f"unknown protocol(s) {unknown}; choose from {', '.join(PROTOCOLS)}")
    if select_metric not in METRICS:
        raise ValueError(f"select_metric must be one of {', '.join(METRICS)}")
    if bn_stats not in BN_STATS:
        raise ValueError(f"bn_stats must be one of {', '.join(BN_STATS)}, got {bn_stats!r}")
    if selection == "val" and val is None:
        raise ValueError("selection 'val' needs a validation split (--val-data, or an .npz 'val')")
    if val is not None and selection != "val":
        logger.info("a validation split was given but selection is %r: it is not used", selection)
    references = _references(encoders, reference)
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
        linear_weight_decay=linear_weight_decay,
        select_metric=select_metric,
        augment=augment,
        crop_scale=crop_scale,
        num_workers=num_workers,
        progress=progress,
        bn_stats=bn_stats,
        selection=selection,
    )
    overlaps = check_test_overlap(encoders, test, allow_test_overlap)
    splits = prepare_splits(train, test, val if selection == "val" else None, progress)
    plans = plan_draws(
        splits.train_labels, label_fraction, draws, seed, disjoint, selection, val_fraction
    )
    predictions: dict[tuple[str, str], list[np.ndarray]] = {}
    rows = []
    for name, spec in encoders.items():
        encoder = resolve_encoder(spec, arch, in_channels, normalization, seed)
        rows += _evaluate_one(name, encoder, splits, plans, protocols, settings, seed, predictions)
    for row in rows:
        row.update(
            label_fraction=label_fraction,
            n_train_split=len(splits.train_labels),
            **_settings_columns(settings, val_fraction, disjoint),
            test_overlap=overlaps[row["encoder"]].note,
            test_images_seen=overlaps[row["encoder"]].seen,
        )
    add_intervals(rows, predictions, splits.test_labels, references, bootstrap, seed)
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


def _settings_columns(settings: EvalSettings, val_fraction: float, disjoint: bool) -> dict:
    """What a reader needs to reproduce a cell, on every row (and so in results.csv)."""
    return {
        "selection": settings.selection,
        "val_fraction": val_fraction if settings.selection == "draw" else math.nan,
        "disjoint": disjoint,
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
    protocols: list[str],
    settings: EvalSettings,
    seed: int,
    predictions: dict,
) -> list[dict]:
    """All protocols and draws for one encoder; frozen features are computed once and shared
    by the linear and kNN protocols and by every draw."""
    feats = None
    if {"linear", "knn"} & set(protocols):
        frozen = encoder
        if settings.bn_stats == "recomputed":
            images = training_images(splits.train, settings, input_channels(encoder))
            frozen = recompute_bn_stats(encoder.to(settings.device), images)
        feats = _frozen_features(name, frozen, splits, plans, settings)
    rows = []
    for protocol in protocols:
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


def training_images(dataset: Dataset, settings: EvalSettings, channels: int | None):
    """The images of ``dataset`` in evaluation batches, labels dropped (BN re-averaging)."""
    for images, _ in make_loader(dataset, settings):
        yield match_channels(images.to(settings.device), channels)


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
        PREDICTIONS: _argmax(scores),
    }
    return _metrics(scores, feats["test"][1], splits.num_classes), info


# ----------------------------------------------------------------------------- intervals


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


# ----------------------------------------------------------------------------- test leakage


def check_test_overlap(
    encoders: Mapping[str, EncoderSpec], test: Dataset, allow: bool = False
) -> dict:
    """Per encoder, how many test images its pretraining run saw (``provenance.Overlap``).

    Refuses (ValueError, one line with the count) an encoder whose run saw any, unless
    ``allow``; then logs a warning and the table says so. Test images are hashed only when
    some encoder has a run record."""
    from medp2x.provenance import Overlap, count_test_overlap, find_record, sample_keys

    records = {name: _record_of(spec, find_record) for name, spec in encoders.items()}
    test_keys = sample_keys(test) if any(isinstance(r, Path) for r in records.values()) else None
    overlaps = {}
    for name, record in records.items():
        if isinstance(record, str):  # "not pretrained", "module": nothing to trace
            overlaps[name] = Overlap(record)
            continue
        overlap = count_test_overlap(record, test_keys)
        if overlap.seen:
            message = (
                f"encoder {name!r}: its pretraining run saw {overlap.seen} of the "
                f"{overlap.test_images} test images ({overlap.record})"
            )
            if not allow:
                raise ValueError(f"{message}; refusing to score it (--allow-test-overlap to force)")
            logger.warning("%s; scored anyway (allow_test_overlap)", message)
        overlaps[name] = overlap
    return overlaps


def _record_of(spec: EncoderSpec, find_record) -> Path | str | None:
    """The run record of an encoder file (None: none found), or why there is none to find."""
    if isinstance(spec, nn.Module):
        return "module"
    if str(spec) == "random" or str(spec) in BASELINES:
        return "not pretrained"
    return find_record(spec)


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
    allow_test_overlap: bool = False,
    **compare_kwargs,
) -> tuple[Path, Path, list[dict]]:
    """Downstream ``metric`` against pretraining progress for the checkpoints of one or more
    runs (Figs. 2-3: e.g. {"P2X scaled": run_a, "P2X unscaled": run_b}), one line per series,
    values written beside the points. Returns (png, csv, rows); rows carry series, iteration
    and epoch besides the metrics (mean over draws is plotted, with its bootstrap interval in
    the rows).

    ``load`` turns a checkpoint file into an encoder (default: ``resolve_encoder``);
    ``compare_kwargs`` go to ``compare_encoders`` (label_fraction, draws, image_size, ...).
    Every checkpoint's run record is checked against the test split first.
    """
    from medp2x.plots import plot_series

    if x not in ("epoch", "iteration"):
        raise ValueError(f"x must be 'epoch' or 'iteration', not {x!r}")
    if not isinstance(series, Mapping):
        series = {_series_name(series): series}
    files = {name: list_checkpoints(source) for name, source in series.items()}
    overlaps = check_test_overlap(
        {f"{name} @ {path.name}": path for name, paths in files.items() for path in paths},
        test,
        allow_test_overlap,
    )
    load = load or resolve_encoder
    all_rows, points = [], {}
    for name, paths in files.items():
        points[name] = []
        for path in paths:
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
            overlap = overlaps[f"{name} @ {path.name}"]
            for row in rows:
                row.update(series=name, checkpoint=path.name, **progress)
                row.update(test_overlap=overlap.note, test_images_seen=overlap.seen)
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
    on_error: str = "raise",
) -> tuple[Dataset, Dataset | None, Dataset, str]:
    """(train, val or None, test, where the test split comes from) from paths.

    ``data`` is a class-per-folder image set (``medp2x.data.folder``) or a MedMNIST-style
    ``.npz`` (its val/test splits are used unless others are given). The test split is a
    property of the dataset, never of an evaluation's seed: ``test_data``, else the file's
    ``test`` split, else a stratified ``test_fraction`` of each class held out with the
    registry's fixed ``SPLIT_SEED`` (the split the benchmarks' pretraining readers exclude).
    Images are read at their own size; the evaluation view resizes them (shape kept).
    """
    from medp2x.data.benchmarks import SPLIT_SEED

    train, val, test = _read_path(data, "train", gray, on_error), None, None
    note = "given (--test-data)"
    if Path(data).suffix == ".npz":
        from medp2x.data.npz import available_splits

        splits = available_splits(data)
        val = _read_path(data, "val", gray, on_error) if "val" in splits else None
        if "test" in splits:
            test, note = _read_path(data, "test", gray, on_error), "the file's test split"
    if val_data is not None:
        val = _read_path(val_data, "val", gray, on_error)
    if test_data is not None:
        test, note = _read_path(test_data, "test", gray, on_error), "given (--test-data)"
    elif test is None:
        kept, held = stratified_split(dataset_labels(train, True), test_fraction, SPLIT_SEED)
        train, test = Subset(train, kept.tolist()), Subset(train, held.tolist())
        note = (
            f"{100 * test_fraction:g}% of each class held out of --data with the fixed split "
            f"seed {SPLIT_SEED} (as the benchmark registry)"
        )
    return train, val, test, note


def _read_path(path, split: str, gray: bool, on_error: str) -> Dataset:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data {str(path)!r} does not exist")
    if path.suffix == ".npz":
        from medp2x.data.npz import NpzDataset

        return NpzDataset(path, split)
    if not path.is_dir():
        raise ValueError(f"{path}: expected a class-per-folder directory or a .npz file")
    from medp2x.data.folder import ImageFolderDataset

    return ImageFolderDataset(path, gray=gray, on_error=on_error)


def run_evaluation(
    data: str | Path,
    encoders: Mapping[str, EncoderSpec] | Sequence[EncoderSpec],
    out_dir: str | Path,
    val_data: str | Path | None = None,
    test_data: str | Path | None = None,
    test_fraction: float = 0.2,
    gray: bool = False,
    on_error: str = "raise",
    command: str | None = None,
    **compare_kwargs,
) -> list[dict]:
    """Paths in, ``results.md`` / ``results.csv`` / ``results.png`` out: the CLI's and the
    evaluation bundles' entry point (``_target_: medp2x.evaluate.run_evaluation``)."""
    if not isinstance(encoders, Mapping):
        encoders = {_encoder_name(e): e for e in encoders}
    train, val, test, note = load_datasets(data, val_data, test_data, test_fraction, gray, on_error)
    logger.info("test split: %s", note)
    rows = compare_encoders(encoders, train, test, val, **compare_kwargs)
    for row in rows:
        row["test_source"] = note
    write_results(
        rows, out_dir, title=f"Downstream evaluation on {Path(data).name}", command=command
    )
    return rows


def _encoder_name(spec: EncoderSpec) -> str:
    if isinstance(spec, nn.Module):
        return type(spec).__name__
    return "random" if str(spec) == "random" else Path(spec).stem


__all__ = [
    "PROTOCOLS",
    "SELECTIONS",
    "DrawPlan",
    "EvalSettings",
    "Splits",
    "add_intervals",
    "check_test_overlap",
    "checkpoint_progress",
    "compare_encoders",
    "convergence_figure",
    "dataset_labels",
    "extract_features",
    "finetune",
    "fit_logistic",
    "format_accuracy_pivot",
    "format_differences",
    "format_draws",
    "format_table",
    "knn_scores",
    "linear_probe",
    "list_checkpoints",
    "load_datasets",
    "low_label_draws",
    "paired_differences",
    "plan_draws",
    "prepare_splits",
    "resolve_encoder",
    "run_evaluation",
    "stratified_split",
    "summarize",
    "training_images",
    "write_results",
]
