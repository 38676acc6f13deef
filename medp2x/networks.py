"""Encoders and small building blocks shared by every stage.

The encoder is a torchvision ResNet with ``fc`` replaced by ``Identity``: that is the layout
of every official SSL checkpoint (see ``medp2x.checkpoints``), so weights move between stages and
tools without renaming. MONAI's ResNet is not used: its stride-1 stem is 3.6-5x slower on CPU
and no public SSL checkpoint uses its key names.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torchvision
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2")


def build_encoder(arch: str = "resnet18", in_channels: int = 3) -> nn.Module:
    """A torchvision ResNet without its classifier; ``encoder.feature_dim`` is its output size."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    net = getattr(torchvision.models, arch)(weights=None)
    if in_channels != 3:
        old = net.conv1
        net.conv1 = nn.Conv2d(in_channels, old.out_channels, 7, 2, 3, bias=False)
    net.feature_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net


def feature_dim(encoder: nn.Module) -> int:
    """Output width of an encoder (read from the attribute, or measured once)."""
    if hasattr(encoder, "feature_dim"):
        return int(encoder.feature_dim)
    first = next(m for m in encoder.modules() if isinstance(m, nn.Conv2d))
    with torch.no_grad():
        was_training = encoder.training
        encoder.eval()
        out = encoder(torch.zeros(1, first.in_channels, 64, 64))
        encoder.train(was_training)
    return int(out.shape[1])


def match_channels(images: torch.Tensor, channels: int | None) -> torch.Tensor:
    """Gray -> RGB by repetition (ImageNet stems see gray as R = G = B), RGB -> gray by
    averaging; one image (C x H x W) or a batch (N x C x H x W). ``None`` keeps the input."""
    have = images.shape[-3]
    if channels is None or have == channels:
        return images
    if have == 1:
        return images.expand(*images.shape[:-3], channels, *images.shape[-2:])
    if channels == 1:
        return images.mean(-3, keepdim=True)
    raise ValueError(f"images have {have} channels but the encoder expects {channels}")


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` as a layer, so an encoder carries the input scaling
    its weights expect (SimCLR: none; ImageNet mean/std for the others)."""

    def __init__(self, mean: Sequence[float] | None, std: Sequence[float] | None):
        super().__init__()
        self.enabled = mean is not None
        mean_t = torch.tensor(mean if mean is not None else [0.0]).view(1, -1, 1, 1)
        std_t = torch.tensor(std if std is not None else [1.0]).view(1, -1, 1, 1)
        self.register_buffer("mean", mean_t, persistent=False)
        self.register_buffer("std", std_t, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        mean, std = self.mean, self.std
        if x.shape[1] != mean.shape[1]:  # gray input through an RGB normalisation
            mean, std = mean.mean(1, keepdim=True), std.mean(1, keepdim=True)
        return (x - mean) / std


class NormalizedEncoder(nn.Module):
    """An encoder that takes images in [0, 1] and applies its own input normalisation."""

    def __init__(self, encoder: nn.Module, mean=None, std=None):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.encoder = encoder
        self.feature_dim = feature_dim(encoder)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.normalize(x))


def strided_convs_on_one_pixel(encoder: nn.Module, size: int, channels: int = 3) -> list[str]:
    """Names of the strided 3 x 3 (k > 1) convolutions that receive a 1 x 1 feature map from a
    size x size input (a ResNet's layer4.0.conv1 does at 16 px and below: 16 -> 8 -> 4 -> 2 -> 1).

    Why: on CPU, bf16 autocast computes the weight gradient of such a convolution wrongly (the
    oneDNN kernel; measured here with torch 2.14: relative error 2.4 to NaN for 3 x 3, stride 2,
    padding 1 on 1 x 1 inputs, intermittently: it reads memory it did not write; 0.003 as
    expected on 2 x 2, and for 1 x 1 kernels or stride 1), so a bf16 run with crops that small
    diverges within a few steps. The engine refuses such runs instead.
    """
    hits: list[str] = []
    hooks = [
        module.register_forward_pre_hook(
            lambda m, args, name=name: hits.append(name) if args[0].shape[-2:] == (1, 1) else None
        )
        for name, module in encoder.named_modules()
        if isinstance(module, nn.Conv2d) and max(module.stride) > 1 and max(module.kernel_size) > 1
    ]
    was_training = encoder.training
    try:
        encoder.eval()
        with torch.no_grad():
            encoder(torch.zeros(1, channels, size, size))
    finally:
        encoder.train(was_training)
        for hook in hooks:
            hook.remove()
    return hits
