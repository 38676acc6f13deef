"""Low-level image features as kNN and linear-probe references next to a random-init encoder.

Why: on small natural-image sets most of what a frozen random-init ResNet's kNN gets right is
colour and brightness. Measured on Tiny-ImageNet's validation images (200 classes, 8,000-image
bank, 2,000 held-out queries, 64 px; benchmarks/methods_knn.py): a 4 x 4 x 4-bin colour
histogram scores 4.7 %, the image averaged to 4 x 4 pixels 3.8 %, random-init ResNet-18s
2.5-3.5 %. SSL recipes remove exactly
that cue on purpose (colour jitter, random grayscale), so a briefly pretrained encoder can
learn real structure and still score below a random init. Reporting these references says
how much of a score is colour alone. Both take images in [0, 1], like every medp2x encoder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ColourHistogram(nn.Module):
    """The joint RGB histogram with ``levels`` bins per channel, square-rooted (so cosine
    similarity is the Bhattacharyya coefficient); gray images count as R = G = B."""

    def __init__(self, levels: int = 4):
        super().__init__()
        self.levels = levels
        self.feature_dim = levels**3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        q = (x.float().clamp(0, 1) * self.levels).long().clamp_(max=self.levels - 1)
        bins = ((q[:, 0] * self.levels + q[:, 1]) * self.levels + q[:, 2]).flatten(1)
        hist = torch.zeros(x.shape[0], self.feature_dim, device=x.device)
        hist.scatter_add_(1, bins, torch.ones_like(bins, dtype=hist.dtype))
        return (hist / bins.shape[1]).sqrt()


class TinyImage(nn.Module):
    """The image averaged down to ``side`` x ``side`` pixels (Torralba et al.'s tiny images)."""

    def __init__(self, side: int = 4, channels: int = 3):
        super().__init__()
        self.side = side
        self.feature_dim = side * side * channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x.float(), self.side).flatten(1)


BASELINES = {"colour_histogram": ColourHistogram, "tiny_image": TinyImage}


def build_baseline(name: str) -> nn.Module:
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; choose one of {', '.join(BASELINES)}")
    return BASELINES[name]()
