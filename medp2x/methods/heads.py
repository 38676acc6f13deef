"""The heads methods put on the encoder: MLP projectors and predictors, and SwAV's prototypes.

They are trained with the encoder and dropped after pretraining (only ``encoder`` is saved as
the next stage's backbone). Each method sizes them from ``encoder.feature_dim`` and its recipe.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def mlp(
    dims: Sequence[int],
    batch_norm: bool = True,
    bias: bool = True,
    last_batch_norm: bool = False,
    last_bias: bool | None = None,
    activation: type[nn.Module] = nn.ReLU,
) -> nn.Sequential:
    """Linear layers ``dims[0] -> ... -> dims[-1]`` with (BN,) ``activation`` between them.

    ``last_batch_norm`` adds a BN with a scale but no shift after the output, as the official
    SimCLR head does (``linear_layer(..., use_bn=True, center=False)``). ``last_bias``
    (default: ``bias``) sets the output layer's bias alone (BYOL's heads have none there).
    ``activation``: ReLU in SimCLR, SwAV, BYOL and MoCo; GELU in DINO's head.
    """
    if len(dims) < 2:
        raise ValueError(f"an MLP needs at least input and output widths, got {list(dims)}")
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        last = i == len(dims) - 2
        has_bias = bias if not last or last_bias is None else last_bias
        layers.append(nn.Linear(d_in, d_out, bias=has_bias))
        if not last:
            if batch_norm:
                layers.append(nn.BatchNorm1d(d_out))
            layers.append(_activation(activation))
    if last_batch_norm:
        layers.append(_scale_only_batch_norm(dims[-1]))
    return nn.Sequential(*layers)


def _activation(kind: type[nn.Module]) -> nn.Module:
    return kind(inplace=True) if kind is nn.ReLU else kind()


def _scale_only_batch_norm(width: int) -> nn.BatchNorm1d:
    bn = nn.BatchNorm1d(width)
    bn.register_parameter("bias", None)  # F.batch_norm accepts a missing shift
    return bn


class Prototypes(nn.Linear):
    """SwAV's prototypes: a bias-free linear layer whose rows (the prototypes) are kept at unit
    norm, so its outputs are cosine similarities of unit embeddings (``normalize`` after every
    optimizer step, as ``main_swav.py``)."""

    def __init__(self, dim: int, n_prototypes: int):
        super().__init__(dim, n_prototypes, bias=False)
        self.normalize()

    @torch.no_grad()
    def normalize(self) -> None:
        self.weight.copy_(F.normalize(self.weight, dim=1))
