"""BYOL (Grill et al., 2020): an online network predicts a slowly moving target network.

Follows deepmind-research/byol: projector and predictor are ``Linear -> BN -> ReLU ->
Linear(no bias)``; each view goes through the networks in its own pass; the loss is
``mean_b [(2 - 2 cos(p1, z2')) + (2 - 2 cos(p2, z1'))]`` with ``z'`` from the target (no
gradient); after every optimizer step the target's parameters move as an EMA of the online
ones with ``tau = 1 - (1 - tau_base) * (cos(pi * progress) + 1) / 2`` (``tau_base`` at the
start, 1 at the end). The target's BN statistics are its own, from its forward passes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from medp2x.methods.base import Recipe, ViewSpec, embedding_spread
from medp2x.methods.heads import mlp
from medp2x.methods.losses import regression_loss
from medp2x.methods.momentum import MomentumMethod, cosine_momentum, frozen_copy
from medp2x.views import AugmentRecipe, ViewAugment


@dataclass
class BYOLRecipe(Recipe):
    tau_base: float = 0.996
    proj_hidden_dim: int = 4096
    proj_out_dim: int = 256
    pred_hidden_dim: int = 4096


# full: BYOL's ImageNet recipe (LARS 0.2 x B/256, wd 1.5e-6, 10 warm-up epochs) at the P2X
# paper's batch 1024 and 1000 epochs. tiny: a target that follows faster (0.99, as lightly's
# small-scale benchmarks) suits runs of a few hundred steps; narrower heads for ResNet-18;
# lightly's rate 0.06 / 128.
RECIPES = {
    "full": BYOLRecipe(
        method="byol", profile="full", arch="resnet50", image_size=224,
        batch_size=1024, epochs=1000, optimizer="lars", base_lr=0.2,
        weight_decay=1.5e-6, warmup_epochs=10,
        views=ViewSpec(n_large=2, large_size=224, large_scale=(0.08, 1.0)),
        tau_base=0.996, proj_hidden_dim=4096, proj_out_dim=256, pred_hidden_dim=4096,
    ),
    "tiny": BYOLRecipe(
        method="byol", profile="tiny", arch="resnet18", image_size=64,
        batch_size=32, epochs=2, optimizer="sgd", base_lr=0.12,
        weight_decay=5e-4, warmup_epochs=0,
        views=ViewSpec(n_large=2, large_size=64, large_scale=(0.08, 1.0)),
        tau_base=0.99, proj_hidden_dim=1024, proj_out_dim=128, pred_hidden_dim=1024,
    ),
}  # fmt: skip

# Grill et al. 2020, Table 6: asymmetric views. Both: flip, colour jitter (0.4, 0.4, 0.2, 0.1)
# with p 0.8, grayscale 0.2; the first always blurred, the second blurred with p 0.1 and
# solarized with p 0.2.
BYOL_VIEW_1 = ViewAugment(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, blur_p=1.0)
BYOL_VIEW_2 = replace(BYOL_VIEW_1, blur_p=0.1, solarize_p=0.2)
AUGMENT = AugmentRecipe(large=(BYOL_VIEW_1, BYOL_VIEW_2), small=BYOL_VIEW_2)


class BYOL(MomentumMethod):
    name = "byol"
    recipes = RECIPES
    augment = AUGMENT

    def __init__(self, encoder: nn.Module, recipe: BYOLRecipe):
        super().__init__(encoder, recipe)
        r = recipe
        self.projector = mlp([self.feature_dim, r.proj_hidden_dim, r.proj_out_dim], last_bias=False)
        self.predictor = mlp([r.proj_out_dim, r.pred_hidden_dim, r.proj_out_dim], last_bias=False)
        self.target_encoder = frozen_copy(encoder)
        self.target_projector = frozen_copy(self.projector)

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.encoder, self.target_encoder), (self.projector, self.target_projector)]

    def momentum(self, progress: float) -> float:
        return cosine_momentum(self.recipe.tau_base, progress)

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
