"""Recompute an encoder's BatchNorm statistics on the images it is evaluated on.

Why: an SSL encoder's running statistics are an exponential average taken while its weights
moved fast, over augmented views (colour jitter, grayscale, small crops), so frozen features of
clean images pass through statistics of another distribution; a first-stage encoder moved to a
new domain (ImageNet -> histology) has the same mismatch. Averaging the statistics again over
the evaluation's own training images, weights untouched, is PreciseBN (Wu & Johnson 2021;
MMPretrain's ``PreciseBNHook``, fvcore's ``update_bn_stats``) and, across domains, AdaBN
(Li et al. 2016). It uses images only, never labels. The arithmetic is PyTorch's own
cumulative average (``momentum=None``), so nothing is re-implemented here.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

BN_STATS = ("saved", "recomputed")


def batch_norms(module: nn.Module) -> list[_BatchNorm]:
    return [m for m in module.modules() if isinstance(m, _BatchNorm)]


@torch.no_grad()
def recompute_bn_stats(encoder: nn.Module, batches: Iterable[torch.Tensor]) -> nn.Module:
    """A copy of ``encoder`` in eval mode whose BN running mean and variance are the average
    of the per-batch statistics over ``batches`` (the caller's encoder is not modified)."""
    encoder = copy.deepcopy(encoder)
    layers = batch_norms(encoder)
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average instead of an exponential one
    encoder.train()
    seen = 0
    for images in batches:
        encoder(images)
        seen += len(images)
    if layers and seen == 0:
        raise ValueError("no images to recompute BatchNorm statistics on")
    for m, momentum in zip(layers, momenta, strict=True):
        m.momentum = momentum
    return encoder.eval()
