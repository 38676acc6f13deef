"""Fine-tuning protocol (the paper's): whole network + linear head, Adam lr 3e-4, weight decay
1e-4, random-resized crops + flips (``medp2x.eval.images``).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from medp2x.eval.features import input_channels, make_loader
from medp2x.eval.protocols.scores import (
    PREDICTIONS,
    predicted_classes,
    selection_score,
    test_metrics,
)
from medp2x.eval.settings import EvalSettings
from medp2x.eval.splits import Splits
from medp2x.networks import match_channels


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
        score = selection_score(probs, labels, splits.num_classes, settings.select_metric)
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
        PREDICTIONS: predicted_classes(probs),
    }
    return test_metrics(probs, labels, splits.num_classes), info
