"""SimCLR (Chen et al., 2020): NT-Xent between two views, negatives from the global batch.

Follows google-research/simclr: both views go through the encoder as one batch, the
projection head is ``Linear -> BN -> ReLU -> Linear -> BN(scale only)`` with the hidden width
equal to the encoder width, and the loss for view ``a`` of image ``i`` is a softmax over the
other view of every image in the global batch plus the same view of every *other* image.
The loss is the paper's ``1/(2N) sum_k [l(2k-1, 2k) + l(2k, 2k-1)]`` — half of the TF code's
``loss_a + loss_b``: a constant factor, to which LARS' trust ratio makes updates nearly
invariant (it only shifts the balance against weight decay).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from medp2x.methods.base import Recipe, SSLMethod, ViewSpec, embedding_spread
from medp2x.methods.heads import mlp
from medp2x.methods.losses import nt_xent
from medp2x.views import AugmentRecipe, ViewAugment


@dataclass
class SimCLRRecipe(Recipe):
    temperature: float = 0.1
    proj_hidden_dim: int | None = None  # None: the encoder's width (2048 for ResNet-50)
    proj_out_dim: int = 128
    proj_batch_norm: bool = True
    # The TF code's head ends in a scale-only BN; lightly's and solo-learn's end in a biased
    # Linear. False selects theirs (an ablation switch: docs/methods.md, "Parity with lightly").
    proj_last_batch_norm: bool = True
    # The TF code passes both views through the encoder as one batch (BN statistics over 2N);
    # lightly and solo-learn pass each view alone (statistics per view). True selects theirs.
    bn_per_view: bool = False


# SimCLR v1, batch and epochs as in the P2X paper (Table 2 setting); tiny: small images and
# batches, tau 0.5 and colour strength s = 0.5 (SimCLR v1's CIFAR setting, App. B.9), momentum
# SGD at lightly's small-image benchmark rate (0.06 per 128 images = 0.12 per 256); LARS is
# designed for large batches. Both were measured against lightly (docs/methods.md, "Parity
# with lightly"): s = 1 cost 6 points of linear probe on 32 px crops, base_lr 0.5 another 4.
RECIPES = {
    "full": SimCLRRecipe(
        method="simclr", profile="full", arch="resnet50", image_size=224,
        batch_size=1024, epochs=1000, optimizer="lars", base_lr=0.3,
        weight_decay=1e-6, warmup_epochs=10,
        views=ViewSpec(n_large=2, large_size=224, large_scale=(0.08, 1.0)),
        temperature=0.1, proj_out_dim=128,
    ),
    "tiny": SimCLRRecipe(
        method="simclr", profile="tiny", arch="resnet18", image_size=64,
        batch_size=32, epochs=2, optimizer="sgd", base_lr=0.12,
        weight_decay=5e-4, warmup_epochs=0,
        views=ViewSpec(n_large=2, large_size=64, large_scale=(0.08, 1.0), color_strength=0.5),
        temperature=0.5, proj_out_dim=64,
    ),
}  # fmt: skip

# Chen et al. 2020, App. A: colour distortion at strength s = 1 (ColorJitter(0.8s, 0.8s, 0.8s,
# 0.2s) with p 0.8, grayscale 0.2), blur with p 0.5 on both views; ``ViewSpec.color_strength``
# scales the jitter.
SIMCLR_VIEW = ViewAugment(brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2)
AUGMENT = AugmentRecipe(large=(SIMCLR_VIEW,), small=SIMCLR_VIEW)


class SimCLR(SSLMethod):
    name = "simclr"
    recipes = RECIPES
    augment = AUGMENT

    def __init__(self, encoder: nn.Module, recipe: SimCLRRecipe):
        super().__init__(encoder, recipe)
        hidden = recipe.proj_hidden_dim or self.feature_dim
        last_bn = recipe.proj_batch_norm and recipe.proj_last_batch_norm
        self.projector = mlp(
            [self.feature_dim, hidden, recipe.proj_out_dim],
            batch_norm=recipe.proj_batch_norm,
            bias=not recipe.proj_batch_norm,  # a bias before BN is redundant (TF code has none)
            last_batch_norm=last_bn,
            last_bias=not last_bn,
        )

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        self.check_views(views)
        n = views[0].shape[0]
        if self.recipe.bn_per_view:
            z = torch.cat([self.projector(self.encoder(v)) for v in views], dim=0)
        else:
            z = self.projector(self.encoder(torch.cat(views, dim=0)))  # one pass, shared BN stats
        return {**nt_xent(z[:n], z[n:], self.recipe.temperature), "spread": embedding_spread(z)}
