"""DINO (Caron et al., 2021), ResNet version: a student matches an EMA teacher's sharpened,
centred output distribution across crops.

Follows facebookresearch/dino ``main_dino.py`` (``DINOLoss``, ``DINOHead``,
``MultiCropWrapper``, ``train_one_epoch``) with the README's ResNet-50 command:
- multi-crop: every crop goes through the student (same-size crops in one encoder pass, the
  head once over all), only the large ("global") crops through the teacher;
- head: ``Linear -> GELU -> Linear -> GELU -> Linear`` to a bottleneck (truncated-normal init,
  std 0.02), L2-normalised, then a weight-normalised bias-free layer to ``out_dim`` whose norms
  are frozen at 1 (``norm_last_layer``);
- loss: for every teacher crop ``c`` and every other crop ``v``,
  ``-sum_k softmax((t_c - C) / T_t)_k log softmax(s_v / T_s)_k``, averaged over pairs and
  images (``losses.swapped_prediction_loss``: SwAV's loss with the teacher as target);
- centre ``C <- m C + (1 - m) mean(t)`` over the global batch's teacher outputs after every
  training forward (``losses.updated_center``), a buffer saved in checkpoints;
- teacher: EMA of the student (encoder and head) with BYOL's cosine momentum from
  ``teacher_momentum`` to 1 (``momentum.MomentumMethod``); its BN statistics are its own;
- before each optimizer step: each parameter's gradient clipped to norm ``clip_grad``
  (``utils.clip_gradients``), and the last layer's gradients dropped during the first
  ``freeze_last_layer_epochs`` epochs (``cancel_gradients_last_layer``).

Deviations (docs/methods.md, DINO): the teacher temperature warm-up rises linearly per
iteration, equal to the original's per-epoch ``np.linspace`` at every epoch start; the EMA
momentum of a step is the cosine at the progress *after* it (the original: before it), as
BYOL here; crops are resized bilinearly (``medp2x.views``), not bicubically.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from medp2x.methods import byol
from medp2x.methods.base import (
    Recipe,
    ViewSpec,
    drop_gradients,
    embedding_spread,
    encode_groups,
    frozen_at,
    prediction_entropy,
)
from medp2x.methods.heads import mlp
from medp2x.methods.losses import swapped_prediction_loss, teacher_distribution, updated_center
from medp2x.methods.momentum import MomentumMethod, cosine_momentum, frozen_copy
from medp2x.views import AugmentRecipe


@dataclass
class DINORecipe(Recipe):
    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    head_layers: int = 3
    head_batch_norm: bool = False  # use_bn_in_head
    norm_last_layer: bool = True  # last layer's weight norms frozen at 1
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 0
    center_momentum: float = 0.9
    teacher_momentum: float = 0.996
    freeze_last_layer_epochs: int = 1
    freeze_last_layer_iters: int | None = None  # when set, replaces freeze_last_layer_epochs
    clip_grad: float = 3.0  # per-parameter gradient norm; 0 disables
    # get_params_groups: biases and norm parameters get no weight decay (nor LARS adaptation)
    exclude_bias_and_norm: bool = True
    final_lr_ratio: float = 0.0  # min_lr / peak lr


# full: the README's ResNet-50 command (8 GPUs x 64 = batch 512, 100 epochs): SGD lr 0.03 per
# 256 after 10 warm-up epochs from 0, cosine to min_lr 1e-6 (here a ratio of the peak 0.06),
# wd 1e-4, global crops (0.14, 1), 8 local crops of 96 px (0.05, 0.14); main_dino.py defaults
# for the rest (out_dim 65536, teacher temperature 0.04 without warm-up, momentum 0.996,
# clip 3.0, last layer frozen for 1 epoch). tiny: ResNet-18 at 64 px, batch 32, 2 local crops
# of 32 px, a narrow head with BN (``use_bn_in_head``, as lightly's small-data benchmarks:
# without it, short runs on small images fell to uniform teacher outputs, docs/methods.md)
# and a teacher that follows quickly (0.99, as BYOL's tiny recipe).
RECIPES = {
    "full": DINORecipe(
        method="dino", profile="full", arch="resnet50", image_size=224,
        batch_size=512, epochs=100, optimizer="sgd", base_lr=0.03,
        weight_decay=1e-4, warmup_epochs=10,
        views=ViewSpec(n_large=2, large_size=224, n_small=8, small_size=96,
                       large_scale=(0.14, 1.0), small_scale=(0.05, 0.14)),
        final_lr_ratio=1e-6 / 0.06,
    ),
    "tiny": DINORecipe(
        method="dino", profile="tiny", arch="resnet18", image_size=64,
        batch_size=32, epochs=2, optimizer="sgd", base_lr=0.12,
        weight_decay=5e-4, warmup_epochs=0,
        views=ViewSpec(n_large=2, large_size=64, n_small=2, small_size=32,
                       large_scale=(0.14, 1.0), small_scale=(0.05, 0.14)),
        out_dim=1024, hidden_dim=512, bottleneck_dim=64, head_batch_norm=True,
        teacher_momentum=0.99, freeze_last_layer_iters=10,
    ),
}  # fmt: skip

# DataAugmentationDINO: the global crops are BYOL's two views (jitter (0.4, 0.4, 0.2, 0.1) with
# p 0.8, grayscale 0.2; blur always / blur 0.1 and solarize 0.2); local crops blur with p 0.5.
AUGMENT = AugmentRecipe(large=byol.AUGMENT.large, small=replace(byol.BYOL_VIEW_1, blur_p=0.5))


class DINOHead(nn.Module):
    """``DINOHead``: an MLP to a bottleneck, L2 normalisation, a weight-normalised last layer."""

    def __init__(self, in_dim: int, r: DINORecipe):
        super().__init__()
        if r.head_layers < 1:
            raise ValueError(f"dino head_layers must be >= 1, got {r.head_layers}")
        dims = [in_dim] + [r.hidden_dim] * (r.head_layers - 1) + [r.bottleneck_dim]
        self.mlp = mlp(dims, batch_norm=r.head_batch_norm, activation=nn.GELU)
        for layer in self.mlp.modules():
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        last = nn.Linear(r.bottleneck_dim, r.out_dim, bias=False)
        self.last_layer = nn.utils.parametrizations.weight_norm(last)
        norms = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            norms.fill_(1.0)
        norms.requires_grad_(not r.norm_last_layer)

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """The L2-normalised bottleneck embedding."""
        return nn.functional.normalize(self.mlp(features), dim=-1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.last_layer(self.embed(features))


def teacher_temperature(r: DINORecipe, epochs_done: float) -> float:
    """The teacher temperature once ``epochs_done`` epochs are trained: from
    ``warmup_teacher_temp`` up to ``teacher_temp`` at epoch ``warmup_teacher_temp_epochs - 1``
    (the original's ``np.linspace`` over epochs, here linear between epoch starts too)."""
    if r.warmup_teacher_temp_epochs <= 0:
        return r.teacher_temp
    ramp = min(max(epochs_done, 0.0) / max(r.warmup_teacher_temp_epochs - 1, 1), 1.0)
    return r.warmup_teacher_temp + (r.teacher_temp - r.warmup_teacher_temp) * ramp


class DINO(MomentumMethod):
    name = "dino"
    recipes = RECIPES
    augment = AUGMENT
    multi_crop = True

    def __init__(self, encoder: nn.Module, recipe: DINORecipe):
        super().__init__(encoder, recipe)
        self.head = DINOHead(self.feature_dim, recipe)
        self.teacher_encoder = frozen_copy(encoder)
        self.teacher_head = frozen_copy(self.head)
        # Saved with the weights, so a resumed run centres and sharpens as it would have.
        self.register_buffer("center", torch.zeros(1, recipe.out_dim))
        self.register_buffer("teacher_temp", torch.tensor(teacher_temperature(recipe, 0.0)))

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.encoder, self.teacher_encoder), (self.head, self.teacher_head)]

    def momentum(self, progress: float) -> float:
        return cosine_momentum(self.recipe.teacher_momentum, progress)

    def on_before_optimizer_step(self, epoch: int, iteration: int) -> None:
        super().on_before_optimizer_step(epoch, iteration)
        r = self.recipe
        if r.clip_grad > 0:
            for p in self.parameters():
                if p.grad is not None:  # per parameter, as utils.clip_gradients
                    nn.utils.clip_grad_norm_(p, r.clip_grad)
        if frozen_at(epoch, iteration, r.freeze_last_layer_epochs, r.freeze_last_layer_iters):
            drop_gradients(self.head.last_layer)

    def on_after_optimizer_step(self, progress: float) -> None:
        super().on_after_optimizer_step(progress)
        self.teacher_temp.fill_(teacher_temperature(self.recipe, progress * self.recipe.epochs))

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        self.check_views(views)
        r = self.recipe
        n_teacher = r.views.n_large
        embedding = self.head.embed(encode_groups(self.encoder, views))
        student = self.head.last_layer(embedding)
        with torch.no_grad():
            teacher = self.teacher_head(encode_groups(self.teacher_encoder, views[:n_teacher]))
            targets = teacher_distribution(teacher, self.center, self.teacher_temp)
        loss = swapped_prediction_loss(
            student, list(targets.chunk(n_teacher)), len(views), r.student_temp
        )
        entropy = prediction_entropy(teacher - self.center, self.teacher_temp)
        if self.training:
            self.center.copy_(updated_center(self.center, teacher, r.center_momentum))
        return {
            "loss": loss,
            "tau": torch.tensor(self.tau),
            "teacher_temp": self.teacher_temp.detach().clone(),
            "teacher_entropy": entropy,
            "spread": embedding_spread(embedding),
        }
