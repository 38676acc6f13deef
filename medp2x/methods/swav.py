"""SwAV (Caron et al., 2020): swapped prediction of Sinkhorn-Knopp cluster assignments.

Follows facebookresearch/swav ``main_swav.py``:
- multi-crop: same-size crops share one encoder pass; the projection
  ``Linear -> BN -> ReLU -> Linear`` is L2-normalised and scored against prototypes
  (a bias-free ``Linear`` whose rows are L2-normalised after every optimizer step);
- assignments ``q`` come only from the large crops, by Sinkhorn-Knopp over the *global* batch
  (marginal sums are all-reduced), never get gradients, and every other crop predicts them;
- prototypes get no update during the first ``freeze_prototypes_iters`` iterations (or the
  first ``freeze_prototypes_epochs`` epochs): their gradient is set to ``None`` as in the
  original, so neither weight decay nor momentum moves them;
- the optimiser is the original's LARC over every parameter (recipe fields ``trust_mode``,
  ``exclude_bias_and_norm``, ``start_warmup_ratio``, ``final_lr_ratio``; ``medp2x.optim``);
- an optional queue of past projections (per rank, ``queue_length // world_size`` rows per large
  crop) enlarges the set Sinkhorn balances over when batches are small. It starts at epoch
  ``queue_start_epoch`` and is used once full. It is not saved in checkpoints (the original
  saves it per rank beside them): after a resume it refills before being used again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from medp2x.distributed import world_size
from medp2x.methods import simclr
from medp2x.methods.base import (
    Recipe,
    SSLMethod,
    ViewSpec,
    drop_gradients,
    embedding_spread,
    encode_groups,
    frozen_at,
    prediction_entropy,
)
from medp2x.methods.heads import Prototypes, mlp
from medp2x.methods.losses import at_least_float32, sinkhorn, swapped_prediction_loss


@dataclass
class SwAVRecipe(Recipe):
    temperature: float = 0.1
    epsilon: float = 0.05
    sinkhorn_iterations: int = 3
    n_prototypes: int = 3000
    proj_hidden_dim: int = 2048
    proj_out_dim: int = 128
    freeze_prototypes_epochs: int = 1
    freeze_prototypes_iters: int | None = None  # when set, replaces freeze_prototypes_epochs
    queue_length: int = 0  # global length; 0 disables the queue
    queue_start_epoch: int = 15
    # main_swav.py's optimiser: apex LARC (clip=False) over every parameter, weight decay on
    # all; lr from start_warmup (0.3 for 4.8 at batch 4096) up to the peak, then a cosine to
    # final_lr = base_lr / 1000. Ratios of the peak, so they follow its batch scaling.
    trust_mode: str = "larc"  # used when optimizer is "lars"
    exclude_bias_and_norm: bool = False
    start_warmup_ratio: float = 0.3 / 4.8
    final_lr_ratio: float = 0.001


# full: main_swav.py's ImageNet recipe (LARC lr 4.8 at B = 4096, i.e. 0.3 per 256; warm-up
# from 0.3, cosine to 0.0048, both scaled with the peak) at the P2X paper's batch 1024; queue
# 3840 from epoch 15 as the SwAV README advises below 4096. tiny: few prototypes for a batch
# of 32; prototypes frozen for 20 iterations; a short queue from the second epoch (start it
# late: lightly #736/#1006, swav #37/#69); colour strength 0.5 on small images, as SimCLR's.
RECIPES = {
    "full": SwAVRecipe(
        method="swav", profile="full", arch="resnet50", image_size=224,
        batch_size=1024, epochs=1000, optimizer="lars", base_lr=0.3,
        weight_decay=1e-6, warmup_epochs=10,
        views=ViewSpec(n_large=2, large_size=224, n_small=6, small_size=96,
                       large_scale=(0.14, 1.0), small_scale=(0.05, 0.14)),
        n_prototypes=3000, proj_hidden_dim=2048, proj_out_dim=128,
        queue_length=3840, queue_start_epoch=15,
    ),
    "tiny": SwAVRecipe(
        method="swav", profile="tiny", arch="resnet18", image_size=64,
        batch_size=32, epochs=2, optimizer="sgd", base_lr=0.5,
        weight_decay=5e-4, warmup_epochs=0,
        views=ViewSpec(n_large=2, large_size=64, n_small=2, small_size=32,
                       large_scale=(0.14, 1.0), small_scale=(0.05, 0.14),
                       color_strength=0.5),
        n_prototypes=64, proj_hidden_dim=512, proj_out_dim=64,
        freeze_prototypes_iters=20, queue_length=256, queue_start_epoch=1,
    ),
}  # fmt: skip


class SwAV(SSLMethod):
    name = "swav"
    recipes = RECIPES
    augment = simclr.AUGMENT  # main_swav.py's colour distortion and blur are SimCLR's
    multi_crop = True

    def __init__(self, encoder: nn.Module, recipe: SwAVRecipe):
        super().__init__(encoder, recipe)
        self.projector = mlp([self.feature_dim, recipe.proj_hidden_dim, recipe.proj_out_dim])
        self.prototypes = Prototypes(recipe.proj_out_dim, recipe.n_prototypes)
        # Per-rank state, deliberately not a registered buffer: DDP would broadcast rank 0's
        # queue to every rank at each forward.
        self.queue: torch.Tensor | None = None

    def prototypes_frozen(self, epoch: int, iteration: int) -> bool:
        r = self.recipe
        return frozen_at(epoch, iteration, r.freeze_prototypes_epochs, r.freeze_prototypes_iters)

    def on_before_optimizer_step(self, epoch: int, iteration: int) -> None:
        super().on_before_optimizer_step(epoch, iteration)
        if self.prototypes_frozen(epoch, iteration):
            drop_gradients(self.prototypes)

    def on_after_optimizer_step(self, progress: float) -> None:
        super().on_after_optimizer_step(progress)
        self.prototypes.normalize()

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        self.check_views(views)
        r = self.recipe
        bs, n_views = views[0].shape[0], len(views)
        embedding = F.normalize(self.projector(encode_groups(self.encoder, views)), dim=1)
        scores = self.prototypes(embedding)
        queue = self._active_queue(bs, embedding)
        queue_used = queue is not None and bool((queue[:, -1] != 0).any())
        assignments = []
        for crop in range(r.views.n_large):
            with torch.no_grad():
                block = at_least_float32(scores[crop * bs : (crop + 1) * bs].detach())
                crop_embedding = embedding[crop * bs : (crop + 1) * bs].detach()
                if queue is not None:
                    if queue_used:
                        with torch.autocast(queue.device.type, enabled=False):  # keep fp32
                            queued = queue[crop] @ self.prototypes.weight.T.float()
                        block = torch.cat([queued.to(block), block])
                    queue[crop, bs:] = queue[crop, :-bs].clone()  # shift, newest first
                    queue[crop, :bs] = crop_embedding
                q = sinkhorn(block, r.epsilon, r.sinkhorn_iterations)[-bs:]
            assignments.append(q)
        loss = swapped_prediction_loss(scores, assignments, n_views, r.temperature)
        return {
            "loss": loss,
            "queue_used": torch.tensor(float(queue_used)),
            "spread": embedding_spread(embedding),
            "prediction_entropy": prediction_entropy(scores, r.temperature),
        }

    def _active_queue(self, batch_size: int, embedding: torch.Tensor) -> torch.Tensor | None:
        r = self.recipe
        if not (self.training and r.queue_length > 0 and self.state.epoch >= r.queue_start_epoch):
            return None
        if self.queue is None:
            rows = r.queue_length // world_size()
            rows -= rows % batch_size  # as main_swav.py: a whole number of batches
            if rows <= batch_size:
                raise ValueError(
                    f"swav queue_length {r.queue_length} leaves {rows} rows per rank for batches "
                    f"of {batch_size}; use at least {2 * batch_size * world_size()} or 0 (no queue)"
                )
            self.queue = embedding.new_zeros(
                (r.views.n_large, rows, embedding.shape[1]), dtype=torch.float32
            )
        return self.queue
