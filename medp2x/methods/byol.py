"""BYOL (Grill et al., 2020): an online network predicts a slowly moving target network.

Follows deepmind-research/byol: projector and predictor are ``Linear -> BN -> ReLU ->
Linear(no bias)``; each view goes through the networks in its own pass; the loss is
``mean_b [(2 - 2 cos(p1, z2')) + (2 - 2 cos(p2, z1'))]`` with ``z'`` from the target (no
gradient); after every optimizer step the target's parameters move as an EMA of the online
ones with ``tau = 1 - (1 - tau_base) * (cos(pi * progress) + 1) / 2`` (``tau_base`` at the
start, 1 at the end). The target's BN statistics are its own, from its forward passes.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from medp2x.methods.base import (
    Recipe,
    SSLMethod,
    ViewSpec,
    at_least_float32,
    check_profile,
    copy_params,
    ema_update,
    embedding_spread,
    mlp,
    validate_recipe,
)


@dataclass
class BYOLRecipe(Recipe):
    tau_base: float = 0.996
    proj_hidden_dim: int = 4096
    proj_out_dim: int = 256
    pred_hidden_dim: int = 4096


def recipe(profile: str) -> BYOLRecipe:
    check_profile(profile)
    if profile == "full":
        # BYOL's ImageNet recipe (LARS 0.2 x B/256, wd 1.5e-6, 10 warm-up epochs) at the P2X
        # paper's batch 1024 and 1000 epochs.
        r = BYOLRecipe(
            method="byol", profile="full", arch="resnet50", image_size=224,
            batch_size=1024, epochs=1000, optimizer="lars", base_lr=0.2,
            weight_decay=1.5e-6, warmup_epochs=10,
            views=ViewSpec(n_large=2, large_size=224, large_scale=(0.08, 1.0)),
            tau_base=0.996, proj_hidden_dim=4096, proj_out_dim=256, pred_hidden_dim=4096,
        )  # fmt: skip
    else:
        # A target that follows faster (0.99, as lightly's small-scale benchmarks) suits runs
        # of a few hundred steps; narrower heads for ResNet-18.
        r = BYOLRecipe(
            method="byol", profile="tiny", arch="resnet18", image_size=64,
            batch_size=32, epochs=2, optimizer="sgd", base_lr=0.12,  # lightly's 0.06 / 128
            weight_decay=5e-4, warmup_epochs=0,
            views=ViewSpec(n_large=2, large_size=64, large_scale=(0.08, 1.0)),
            tau_base=0.99, proj_hidden_dim=1024, proj_out_dim=128, pred_hidden_dim=1024,
        )  # fmt: skip
    validate_recipe(r)
    return r


def target_momentum(tau_base: float, progress: float) -> float:
    """BYOL's cosine schedule: ``tau_base`` at progress 0, 1 at progress 1."""
    progress = min(max(progress, 0.0), 1.0)
    return 1.0 - (1.0 - tau_base) * (math.cos(math.pi * progress) + 1.0) / 2.0


def regression_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample ``||p/|p| - z/|z|||^2 = 2 - 2 cos(p, z)``."""
    p = F.normalize(at_least_float32(prediction), dim=1)
    z = F.normalize(at_least_float32(target), dim=1)
    return 2.0 - 2.0 * (p * z).sum(dim=1)


class BYOL(SSLMethod):
    name = "byol"

    def __init__(self, encoder: nn.Module, recipe: BYOLRecipe):
        super().__init__(encoder, recipe)
        r = recipe
        self.projector = mlp([self.feature_dim, r.proj_hidden_dim, r.proj_out_dim], last_bias=False)
        self.predictor = mlp([r.proj_out_dim, r.pred_hidden_dim, r.proj_out_dim], last_bias=False)
        self.target_encoder = copy.deepcopy(encoder)
        self.target_projector = copy.deepcopy(self.projector)
        self.reset_momentum_encoders()
        self.tau = r.tau_base

    def reset_momentum_encoders(self) -> None:
        copy_params(self.encoder, self.target_encoder)
        copy_params(self.projector, self.target_projector)

    def on_after_optimizer_step(self, progress: float) -> None:
        super().on_after_optimizer_step(progress)
        self.tau = target_momentum(self.recipe.tau_base, progress)
        ema_update(self.encoder, self.target_encoder, self.tau)
        ema_update(self.projector, self.target_projector, self.tau)

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        self.check_views(views)
        projections = [self.projector(self.encoder(v)) for v in views]
        predictions = [self.predictor(z) for z in projections]
        with torch.no_grad():
            targets = [self.target_projector(self.target_encoder(v)) for v in views]
        loss = regression_loss(predictions[0], targets[1]) + regression_loss(
            predictions[1], targets[0]
        )
        spread = embedding_spread(torch.cat(projections))
        return {"loss": loss.mean(), "tau": torch.tensor(self.tau), "spread": spread}
