"""Batches through the evaluation view and frozen features (the linear and kNN protocols)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from medp2x.eval.images import EvalCollate, TrainCollate
from medp2x.eval.settings import EvalSettings
from medp2x.networks import match_channels


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


def training_images(dataset: Dataset, settings: EvalSettings, channels: int | None):
    """The images of ``dataset`` in evaluation batches, labels dropped (BN re-averaging)."""
    for images, _ in make_loader(dataset, settings):
        yield match_channels(images.to(settings.device), channels)
